"""Central's supply sessions as pure rules: no database, no bus, no clock.

A session goes DENIED, or ASKED -> AUTHORISED -> SUPPLYING -> ENDING -> COMPLETED | ABORTED |
EXPIRED. ASKED waits for the engine's answer: it accepts (AUTHORISED, and only then is the driver
told), or it refuses or says nothing in time (DENIED, no ticket). AUTHORISED and SUPPLYING may go
to ENDING directly, and ENDING settles. Every input is a
function or method call that takes the current time as an argument and returns `Effects`: the
messages to publish, the cents to debit, whether the session must be saved or its CP released,
and the lines for the event log. The layer around it (EV_Central/supplies.py) loads and saves
sessions and balances, and publishes what the effects say, in one database transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from EV_Central.pricing import amount_cents, cap_to_balance, max_kwh_for
from shared.bus import Topics
from shared.messages import (
    CPRequestDenied,
    CPTelemetry,
    DenialReason,
    DriverNotice,
    EndReason,
    EndSupply,
    Message,
    RequestDenied,
    SessionInfo,
    StartSupply,
    SupplyAuthorized,
    SupplyProgress,
    SupplyStarted,
    Ticket,
    TicketData,
)

if TYPE_CHECKING:
    from EV_Central.config import CentralSettings

# Energy differences below this are rounding, not a correction worth a new ticket.
KWH_EPSILON = 1e-4


class SessionStatus(StrEnum):
    DENIED = "DENIED"
    ASKED = "ASKED"  # the CP is reserved; waiting for its engine to accept or refuse
    AUTHORISED = "AUTHORISED"
    SUPPLYING = "SUPPLYING"
    ENDING = "ENDING"  # asked to end; waiting for the engine's final figures
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"
    EXPIRED = "EXPIRED"

    @property
    def active(self) -> bool:
        return self in ACTIVE_STATUSES

    @property
    def settled(self) -> bool:
        return self in SETTLED_STATUSES


ACTIVE_STATUSES = (
    SessionStatus.ASKED,
    SessionStatus.AUTHORISED,
    SessionStatus.SUPPLYING,
    SessionStatus.ENDING,
)
SETTLED_STATUSES = (SessionStatus.COMPLETED, SessionStatus.ABORTED, SessionStatus.EXPIRED)


@dataclass(frozen=True)
class Timers:
    """How long Central waits for each thing (the flags of the same names)."""

    authorization_ttl: float = 60.0
    end_grace: float = 2.0
    monitor_grace: float = 6.0
    telemetry_timeout: float = 15.0
    request_ttl: float = 30.0
    cp_answer_timeout: float = 5.0

    @classmethod
    def from_settings(cls, settings: CentralSettings) -> Timers:
        return cls(
            authorization_ttl=settings.authorization_ttl,
            end_grace=settings.end_grace,
            monitor_grace=settings.monitor_grace,
            telemetry_timeout=settings.telemetry_timeout,
            request_ttl=settings.request_ttl,
            cp_answer_timeout=settings.cp_answer_timeout,
        )

    def end_rule(self, reason: EndReason, status: SessionStatus) -> tuple[float, bool]:
        """How long to wait for the engine's figures, and whether to tell the engine to stop."""
        if reason in (EndReason.AUTHORIZATION_EXPIRED, EndReason.ENGINE_LOST):
            return 0.0, True
        if reason == EndReason.MONITOR_LOST:
            # The engine ends a supply itself when it loses its monitor; wait for its figures.
            return self.monitor_grace, status != SessionStatus.SUPPLYING
        return self.end_grace, True


@dataclass(frozen=True)
class Send:
    topic: str
    key: str
    message: Message


@dataclass(frozen=True)
class Note:
    kind: str
    text: str


@dataclass
class Effects:
    """What one input produced. `publish` goes out with the transaction that saves the
    session (the outbox); `post` is sent right after it, best effort (live figures)."""

    publish: list[Send] = field(default_factory=list)
    post: list[Send] = field(default_factory=list)
    debit_cents: int = 0
    save: bool = False  # the session's durable fields changed
    release: bool = False  # the session is over: its CP is free again
    notes: list[Note] = field(default_factory=list)


@dataclass(frozen=True)
class EngineReport:
    """An engine's final figures for a supply (from its supply-ended event)."""

    cp_id: str
    kwh: float
    reason: EndReason
    started_at: float | None


