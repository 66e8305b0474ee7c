"""The driver's requests and sessions: which update belongs to which, and when one is done.

Pure: messages in, events (for the screen) and acknowledgements (for Central) out. The asyncio
layer in app.py sends what this decides and prints the events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from shared.messages import (
    CPState,
    CPSummary,
    DriverNotice,
    DriverStatus,
    DriverUpdate,
    RequestAccepted,
    RequestDenied,
    SessionInfo,
    StatusQuery,
    SupplyAuthorized,
    SupplyProgress,
    SupplyRequest,
    SupplyStarted,
    Ticket,
    TicketAck,
    TicketData,
)

SessionUpdate = SupplyAuthorized | SupplyStarted | SupplyProgress

# Session updates that arrive before the acceptance naming their session are kept (bounded)
# and replayed once the session is known.
MAX_EARLY_UPDATES = 200


class Phase(IntEnum):
    REQUESTED = 1  # sent; waiting for accepted or denied
    ACCEPTED = 2  # the session exists; waiting for the CP's authorisation
    AUTHORIZED = 3  # waiting for the driver to plug in
    SUPPLYING = 4
    DONE = 5


class Outcome(StrEnum):
    TICKET = "ticket"
    DENIED = "denied"
    ERROR = "error"  # Central never answered


@dataclass
class Tracked:
    """The request (or, after a restart, the session) the app is following now."""

    cp_id: str
    request_id: str | None  # None for a session found active at start-up
    session_id: str | None = None
    phase: Phase = Phase.REQUESTED
    outcome: Outcome | None = None


# --- events: what the screen shows ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Requested:
    driver_id: str
    cp_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class Available:
    driver_id: str
    cps: tuple[CPSummary, ...]


@dataclass(frozen=True, slots=True)
class Accepted:
    driver_id: str
    cp_id: str
    session_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class Denied:
    driver_id: str
    cp_id: str
    request_id: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Authorized:
    driver_id: str
    cp_id: str
    session_id: str
    price_eur_kwh: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Started:
    driver_id: str
    cp_id: str
    session_id: str


@dataclass(frozen=True, slots=True)
class Telemetry:
    driver_id: str
    cp_id: str
    session_id: str
    kw: float
    kwh: float
    amount_eur: float


class TicketKind(StrEnum):
    CURRENT = "current"  # ends the request being followed
    AWAY = "away"  # settled while the app was not running
    CORRECTION = "correction"  # a later revision of an earlier ticket
    OTHER = "other"  # a session the app was not following (e.g. asked at the CP's menu)


@dataclass(frozen=True, slots=True)
class TicketShown:
    ticket: TicketData
    kind: TicketKind = TicketKind.CURRENT


@dataclass(frozen=True, slots=True)
class Following:
    """A supply already in progress when the app started; it is followed to its ticket."""

    driver_id: str
    session: SessionInfo


@dataclass(frozen=True, slots=True)
class Notice:
    driver_id: str
    text: str
    level: str = "info"
    cp_id: str | None = None
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    driver_id: str
    text: str
    cp_id: str | None = None
    session_id: str | None = None


Event = (
    Requested
    | Available
    | Accepted
    | Denied
    | Authorized
    | Started
    | Telemetry
    | TicketShown
    | Following
    | Notice
    | Failure
)


@dataclass
class Reaction:
    """What one update leads to."""

    events: list[Event] = field(default_factory=list)
    acks: list[TicketAck] = field(default_factory=list)
    relevant: bool = False  # it concerned the request or session being followed

    def extend(self, other: Reaction) -> None:
        self.events += other.events
        self.acks += other.acks
        self.relevant = self.relevant or other.relevant


def update_driver_id(update: DriverUpdate) -> str:
    """The driver an update is addressed to."""
    if isinstance(update, Ticket):
        return update.ticket.driver_id
    return update.driver_id


def phase_of(session: SessionInfo) -> Phase:
    """Map Central's session status (free text) to the phase the app waits in."""
    status = session.status.strip().upper()
    if status.startswith("SUPPLY"):
        return Phase.SUPPLYING
    if status.startswith("AUTHORI"):
        return Phase.AUTHORIZED
    return Phase.ACCEPTED


