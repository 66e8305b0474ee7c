"""The driver dashboard's browser protocol, without I/O.

Commands from the browser are pydantic models in a discriminated union, validated once at the
WebSocket with a module-level adapter. What the server pushes back is plain JSON-ready dicts,
built here from the driver flow's events (EV_Driver.flow) and the CP state topic, so the
mapping is tested without a broker or a browser.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from EV_Driver.flow import (
    Accepted,
    Authorized,
    Available,
    Denied,
    Event,
    Failure,
    Following,
    Notice,
    Requested,
    Started,
    Telemetry,
    TicketKind,
    TicketShown,
    phase_of,
)
from EV_Driver.flow import Phase as FlowPhase
from EV_Driver.requests_file import MAX_BYTES as MAX_FILE_BYTES
from shared.messages import (
    STATE_COLOURS,
    CPState,
    CPStateUpdate,
    DriverHistory,
    Identifier,
    TicketData,
    decode,
)

# One WebSocket message at most: a requests file travels inside one.
MAX_COMMAND_BYTES = 64 * 1024
MAX_POINTS = 3600  # kWh samples kept for the chart (an hour at one a second)

Push = dict[str, Any]


# --- commands: browser -> server ----------------------------------------------------------------


class Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Logging in and out is not a command: the connection belongs to the session cookie it
# was opened with (/login, /session, /logout: shared/websession.py, docs/web-auth.md).


class RequestSupply(Command):
    type: Literal["request"]
    cp_id: Identifier


class StopSupply(Command):
    type: Literal["stop"]


class RunFile(Command):
    type: Literal["run_file"]
    name: Annotated[str, Field(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")] = ""
    text: Annotated[str, Field(max_length=MAX_FILE_BYTES)]


class CancelRun(Command):
    type: Literal["cancel_run"]


class Refresh(Command):
    """Ask again for the balance and the history."""

    type: Literal["refresh"]


BrowserCommand = Annotated[
    RequestSupply | StopSupply | RunFile | CancelRun | Refresh,
    Field(discriminator="type"),
]
BROWSER_COMMANDS: TypeAdapter[BrowserCommand] = TypeAdapter(BrowserCommand)


def parse_command(data: str | bytes) -> BrowserCommand:
    """Validate one browser message; raise shared.errors.MessageError with the reason."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return decode(BROWSER_COMMANDS, raw, MAX_COMMAND_BYTES)


def error(detail: str) -> Push:
    return {"type": "error", "detail": detail}


# --- pushes: server -> browser ----------------------------------------------------------------


def cp_view(update: CPStateUpdate, mine_cp: str | None) -> Push:
    """What a driver may see of a CP: never another driver's id or figures.

    `mine_cp` is the CP of the driver's own supply (its room knows it from its sealed updates;
    the public state topic does not say who is charging)."""
    return {
        "cp_id": update.cp_id,
        "location": update.location,
        "price_eur_kwh": update.price_eur_kwh,
        "max_kw": update.max_kw,
        "state": update.state.value,
        "colour": STATE_COLOURS[update.state],
        "available": update.state is CPState.ACTIVADO and not update.reserved,
        "reserved": update.reserved,
        "mine": update.cp_id == mine_cp,
        "speed": update.speed,
        "stop_reason": update.stop_reason,  # why a PARADO CP is out of service
    }


def cps_push(states: dict[str, CPStateUpdate], mine_cp: str | None) -> Push:
    return {"type": "cps", "cps": [cp_view(states[k], mine_cp) for k in sorted(states)]}


def ticket_view(ticket: TicketData) -> Push:
    return {
        "session_id": ticket.session_id,
        "cp_id": ticket.cp_id,
        "kwh": ticket.kwh,
        "price_eur_kwh": ticket.price_eur_kwh,
        "amount_eur": ticket.amount_eur,
        "reason": ticket.reason.value,
        "started_at": ticket.started_at,
        "ended_at": ticket.ended_at,
        "revision": ticket.revision,
    }


def history_push(history: DriverHistory) -> Push:
    return {
        "type": "history",
        "balance_eur": history.balance_eur,
        "tickets": [ticket_view(t) for t in history.tickets],
    }


def balance_push(balance_eur: float | None) -> Push:
    return {"type": "balance", "balance_eur": balance_eur}