@dataclass
class Session:
    """One supply: what the database records and, while it lasts, the live figures."""

    session_id: str
    cp_id: str
    driver_id: str
    status: SessionStatus
    price_eur_kwh: float
    max_kw: float = 0.0
    origin: str = "driver"
    request_id: str = ""
    requested_at: float = 0.0
    authorized_at: float | None = None
    expires_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    kw: float = 0.0
    kwh: float = 0.0
    amount_cents: int = 0
    reason: str | None = None  # why it was denied, is ending or ended
    ticket_revision: int = 0
    # Live only: the last telemetry taken, when an ENDING session settles regardless, and
    # when an ASKED session stops waiting for the engine's answer.
    last_seq: int = -1
    last_telemetry_at: float | None = None
    settle_deadline: float | None = None
    answer_deadline: float | None = None

    @property
    def amount_eur(self) -> float:
        """The amount so far, rounded exactly as the ticket will be."""
        return amount_cents(self.kwh, self.price_eur_kwh) / 100

    def ticket(self) -> TicketData:
        return TicketData(
            session_id=self.session_id,
            cp_id=self.cp_id,
            driver_id=self.driver_id,
            kwh=round(self.kwh, 4),
            price_eur_kwh=self.price_eur_kwh,
            amount_eur=self.amount_cents / 100,
            reason=EndReason(self.reason or EndReason.ENGINE_LOST),
            started_at=self.started_at,
            ended_at=self.ended_at or 0.0,
            revision=max(1, self.ticket_revision),
        )

    def info(self) -> SessionInfo:
        """The session as a driver's status answer shows it."""
        return SessionInfo(
            session_id=self.session_id,
            cp_id=self.cp_id,
            status=self.status,
            kw=self.kw,
            kwh=round(self.kwh, 4),
            amount_eur=self.amount_eur,
        )

    def to_driver(self, message: Message) -> Send:
        return Send(Topics.DRIVER_UPDATES, self.driver_id, message)

    def to_engine(self, message: Message) -> Send:
        return Send(Topics.CP_COMMANDS, self.cp_id, message)

    def stop_engine(self, reason: EndReason) -> Send:
        """`end_supply` for this session, to its CP's engine."""
        return self.to_engine(
            EndSupply(cp_id=self.cp_id, session_id=self.session_id, reason=reason)
        )

    # --- the engine's events ---------------------------------------------------------------

    def engine_answered(self, cp_id: str, accepted: bool, why: str, now: float) -> Effects:
        """The engine accepted the authorisation (the driver is told now) or refused it."""
        if cp_id != self.cp_id:
            return Effects()
        if self.status != SessionStatus.ASKED:
            if accepted and not self.status.active:
                # Accepted after Central gave up waiting: the engine must not stay reserved.
                return Effects(publish=[self.stop_engine(EndReason.AUTHORIZATION_EXPIRED)])
            return Effects()  # a redelivered answer
        if not accepted:
            return self._deny(DenialReason.CP_REFUSED, why or "no reason given", tell_cp=False)
        self.status = SessionStatus.AUTHORISED
        self.authorized_at = now
        self.answer_deadline = None
        authorised = SupplyAuthorized(
            driver_id=self.driver_id,
            cp_id=self.cp_id,
            session_id=self.session_id,
            price_eur_kwh=self.price_eur_kwh,
            expires_at=self.expires_at or now,
        )
        text = (
            f"{self.cp_id}: supply authorised for {self.driver_id} "
            f"({self.origin} request, session {self.session_id})"
        )
        return Effects(
            publish=[self.to_driver(authorised)], save=True, notes=[Note("authorised", text)]
        )

    def answer_due(self, now: float) -> bool:
        """True when an ASKED session has waited long enough for the engine's answer."""
        return (
            self.status == SessionStatus.ASKED
            and self.answer_deadline is not None
            and now >= self.answer_deadline
        )

    def no_answer(self, timers: Timers) -> Effects:
        """The engine did not answer in time: a denial, and the engine told to forget it."""
        if self.status != SessionStatus.ASKED:
            return Effects()
        detail = f"{self.cp_id} did not answer within {timers.cp_answer_timeout:g} s"
        effects = self._deny(DenialReason.CP_NO_ANSWER, detail)
        # It may still have accepted, and its answer been lost: it must not stay reserved.
        effects.publish.append(self.stop_engine(EndReason.AUTHORIZATION_EXPIRED))
        return effects

    def _deny(self, reason: DenialReason, detail: str, *, tell_cp: bool = True) -> Effects:
        """An ASKED session that will not go ahead: DENIED, no ticket, the CP free again."""
        self.status = SessionStatus.DENIED
        self.reason = reason.value
        self.answer_deadline = None
        text = f"{self.cp_id}: request from {self.driver_id} denied ({reason}: {detail})"
        effects = Effects(
            publish=[self.to_driver(self.denial(reason, detail))],
            save=True,
            release=True,
            notes=[Note("denied", text)],
        )
        if tell_cp and self.origin == "cp":
            effects.publish.append(self.to_engine(self.cp_denial(reason, detail)))
        return effects

    def denial(self, reason: DenialReason, detail: str) -> RequestDenied:
        return RequestDenied(
            driver_id=self.driver_id,
            cp_id=self.cp_id,
            request_id=self.request_id,
            reason=reason,
            detail=detail,
        )

    def cp_denial(self, reason: DenialReason, detail: str) -> CPRequestDenied:
        """The denial of a request made at the CP's own menu, for its screen."""
        return CPRequestDenied(
            cp_id=self.cp_id,
            driver_id=self.driver_id,
            request_id=self.request_id,
            reason=reason,
            detail=detail,
        )

    def plugged(self, cp_id: str, at: float, now: float) -> Effects:
        """The engine says a vehicle was plugged in for this session at `at`."""
        if self.status != SessionStatus.AUTHORISED or cp_id != self.cp_id:
            # Plugged into a session that expired or was never this CP's: stop the engine.
            return stray_plug(cp_id, self.session_id)
        self.status = SessionStatus.SUPPLYING
        self.started_at = at
        self.last_telemetry_at = now
        message = SupplyStarted(driver_id=self.driver_id, cp_id=cp_id, session_id=self.session_id)
        # The engine meters nothing before this word: a supply always runs inside a session
        # that Central has made SUPPLYING, so its energy is billed.
        go = StartSupply(cp_id=cp_id, session_id=self.session_id)
        return Effects(
            publish=[self.to_engine(go), self.to_driver(message)],
            save=True,
            notes=[Note("started", f"{cp_id}: supplying {self.driver_id}")],
        )

    def telemetry(self, event: CPTelemetry, now: float) -> bool:
        """Take a sample; False when it is a redelivery or older than one taken already."""
        if not self.status.active or event.seq <= self.last_seq:
            return False
        self.last_seq = event.seq
        self.kw = event.kw
        self.kwh = max(self.kwh, event.kwh)  # energy never goes back
        self.last_telemetry_at = now
        return True

    def progress(self) -> Send:
        """The driver's live figures."""
        return self.to_driver(
            SupplyProgress(
                driver_id=self.driver_id,
                cp_id=self.cp_id,
                session_id=self.session_id,
                kw=self.kw,
                kwh=round(self.kwh, 4),
                amount_eur=self.amount_eur,
            )
        )

    def balance_exhausted(self, balance_cents: int) -> bool:
        """True when a supply has delivered all the energy the driver's balance pays for.

        Judged on the energy, not the rounded amount: 2 cents at 0.42 €/kWh buy 0.0476 kWh,
        although 0.036 kWh already rounds to 2 cents.
        """
        if self.status != SessionStatus.SUPPLYING:
            return False
        limit = max_kwh_for(balance_cents, self.price_eur_kwh)
        return limit is not None and self.kwh >= limit

    def engine_ended(self, report: EngineReport, balance_cents: int, now: float) -> Effects:
        """The engine's final figures: settle, or correct a ticket already settled.

        The session is over for its CP whatever the figures say (`release`).
        """
        effects = Effects()
        if report.cp_id != self.cp_id:
            pass
        elif self.status == SessionStatus.ASKED:
            # Ended before it was ever accepted: the engine refused it.
            effects = self._deny(DenialReason.CP_REFUSED, report.reason.value, tell_cp=False)
        elif self.status.active:
            # The engine knows why it stopped (it also reports Central's own reasons).
            kwh = max(report.kwh, self.kwh)
            effects = self._settle(kwh, report.reason, balance_cents, now, report.started_at)
        elif self.status in (SessionStatus.COMPLETED, SessionStatus.ABORTED):
            effects = self._correct(report.kwh, balance_cents)
        effects.release = True
        return effects

    # --- ending ----------------------------------------------------------------------------

    def end(self, reason: EndReason, now: float, timers: Timers) -> Effects:
        """Start ending: settled when the engine reports, or when the grace runs out.

        A session still waiting for the engine's answer is denied instead: nothing was
        authorised, so there is nothing to settle.
        """
        if self.status == SessionStatus.ASKED:
            detail = f"{self.cp_id} cannot supply now ({reason.value})"
            effects = self._deny(DenialReason.CP_UNAVAILABLE, detail)
            effects.publish.append(self.stop_engine(reason))
            return effects
        if self.status not in (SessionStatus.AUTHORISED, SessionStatus.SUPPLYING):
            return Effects()
        grace, tell_engine = timers.end_rule(reason, self.status)
        was_supplying = self.status == SessionStatus.SUPPLYING
        self.status = SessionStatus.ENDING
        self.reason = reason.value
        self.settle_deadline = now + (grace if was_supplying else 0.0)
        effects = Effects(
            save=True,
            notes=[
                Note("ending", f"{self.cp_id}: ending supply of {self.driver_id} ({reason.value})")
            ],
        )
        if tell_engine:
            effects.post.append(self.stop_engine(reason))
        if was_supplying:
            notice = DriverNotice(
                driver_id=self.driver_id,
                level="error" if reason != EndReason.DRIVER_STOP else "info",
                text=f"supply at {self.cp_id} is ending: {reason.value}",
            )
            effects.post.append(self.to_driver(notice))
        return effects

    def settle_now(self, balance_cents: int, now: float) -> Effects:
        """Settle with the energy of the last telemetry (the engine never reported)."""
        if not self.status.active:
            return Effects()
        reason = EndReason(self.reason or EndReason.ENGINE_LOST)
        return self._settle(self.kwh, reason, balance_cents, now, None)

    def settle_due(self, now: float) -> bool:
        """True when an ending session has waited long enough for the engine's figures."""
        return (
            self.status == SessionStatus.ENDING
            and self.settle_deadline is not None
            and now >= self.settle_deadline
        )

    def end_due(self, now: float, timers: Timers) -> EndReason | None:
        """Why this session must end at `now` by its timers, or None."""
        if self.status == SessionStatus.AUTHORISED and self.expires_at and now > self.expires_at:
            return EndReason.AUTHORIZATION_EXPIRED
        if (
            self.status == SessionStatus.SUPPLYING
            and self.last_telemetry_at is not None
            and now - self.last_telemetry_at > timers.telemetry_timeout
        ):
            return EndReason.ENGINE_LOST
        return None

    def _settle(
        self,
        kwh: float,
        reason: EndReason,
        balance_cents: int,
        now: float,
        engine_started_at: float | None,
    ) -> Effects:
        never_plugged = self.status == SessionStatus.AUTHORISED or (
            self.started_at is None and engine_started_at is None
        )
        if never_plugged:
            kwh = 0.0
        kwh, cents = cap_to_balance(kwh, self.price_eur_kwh, balance_cents)
        if reason == EndReason.AUTHORIZATION_EXPIRED:
            self.status = SessionStatus.EXPIRED
        elif reason == EndReason.UNPLUGGED:
            self.status = SessionStatus.COMPLETED
        else:
            self.status = SessionStatus.ABORTED
        self.kwh, self.amount_cents, self.ended_at = kwh, cents, now
        self.reason = reason.value
        self.ticket_revision = 1
        if self.started_at is None:
            self.started_at = engine_started_at
        ticket = self.ticket()
        text = (
            f"{self.cp_id}: ticket for {self.driver_id}: {ticket.kwh:.4f} kWh"
            f" × {ticket.price_eur_kwh:.2f} €/kWh = {ticket.amount_eur:.2f} € ({reason.value})"
        )
        return Effects(
            publish=[self.to_driver(Ticket(ticket=ticket))],
            debit_cents=cents,
            save=True,
            release=True,
            notes=[Note("ticket", text)],
        )

    def _correct(self, kwh: float, balance_cents: int) -> Effects:
        """The engine reported more energy than the settled ticket: bill the difference."""
        if kwh <= self.kwh + KWH_EPSILON:
            return Effects()
        new_kwh, new_cents = cap_to_balance(
            kwh, self.price_eur_kwh, balance_cents + self.amount_cents
        )
        if new_kwh <= self.kwh + KWH_EPSILON:
            return Effects()
        delta = new_cents - self.amount_cents
        self.kwh, self.amount_cents = new_kwh, new_cents
        self.ticket_revision += 1
        text = (
            f"{self.cp_id}: ticket {self.session_id} corrected to "
            f"{new_kwh:.4f} kWh, {new_cents / 100:.2f} €"
        )
        return Effects(
            publish=[self.to_driver(Ticket(ticket=self.ticket()))],
            debit_cents=delta,
            save=True,
            notes=[Note("corrected", text)],
        )


def stray_plug(cp_id: str, session_id: str) -> Effects:
    """A plug into a session that is not (or no longer) authorised: the engine must stop."""
    stop = EndSupply(cp_id=cp_id, session_id=session_id, reason=EndReason.AUTHORIZATION_EXPIRED)
    return Effects(publish=[Send(Topics.CP_COMMANDS, cp_id, stop)])