class DriverFlow:
    """One driver's view of its requests, sessions and tickets."""

    def __init__(self, driver_id: str) -> None:
        self.driver_id = driver_id
        self.status: DriverStatus | None = None
        self.current: Tracked | None = None
        self.outcomes: list[Outcome] = []  # one per request, in order
        self._queries: set[str] = set()
        self._tickets: dict[str, int] = {}  # session id -> highest revision shown
        self._early: list[SessionUpdate] = []

    # --- what the app asks ---------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A request or session is being followed and has not finished."""
        return self.current is not None and self.current.phase is not Phase.DONE

    @property
    def awaiting_answer(self) -> bool:
        """The current request has neither been accepted nor denied yet."""
        return self.current is not None and self.current.phase is Phase.REQUESTED

    @property
    def unknown_driver(self) -> bool:
        return self.status is not None and not self.status.known

    def status_query(self) -> StatusQuery:
        """A new status query; a reply to any query asked so far is accepted."""
        query = StatusQuery(driver_id=self.driver_id)
        self._queries.add(query.id)
        return query

    def request(self, cp_id: str) -> SupplyRequest:
        """Start following a new supply request at `cp_id`."""
        if self.busy:
            raise RuntimeError("a request is still in progress")
        message = SupplyRequest(driver_id=self.driver_id, cp_id=cp_id)
        self.current = Tracked(cp_id=cp_id, request_id=message.id)
        self._early.clear()
        return message

    def give_up(self, text: str) -> Reaction:
        """End the current request without an answer from Central."""
        current = self.current
        if current is None or current.phase is Phase.DONE:
            return Reaction()
        self._finish(Outcome.ERROR)
        failure = Failure(self.driver_id, text, current.cp_id, current.session_id)
        return Reaction(events=[failure], relevant=True)

    # --- updates from Central ------------------------------------------------------------

    def handle(self, update: DriverUpdate) -> Reaction:
        """React to one update from Central (updates for other drivers are ignored)."""
        if update_driver_id(update) != self.driver_id:
            return Reaction()
        if isinstance(update, DriverStatus):
            return self._on_status(update)
        if isinstance(update, RequestAccepted):
            return self._on_accepted(update)
        if isinstance(update, RequestDenied):
            return self._on_denied(update)
        if isinstance(update, SupplyAuthorized | SupplyStarted | SupplyProgress):
            return self._on_session_update(update)
        if isinstance(update, Ticket):
            return self._on_ticket(update.ticket)
        if isinstance(update, DriverNotice):
            current = self.current if self.busy else None
            return Reaction(
                events=[
                    Notice(
                        self.driver_id,
                        update.text,
                        update.level,
                        current.cp_id if current else None,
                        current.session_id if current else None,
                    )
                ]
            )
        # Login results and histories answer the dashboard, not this flow.
        return Reaction()

    def _on_status(self, status: DriverStatus) -> Reaction:
        if self.status is not None or status.request_id not in self._queries:
            return Reaction()  # a late answer to an earlier query, or someone else's
        self.status = status
        self._queries.clear()
        if not status.known:
            text = f"unknown driver ID {self.driver_id}"
            return Reaction(events=[Failure(self.driver_id, text)], relevant=True)
        available = tuple(cp for cp in status.available_cps if cp.state is CPState.ACTIVADO)
        reaction = Reaction(events=[Available(self.driver_id, available)], relevant=True)
        for ticket in status.unseen_tickets:
            reaction.extend(self._on_ticket(ticket, TicketKind.AWAY))
        active = status.active_session
        if active is not None and active.session_id not in self._tickets and not self.busy:
            self.current = Tracked(
                cp_id=active.cp_id,
                request_id=None,
                session_id=active.session_id,
                phase=phase_of(active),
            )
            reaction.events.append(Following(self.driver_id, active))
        return reaction

    def _on_accepted(self, accepted: RequestAccepted) -> Reaction:
        current = self.current
        if (
            current is None
            or current.phase is not Phase.REQUESTED
            or accepted.request_id != current.request_id
        ):
            return Reaction()
        current.session_id = accepted.session_id
        current.phase = Phase.ACCEPTED
        reaction = Reaction(
            events=[
                Accepted(self.driver_id, current.cp_id, accepted.session_id, accepted.request_id)
            ],
            relevant=True,
        )
        if accepted.session_id in self._tickets:
            self._finish(Outcome.TICKET)  # its ticket came first and was shown already
        early, self._early = self._early, []
        for update in early:
            if update.session_id == accepted.session_id and self.busy:
                reaction.extend(self._on_session_update(update))
        return reaction

    def _on_denied(self, denied: RequestDenied) -> Reaction:
        current = self.current
        if current is None or current.phase is Phase.DONE:
            return Reaction()
        if denied.request_id != current.request_id:
            return Reaction()
        self._finish(Outcome.DENIED)
        event = Denied(
            self.driver_id, current.cp_id, denied.request_id, denied.reason.value, denied.detail
        )
        return Reaction(events=[event], relevant=True)

    def _on_session_update(self, update: SessionUpdate) -> Reaction:
        current = self.current
        if current is None or current.phase is Phase.DONE:
            return Reaction()
        if current.session_id is None:
            if update.cp_id == current.cp_id and len(self._early) < MAX_EARLY_UPDATES:
                self._early.append(update)
            return Reaction()
        if update.session_id != current.session_id:
            return Reaction()
        event: Event
        if isinstance(update, SupplyAuthorized):
            current.phase = max(current.phase, Phase.AUTHORIZED)
            event = Authorized(
                self.driver_id,
                update.cp_id,
                update.session_id,
                update.price_eur_kwh,
                update.expires_at,
            )
        elif isinstance(update, SupplyStarted):
            current.phase = Phase.SUPPLYING
            event = Started(self.driver_id, update.cp_id, update.session_id)
        else:
            current.phase = Phase.SUPPLYING
            event = Telemetry(
                self.driver_id,
                update.cp_id,
                update.session_id,
                update.kw,
                update.kwh,
                update.amount_eur,
            )
        return Reaction(events=[event], relevant=True)

    def _on_ticket(self, ticket: TicketData, kind: TicketKind | None = None) -> Reaction:
        # Every ticket is acknowledged, even a repeat: Central may have missed the first ack.
        reaction = Reaction(
            acks=[
                TicketAck(
                    driver_id=self.driver_id,
                    session_id=ticket.session_id,
                    revision=ticket.revision,
                )
            ]
        )
        current = self.current
        is_current = (
            current is not None
            and current.phase is not Phase.DONE
            and current.session_id == ticket.session_id
        )
        shown = self._tickets.get(ticket.session_id)
        if shown is None or ticket.revision > shown:
            if kind is None:
                if is_current:
                    kind = TicketKind.CURRENT
                elif shown is not None or ticket.revision > 1:
                    kind = TicketKind.CORRECTION
                else:
                    kind = TicketKind.OTHER
            self._tickets[ticket.session_id] = ticket.revision
            reaction.events.append(TicketShown(ticket, kind))
        if is_current:
            self._finish(Outcome.TICKET)
            reaction.relevant = True
        return reaction

    def _finish(self, outcome: Outcome) -> None:
        current = self.current
        assert current is not None
        current.phase = Phase.DONE
        current.outcome = outcome
        if current.request_id is not None:
            self.outcomes.append(outcome)