SupplyPhase = Literal[
    "requested", "accepted", "authorized", "supplying", "ended", "denied", "failed"
]
ACTIVE_PHASES = ("requested", "accepted", "authorized", "supplying")


@dataclass
class SupplyView:
    """The supply panel of one driver: the request or session followed now, or the last one."""

    cp_id: str
    phase: SupplyPhase
    since: float  # when the request was sent (or the session first seen)
    session_id: str | None = None
    price_eur_kwh: float | None = None
    expires_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    kw: float = 0.0
    kwh: float = 0.0
    amount_eur: float = 0.0
    detail: str = ""
    points: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=MAX_POINTS))

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    def as_json(self, now: float) -> Push:
        return {
            "cp_id": self.cp_id,
            "phase": self.phase,
            "active": self.active,
            "session_id": self.session_id,
            "since": self.since,
            "price_eur_kwh": self.price_eur_kwh,
            "expires_at": self.expires_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "kw": self.kw,
            "kwh": self.kwh,
            "amount_eur": self.amount_eur,
            "detail": self.detail,
            "points": [[round(t, 3), v] for t, v in self.points],
            "now": now,
        }


_FOLLOW_PHASES: dict[FlowPhase, SupplyPhase] = {
    FlowPhase.REQUESTED: "requested",
    FlowPhase.ACCEPTED: "accepted",
    FlowPhase.AUTHORIZED: "authorized",
    FlowPhase.SUPPLYING: "supplying",
    FlowPhase.DONE: "ended",
}


class SupplyPanel:
    """Turns the flow's events into the supply panel's state and the pushes that show it."""

    def __init__(self) -> None:
        self.view: SupplyView | None = None
        self.last_ticket: Push | None = None

    def snapshot(self, now: float | None = None) -> Push:
        now = time.time() if now is None else now
        return {"type": "supply", "supply": self.view.as_json(now) if self.view else None}

    def apply(self, event: Event, now: float | None = None) -> list[Push]:
        now = time.time() if now is None else now
        view = self.view
        if isinstance(event, Requested):
            self.view = SupplyView(event.cp_id, "requested", now)
            return [self.snapshot(now)]
        if isinstance(event, Following):
            s = event.session
            phase = _FOLLOW_PHASES[phase_of(s)]
            self.view = SupplyView(
                s.cp_id, phase, now, s.session_id, kw=s.kw, kwh=s.kwh, amount_eur=s.amount_eur
            )
            if phase == "supplying":
                self.view.started_at = now
                self.view.points.append((now, s.kwh))
            return [self.snapshot(now)]
        if isinstance(event, Available):
            return []
        if isinstance(event, Notice):
            return [{"type": "notice", "level": event.level, "text": event.text}]
        if isinstance(event, TicketShown):
            return self._ticket(event, now)
        if isinstance(event, Failure):
            pushes: list[Push] = [{"type": "notice", "level": "error", "text": event.text}]
            if view is not None and view.active and event.cp_id == view.cp_id:
                view.phase, view.detail, view.ended_at = "failed", event.text, now
                pushes.insert(0, self.snapshot(now))
            return pushes
        if view is None or event.cp_id != view.cp_id:
            return []
        if isinstance(event, Accepted):
            view.phase, view.session_id = "accepted", event.session_id
        elif isinstance(event, Denied):
            view.phase, view.ended_at = "denied", now
            view.detail = event.reason + (f": {event.detail}" if event.detail else "")
        elif view.session_id != event.session_id:
            return []
        elif isinstance(event, Authorized):
            if view.phase in ("requested", "accepted"):
                view.phase = "authorized"
            view.price_eur_kwh, view.expires_at = event.price_eur_kwh, event.expires_at
        elif isinstance(event, Started):
            view.phase, view.started_at = "supplying", view.started_at or now
            view.points.append((now, view.kwh))
        else:
            assert isinstance(event, Telemetry)
            changed = view.phase != "supplying"
            view.phase, view.started_at = "supplying", view.started_at or now
            view.kw, view.kwh, view.amount_eur = event.kw, event.kwh, event.amount_eur
            view.points.append((now, event.kwh))
            if changed:
                return [self.snapshot(now)]
            return [
                {
                    "type": "progress",
                    "session_id": event.session_id,
                    "kw": event.kw,
                    "kwh": event.kwh,
                    "amount_eur": event.amount_eur,
                    "t": now,
                }
            ]
        return [self.snapshot(now)]

    def _ticket(self, event: TicketShown, now: float) -> list[Push]:
        ticket = event.ticket
        data = ticket_view(ticket)
        pushes: list[Push] = []
        view = self.view
        if view is not None and view.session_id == ticket.session_id:
            if view.active or event.kind is TicketKind.CURRENT:
                view.phase = "ended"
            view.kwh, view.amount_eur, view.kw = ticket.kwh, ticket.amount_eur, 0.0
            view.price_eur_kwh = ticket.price_eur_kwh
            view.ended_at, view.detail = ticket.ended_at, ticket.reason.value
            if ticket.started_at is not None:
                view.started_at = ticket.started_at
            view.points.append((now, ticket.kwh))
            pushes.append(self.snapshot(now))
        self.last_ticket = {"type": "ticket", "kind": event.kind.value, "ticket": data}
        pushes.append(self.last_ticket)
        return pushes


