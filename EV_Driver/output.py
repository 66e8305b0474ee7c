"""What the driver sees: short human lines, or one JSON object a line with --json.

The renderers are pure (event in, text out); `Output` writes and flushes a line at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

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
)
from shared.messages import DenialReason, TicketData

# Why Central denied a request, in words. The reason code follows in parentheses, so that the
# line can still be searched for; a reason newer than this table is shown as its code alone.
DENIAL_TEXT: dict[str, str] = {
    DenialReason.UNKNOWN_DRIVER: "Central does not know this driver",
    DenialReason.UNKNOWN_CP: "there is no such charging point",
    DenialReason.CP_UNAVAILABLE: "the charging point is not available",
    DenialReason.INSUFFICIENT_BALANCE: "the balance is too low",
    DenialReason.DRIVER_BUSY: "you already have a supply in progress",
    DenialReason.REQUEST_EXPIRED: "the request was too old when Central read it",
    DenialReason.CP_REFUSED: "the charging point refused the authorisation",
    DenialReason.CP_NO_ANSWER: "the charging point did not answer in time",
}


class Symbols:
    """Pictograms for a UTF-8 terminal, with plain fallbacks for anything else."""

    def __init__(self, unicode: bool = True) -> None:
        self.arrow = "→" if unicode else "->"
        self.ok = "✓" if unicode else "+"
        self.fail = "✗" if unicode else "x"
        self.times = "×" if unicode else "x"
        self.ellipsis = "…" if unicode else "..."
        self.euro = "€" if unicode else "EUR"

    @classmethod
    def for_stream(cls, stream: TextIO) -> Symbols:
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            "→✓✗×…€".encode(encoding)
        except (UnicodeEncodeError, LookupError):
            return cls(unicode=False)
        return cls(unicode=True)


def iso_utc(ts: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC, e.g. 2025-01-31T10:00:00.000Z."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def price(value: float) -> str:
    """A price with two decimals, or up to four when it has them (0.345)."""
    if round(value, 2) == value:
        return f"{value:.2f}"
    return f"{value:.4f}".rstrip("0")


def short_id(session_id: str, symbols: Symbols) -> str:
    return session_id if len(session_id) <= 8 else session_id[:8] + symbols.ellipsis


def denial_line(reason: str, detail: str) -> str:
    """`the charging point is not available (cp_unavailable: CP001 is PARADO)`."""
    text = DENIAL_TEXT.get(reason)
    if text is None:  # a reason newer than this app: show it as it came
        return f"{reason} ({detail})" if detail else reason
    return f"{text} ({reason}: {detail})" if detail else f"{text} ({reason})"


def ticket_line(ticket: TicketData, symbols: Symbols) -> str:
    e = symbols.euro
    return (
        f"{ticket.cp_id} {ticket.kwh:.4f} kWh {symbols.times} {price(ticket.price_eur_kwh)} "
        f"{e}/kWh = {ticket.amount_eur:.2f} {e} ({ticket.reason.value})"
    )


def human_lines(event: Event, symbols: Symbols) -> list[str]:
    """The lines a person sees for an event."""
    s = symbols
    if isinstance(event, Requested):
        return [f"{s.arrow} request {event.cp_id}"]
    if isinstance(event, Available):
        if not event.cps:
            return ["no charging point is available right now"]
        width = max(len(cp.cp_id) for cp in event.cps)
        lines = [f"available charging points ({len(event.cps)}):"]
        lines += [
            f"  {cp.cp_id:<{width}}  {price(cp.price_eur_kwh)} {s.euro}/kWh  {cp.location}"
            for cp in event.cps
        ]
        return lines
    if isinstance(event, Accepted):
        # Central's checks passed; the CP itself has still to authorise.
        short = short_id(event.session_id, s)
        return [f"{s.ok} accepted: asking {event.cp_id} to authorise (session {short})"]
    if isinstance(event, Denied):
        return [f"{s.fail} denied: {denial_line(event.reason, event.detail)}"]
    if isinstance(event, Authorized):
        return [
            f"authorised at {event.cp_id} ({price(event.price_eur_kwh)} {s.euro}/kWh): plug in now"
        ]
    if isinstance(event, Started):
        return ["supply started"]
    if isinstance(event, Telemetry):
        return [f"  {event.kw:.2f} kW  {event.kwh:.4f} kWh  {event.amount_eur:.2f} {s.euro}"]
    if isinstance(event, TicketShown):
        ticket = event.ticket
        if event.kind is TicketKind.AWAY:
            label = "ticket (while you were away)"
        elif event.kind is TicketKind.CORRECTION:
            label = f"corrected ticket (revision {ticket.revision})"
        else:
            label = "ticket"
        return [f"{label}: {ticket_line(ticket, s)}"]
    if isinstance(event, Following):
        session = event.session
        return [
            f"following your supply at {session.cp_id} (session "
            f"{short_id(session.session_id, s)}, {session.status}): {session.kw:.2f} kW  "
            f"{session.kwh:.4f} kWh  {session.amount_eur:.2f} {s.euro}"
        ]
    if isinstance(event, Notice):
        if event.level == "warning":
            return [f"warning: {event.text}"]
        prefix = f"{s.fail} " if event.level == "error" else ""
        return [f"{prefix}notice: {event.text}"]
    assert isinstance(event, Failure)
    return [f"{s.fail} {event.text}"]


def json_object(event: Event) -> dict[str, Any] | None:
    """The JSON object for an event, or None when --json does not show it."""
    if isinstance(event, Requested):
        return None
    if isinstance(event, TicketShown):
        t = event.ticket
        return {
            "event": "ticket",
            "session_id": t.session_id,
            "cp_id": t.cp_id,
            "driver_id": t.driver_id,
            "kwh": t.kwh,
            "price_eur_kwh": t.price_eur_kwh,
            "amount_eur": t.amount_eur,
            "reason": t.reason.value,
            "started_at": iso_utc(t.started_at),
            "ended_at": iso_utc(t.ended_at),
            "revision": t.revision,
        }
    if isinstance(event, Available):
        return {
            "event": "available",
            "driver_id": event.driver_id,
            "cp_id": None,
            "session_id": None,
            "cps": [
                {
                    "cp_id": cp.cp_id,
                    "location": cp.location,
                    "price_eur_kwh": cp.price_eur_kwh,
                    "state": cp.state.value,
                }
                for cp in event.cps
            ],
        }
    if isinstance(event, Accepted):
        return _base("accepted", event.driver_id, event.cp_id, event.session_id) | {
            "request_id": event.request_id
        }
    if isinstance(event, Denied):
        return _base("denied", event.driver_id, event.cp_id, None) | {
            "request_id": event.request_id,
            "reason": event.reason,
            "detail": event.detail,
        }
    if isinstance(event, Authorized):
        return _base("authorized", event.driver_id, event.cp_id, event.session_id) | {
            "price_eur_kwh": event.price_eur_kwh,
            "expires_at": iso_utc(event.expires_at),
        }
    if isinstance(event, Started):
        return _base("started", event.driver_id, event.cp_id, event.session_id)
    if isinstance(event, Telemetry):
        return _base("telemetry", event.driver_id, event.cp_id, event.session_id) | {
            "kw": event.kw,
            "kwh": event.kwh,
            "amount_eur": event.amount_eur,
        }
    if isinstance(event, Following):
        session = event.session
        return _base("notice", event.driver_id, session.cp_id, session.session_id) | {
            "level": "info",
            "text": f"following the supply in progress ({session.status})",
            "status": session.status,
            "kw": session.kw,
            "kwh": session.kwh,
            "amount_eur": session.amount_eur,
        }
    if isinstance(event, Notice):
        return _base("notice", event.driver_id, event.cp_id, event.session_id) | {
            "level": event.level,
            "text": event.text,
        }
    assert isinstance(event, Failure)
    return _base("error", event.driver_id, event.cp_id, event.session_id) | {"message": event.text}


def _base(name: str, driver_id: str, cp_id: str | None, session_id: str | None) -> dict[str, Any]:
    return {"event": name, "driver_id": driver_id, "cp_id": cp_id, "session_id": session_id}


class Output:
    """Writes events to stdout (or another stream), flushed a line at a time."""

    def __init__(self, json_mode: bool = False, stream: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self._stream = sys.stdout if stream is None else stream
        self.symbols = Symbols.for_stream(self._stream)
        self._closed = False

    def emit(self, event: Event) -> None:
        if self.json_mode:
            obj = json_object(event)
            if obj is not None:
                self._write(json.dumps(obj, separators=(",", ":")))
        else:
            for line in human_lines(event, self.symbols):
                self._write(line)

    def _write(self, line: str) -> None:
        if self._closed:
            return
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): keep running quietly, as the supply goes on.
            self._closed = True
            if self._stream is sys.stdout:
                with contextlib.suppress(OSError):
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, sys.stdout.fileno())
