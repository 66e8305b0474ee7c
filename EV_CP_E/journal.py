"""The engine's journal (--journal): what it must not lose when it dies.

Two things live only in the engine's memory: the supply in hand (how much energy it has
delivered) and the events Kafka has not taken yet (a supply's final figures, kept back while
Kafka is away). A kill -9 or a crash would lose both, and Central would settle on the last
sample it happened to have. The journal keeps them in a small JSON file, rewritten whole
(written beside, flushed to disk, renamed over) whenever they change: a tick, an event queued,
an event Kafka took. An engine that starts with a journal sends what it held again: the events
Kafka had not taken, then the end of a supply it was in the middle of, as `engine_fault` with
the energy it had metered. Central settles the session with it, or corrects a ticket it settled
without it; copies of events that did arrive change nothing (Central skips an id it has seen).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from EV_CP_E.machine import amount
from shared.errors import MessageError
from shared.messages import CP_EVENTS, CPRequest, CPSupplyEnded, EndReason, Message, decode

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class Held:
    """The authorisation or supply the engine had in hand."""

    session_id: str
    driver_id: str
    price_eur_kwh: float
    kwh: float
    started_at: float | None  # None until Central started the supply


@dataclass(frozen=True)
class Recovered:
    """What a journal holds for the engine to send again, once it knows it is `cp_id`."""

    cp_id: str
    events: list[Message]  # in order: Kafka had not taken them, or they end what was held
    ended: CPSupplyEnded | None  # the end made here for the supply in hand, if any
    driver_id: str | None  # that supply's driver (for the ledger)


class Journal:
    """One engine's journal file. Writing is synchronous, on the event loop: the file is a few
    hundred bytes, and being on disk before anything is sent is the point."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._temporary = path.with_name(path.name + ".tmp")
        self._failed = False

    def save(self, cp_id: str | None, held: Held | None, pending: Sequence[Message]) -> None:
        """Replace the journal with this state (an empty one when there is nothing to keep)."""
        state = {
            "format": FORMAT,
            "cp_id": cp_id,
            "held": asdict(held) if held is not None else None,
            "pending": [json.loads(message.model_dump_json()) for message in pending],
        }
        data = json.dumps(state, separators=(",", ":")).encode()
        try:
            with self._temporary.open("wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(self._temporary, self.path)
        except OSError as exc:
            if not self._failed:
                log.warning(
                    "cannot write the journal %s (%s): a crash now would lose what it holds",
                    self.path,
                    exc.strerror or exc,
                )
            self._failed = True
            return
        if self._failed:
            log.info("the journal %s is written again", self.path)
            self._failed = False

    def load(self) -> Recovered | None:
        """What the last run left to send, or None (no journal, nothing in it, or unreadable:
        said in the log, and the file is kept aside as PATH.unreadable)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the journal %s: %s", self.path, exc.strerror or exc)
            return None
        try:
            return recover(json.loads(data))
        except (ValueError, TypeError, KeyError, MessageError) as exc:
            aside = self.path.with_name(self.path.name + ".unreadable")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.warning("the journal %s is unreadable (%s): kept as %s", self.path, exc, aside)
            return None


def recover(state: dict[str, object]) -> Recovered | None:
    """The events to send again from a journal's state: the pending ones (but a request made at
    the menu, which is for whoever stands there now to make again), then the end of the supply
    in hand, unless its end is among them."""
    if state.get("format") != FORMAT:
        raise ValueError(f"format {state.get('format')!r}, expected {FORMAT}")
    cp_id = state.get("cp_id")
    raw_pending = state.get("pending")
    if not isinstance(raw_pending, list):
        raise ValueError("no list of pending events")
    pending: list[Message] = [decode(CP_EVENTS, json.dumps(item).encode()) for item in raw_pending]
    events = [event for event in pending if not isinstance(event, CPRequest)]
    raw_held = state.get("held")
    held = Held(**raw_held) if isinstance(raw_held, dict) else None
    ended = None
    if held is not None and isinstance(cp_id, str):
        already = any(
            isinstance(e, CPSupplyEnded) and e.session_id == held.session_id for e in events
        )
        if not already:
            ended = CPSupplyEnded(
                cp_id=cp_id,
                session_id=held.session_id,
                kwh=held.kwh,
                amount_eur=amount(held.kwh, held.price_eur_kwh),
                reason=EndReason.ENGINE_FAULT,
                started_at=held.started_at,
            )
            events.append(ended)
    if not isinstance(cp_id, str) or not events:
        return None
    return Recovered(
        cp_id=cp_id,
        events=events,
        ended=ended,
        driver_id=held.driver_id if held is not None else None,
    )