# --- a file of requests -----------------------------------------------------------------------

ItemStatus = Literal[
    "pending",
    "requested",
    "accepted",
    "authorized",
    "supplying",
    "ticket",
    "denied",
    "error",
    "cancelled",
]
FINAL_STATUSES = ("ticket", "denied", "error", "cancelled")


@dataclass
class RunItem:
    cp_id: str
    status: ItemStatus = "pending"
    detail: str = ""
    request_id: str | None = None
    session_id: str | None = None
    kwh: float | None = None
    amount_eur: float | None = None
    sent_at: float | None = None
    done_at: float | None = None

    def as_json(self) -> Push:
        return {
            "cp_id": self.cp_id,
            "status": self.status,
            "detail": self.detail,
            "kwh": self.kwh,
            "amount_eur": self.amount_eur,
            "sent_at": self.sent_at,
            "done_at": self.done_at,
        }


@dataclass
class FileRun:
    """The queue of an uploaded requests file and each request's outcome."""

    name: str
    items: list[RunItem]
    problems: list[str] = field(default_factory=list)
    state: Literal["running", "done", "cancelled"] = "running"
    next_at: float | None = None  # when the next request goes out (the pause between two)

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def as_push(self) -> Push:
        return {
            "type": "run",
            "run": {
                "name": self.name,
                "state": self.state,
                "next_at": self.next_at,
                "problems": self.problems,
                "items": [item.as_json() for item in self.items],
            },
        }

    def cancel(self) -> None:
        self.state = "cancelled"
        self.next_at = None
        for item in self.items:
            if item.status == "pending":
                item.status = "cancelled"

    def apply(self, event: Event, now: float | None = None) -> bool:
        """Update the item an event is about; True when something changed."""
        now = time.time() if now is None else now
        item = self._item_for(event)
        if item is None:
            return False
        if isinstance(event, Accepted):
            item.status, item.session_id = "accepted", event.session_id
        elif isinstance(event, Denied):
            item.status = "denied"
            item.detail = event.reason + (f": {event.detail}" if event.detail else "")
            item.done_at = now
        elif isinstance(event, Authorized):
            if item.status in ("requested", "accepted"):
                item.status = "authorized"
        elif isinstance(event, Started | Telemetry):
            if isinstance(event, Telemetry):
                item.kwh, item.amount_eur = event.kwh, event.amount_eur
            if item.status == "supplying" and isinstance(event, Telemetry):
                return False  # the queue shows outcomes; the supply panel shows live figures
            item.status = "supplying"
        elif isinstance(event, TicketShown):
            t = event.ticket
            item.status, item.detail, item.done_at = "ticket", t.reason.value, now
            item.kwh, item.amount_eur = t.kwh, t.amount_eur
        elif isinstance(event, Failure):
            item.status, item.detail, item.done_at = "error", event.text, now
        else:
            return False
        return True

    def _item_for(self, event: Event) -> RunItem | None:
        if isinstance(event, Accepted | Denied):
            return next((i for i in self.items if i.request_id == event.request_id), None)
        if isinstance(event, TicketShown):
            session_id: str | None = event.ticket.session_id
        elif isinstance(event, Authorized | Started | Telemetry | Failure):
            session_id = event.session_id
        else:
            return None
        if isinstance(event, Failure) and session_id is None:
            # A failure before acceptance (no answer) concerns the request being sent.
            return next((i for i in self.items if i.status == "requested"), None)
        return next((i for i in self.items if session_id and i.session_id == session_id), None)
