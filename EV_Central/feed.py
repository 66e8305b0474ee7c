"""What changed in Central, for everyone who shows it or passes it on.

Three kinds of change: a CP's state (coalesced for 50 ms, then pushed to the subscribers and
published on the compacted CP-state topic), an event for the log (the admin panel's and the
console's), and "sessions changed" (balances and session lists may be stale). Parts that show
these subscribe in their constructors; the parts that make changes call `changed`, `note` and
`sessions_changed`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from EV_Central.clocks import Hops
from EV_Central.registry import ChargingPoint, Registry
from shared.bus import KafkaBus, Topics

log = logging.getLogger(__name__)

COALESCE_SECONDS = 0.05
EVENTS_KEPT = 200


@dataclass(frozen=True)
class CentralEvent:
    ts: float
    kind: str
    text: str
    cp_id: str | None = None
    driver_id: str | None = None

    def as_api(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "kind": self.kind,
            "text": self.text,
            "cp_id": self.cp_id,
            "driver_id": self.driver_id,
        }


class Feed:
    def __init__(self, registry: Registry, bus: KafkaBus) -> None:
        self._registry = registry
        self._bus = bus
        self.events: collections.deque[CentralEvent] = collections.deque(maxlen=EVENTS_KEPT)
        self._cp_subscribers: list[Callable[[list[ChargingPoint]], None]] = []
        self._event_subscribers: list[Callable[[CentralEvent], None]] = []
        self._session_subscribers: list[Callable[[], None]] = []
        self._dirty: set[str] = set()
        self._dirty_wake = asyncio.Event()
        self._dirty_since = 0.0  # when the oldest unpublished change was made (monotonic)
        # Where the time from a change to its publication is counted (EV_Central/clocks.py).
        self.hops: Hops | None = None

    # --- subscribing -------------------------------------------------------------------------

    def on_cps(self, subscriber: Callable[[list[ChargingPoint]], None]) -> None:
        """Call `subscriber` with the CPs whose state changed (coalesced)."""
        self._cp_subscribers.append(subscriber)

    def on_event(self, subscriber: Callable[[CentralEvent], None]) -> None:
        self._event_subscribers.append(subscriber)

    def on_sessions(self, subscriber: Callable[[], None]) -> None:
        self._session_subscribers.append(subscriber)

    # --- reporting changes ----------------------------------------------------------------------

    def note(
        self, kind: str, text: str, cp_id: str | None = None, driver_id: str | None = None
    ) -> None:
        event = CentralEvent(time.time(), kind, text, cp_id, driver_id)
        self.events.append(event)
        log.info("%s", text)
        for subscriber in self._event_subscribers:
            subscriber(event)

    def sessions_changed(self) -> None:
        for subscriber in self._session_subscribers:
            subscriber()

    def changed(self, cp: ChargingPoint) -> None:
        """Mark a CP as changed: its state is published and pushed shortly, coalesced."""
        if not self._dirty:
            self._dirty_since = time.monotonic()
        self._dirty.add(cp.id)
        self._dirty_wake.set()

    def changed_all(self) -> None:
        for cp in self._registry.sorted():
            self.changed(cp)

    async def run(self) -> None:
        """Push and publish coalesced CP changes until cancelled."""
        while True:
            await self._dirty_wake.wait()
            await asyncio.sleep(COALESCE_SECONDS)  # coalesce bursts into one push
            self._dirty_wake.clear()
            ids, self._dirty, since = self._dirty, set(), self._dirty_since
            cps = [cp for cp_id in sorted(ids) if (cp := self._registry.get(cp_id))]
            for subscriber in self._cp_subscribers:
                subscriber(cps)
            for cp in cps:
                if self._registry.get(cp.id) is cp:  # not deregistered meanwhile (tombstoned)
                    await self._bus.post(Topics.CP_STATE, cp.id, cp.state_message())
            if self.hops is not None and cps:
                self.hops.add("Central → dashboards", time.monotonic() - since)
