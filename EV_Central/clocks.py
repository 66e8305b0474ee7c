"""Every clock Central hears from, measured against the network's, and where time goes.

The reference is the network's clock: the brokers', which stamp each record when they append it
(shared/clock.py). Central measures itself against it with probes, each monitor with the round
trips of the link on :5000, each engine through its monitor's health checks, and each driver app
and engine from the timestamps of its Kafka messages. An offset of +60 s is a clock a minute
ahead. One crossing `SKEW_WARNING_S` is logged, noted on the admin panel's feed and audited once;
the panel lists those off and the furthest off (EV_Central/web.py, the `clocks` part of the
status), /metrics every one.

`Hops` keeps the last minute of each hop's times (driver -> Central, Central -> engine,
engine -> Central, Central -> dashboards), measured with these offsets, for the panel.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from shared.clock import (
    PROBE_INTERVAL,
    SKEW_WARNING_S,
    NetworkClock,
    OffsetEstimate,
    describe,
    ntp_offset4,
)

# Peers not heard from for this long are left off the panel.
FORGET_AFTER_S = 600.0
# At most this many peers are kept (the oldest heard from goes first).
MAX_PEERS = 20_000
# The panel lists this many peers: those off first, then the furthest from the network's clock
# (with 10,000 CPs, every clock would be 20,000 rows pushed every 2 s); /metrics has them all.
PANEL_PEERS = 50
# Each hop's times are kept this long, and at most this many (the newest): the panel sorts them
# every 2 s.
HOP_WINDOW_S = 60.0
HOP_KEPT = 10_000
HOPS = ("driver → Central", "Central → engine", "engine → Central", "Central → dashboards")

Warn = Callable[[str, str, str], Coroutine[Any, Any, None]]  # (kind, id, text)
# When a CP's monitor last spoke to Central (time.time()), or None: the registry knows it.
LastHeard = Callable[[str], float | None]


@dataclass
class PeerClock:
    kind: str  # "monitor", "engine", "driver"
    id: str
    via: str  # how it is measured: "round trips", "monitor", "kafka"
    estimate: OffsetEstimate
    warned: bool = False
    seen: float = field(default_factory=time.monotonic)  # when last measured

    def age(self, last_heard: LastHeard | None) -> float:
        """Seconds since the peer was last heard from: a CP's monitor and engine by the
        monitor's last heartbeat (most carry no measurement), a driver by its last message."""
        measured = time.monotonic() - self.seen
        heard = last_heard(self.id) if last_heard is not None and self.kind != "driver" else None
        return measured if heard is None else min(measured, max(0.0, time.time() - heard))

    def as_api(self, central_offset: float, age: float) -> dict[str, Any]:
        own = self.estimate.offset
        offset = None if own is None else own + central_offset
        best = self.estimate.best()
        return {
            "kind": self.kind,
            "id": self.id,
            "via": self.via,
            "offset_s": None if offset is None else round(offset, 3),
            "round_trip_ms": round(best.spread * 1000, 1) if best and best.spread else None,
            "age_s": round(age, 1),
            "warning": offset is not None and abs(offset) >= SKEW_WARNING_S,
        }


class Hops:
    """The times each hop took over the last minute."""

    def __init__(self) -> None:
        self._times: dict[str, deque[tuple[float, float]]] = {h: deque() for h in HOPS}

    def add(self, hop: str, seconds: float) -> None:
        times = self._times[hop]
        now = time.monotonic()
        times.append((now, max(0.0, seconds)))
        while times and now - times[0][0] > HOP_WINDOW_S:
            times.popleft()
        if len(times) > HOP_KEPT:
            times.popleft()

    def as_api(self) -> list[dict[str, Any]]:
        rows = []
        now = time.monotonic()
        for hop, times in self._times.items():
            while times and now - times[0][0] > HOP_WINDOW_S:
                times.popleft()
            values = sorted(t for _, t in times)
            rows.append(
                {
                    "hop": hop,
                    "n": len(values),
                    "p50_ms": _ms(_quantile(values, 0.5)),
                    "p95_ms": _ms(_quantile(values, 0.95)),
                    "last_ms": _ms(times[-1][1]) if times else None,
                }
            )
        return rows


class Clocks:
    """Central's own offset (a NetworkClock) and its peers', relative to Central's clock."""

    def __init__(
        self,
        network: NetworkClock | None = None,
        warn: Warn | None = None,
        last_heard: LastHeard | None = None,
    ) -> None:
        """Without `network` Central's own offset is taken as 0 (tests of single parts)."""
        self.network = network if network is not None else NetworkClock(_no_probe, who="Central")
        self.hops = Hops()
        self._warn = warn
        self._last_heard = last_heard
        self._peers: dict[tuple[str, str], PeerClock] = {}
        self._central_warned = False
        self._warnings: set[asyncio.Task[None]] = set()  # warnings being logged and audited

    async def run(self, interval: float = PROBE_INTERVAL) -> None:
        """Measure Central's own clock now and every `interval` s (each second until the
        first answer); a warning when it is off, once."""
        while True:
            await self.network.measure()
            offset = self.network.offset
            if offset is not None and self.network.warned != self._central_warned:
                self._central_warned = self.network.warned
                if self._central_warned and self._warn is not None:
                    text = f"Central's own clock is {describe(offset)} the network's"
                    await self._warn("central", "Central", text)
            await asyncio.sleep(interval if offset is not None else 1.0)

    # --- Central's own clock ------------------------------------------------------------------

    @property
    def central_offset(self) -> float:
        """Central's clock minus the network's (0 until measured)."""
        return self.network.offset or 0.0

    def central_time(self, network_time: float) -> float:
        """A time on the network's clock (a broker's stamp), on Central's clock."""
        return network_time + self.central_offset

    # --- peers ------------------------------------------------------------------------------

    def _peer(
        self, kind: str, peer_id: str, via: str, *, one_way: bool = False, kept: int = 16
    ) -> PeerClock:
        """The peer's record, new (or renewed, when measured another way from now on)."""
        key = (kind, peer_id)
        peer = self._peers.get(key)
        if peer is None or peer.via != via:
            if peer is None and len(self._peers) >= MAX_PEERS:
                self._peers.pop(next(iter(self._peers)))
            renewed = PeerClock(kind, peer_id, via, OffsetEstimate(kept=kept, one_way=one_way))
            renewed.warned = peer.warned if peer is not None else False
            peer = self._peers[key] = renewed
        peer.seen = time.monotonic()
        return peer

    def from_kafka(self, kind: str, peer_id: str, sent: float, stamped: float | None) -> None:
        """A message a peer stamped `sent` (its clock) that the broker appended at `stamped`."""
        if stamped is None:
            return
        key = (kind, peer_id)
        if kind == "engine" and key in self._peers and self._peers[key].via == "monitor":
            self._peers[key].seen = time.monotonic()
            return  # the monitor's round trips measure it better
        peer = self._peer(kind, peer_id, "kafka", one_way=True)
        # Relative to Central's clock, like the round-trip measurements.
        peer.estimate.add(sent - self.central_time(stamped))
        self._check(peer)

    def from_monitor(self, cp_id: str, t1: float, t2: float, t3: float, t4: float) -> float | None:
        """One NTP exchange on a monitor link: `t1` Central's probe, `t2` the monitor got it,
        `t3` it sent the heartbeat that answers it, `t4` Central got that."""
        offset, trip = ntp_offset4(t1, t2, t3, t4)
        if trip > 10.0:
            return None  # an answer to a probe long gone: says nothing useful
        # A probe every 30 heartbeats: the last four are two minutes of them.
        peer = self._peer("monitor", cp_id, "round trips", kept=4)
        peer.estimate.add(offset, trip)
        self._check(peer)
        return offset

    def engine_via_monitor(self, cp_id: str, engine_vs_monitor: float, trip: float) -> None:
        """The monitor's measurement of its engine, added to Central's of the monitor."""
        monitor = self._peers.get(("monitor", cp_id))
        if monitor is None or monitor.estimate.offset is None:
            return
        peer = self._peer("engine", cp_id, "monitor")
        peer.estimate.add(monitor.estimate.offset + engine_vs_monitor, trip)
        self._check(peer)

    def offset_of(self, kind: str, peer_id: str) -> float | None:
        """A peer's clock minus Central's, when measured."""
        peer = self._peers.get((kind, peer_id))
        return peer.estimate.offset if peer is not None else None

    def sent_at(self, kind: str, peer_id: str, sent: float) -> float:
        """A time a peer wrote with its clock, on Central's (as it is when not measured)."""
        return sent - (self.offset_of(kind, peer_id) or 0.0)

    def monitor_offset_network(self, cp_id: str) -> float | None:
        own = self.offset_of("monitor", cp_id)
        return None if own is None else own + self.central_offset

    def _check(self, peer: PeerClock) -> None:
        own = peer.estimate.offset
        if own is None:
            return
        offset = own + self.central_offset
        off = abs(offset) >= SKEW_WARNING_S
        if off != peer.warned:
            peer.warned = off
            if off and self._warn is not None:
                text = f"the clock of {peer.kind} {peer.id} is {describe(offset)} the network's"
                task = asyncio.get_running_loop().create_task(
                    self._warn(peer.kind, peer.id, text), name="clock-warning"
                )
                self._warnings.add(task)
                task.add_done_callback(self._warnings.discard)

    # --- for the panel and /metrics -----------------------------------------------------------

    def as_api(self, limit: int | None = None) -> dict[str, Any]:
        """Central's offset, the peers' (the `limit` furthest off, or all), and the hops.

        `peers_measured` counts every peer and `peers_off` those at or beyond the threshold,
        whether listed or not. With a limit the list is the peers off first, then the largest
        offsets; without one it is every peer by kind and id.
        """
        ages = {key: peer.age(self._last_heard) for key, peer in self._peers.items()}
        for key in [k for k, age in ages.items() if age > FORGET_AFTER_S]:
            del self._peers[key]
        central = self.network.offset
        trip = self.network.round_trip
        if limit is None:
            listed = sorted(self._peers.values(), key=lambda p: (p.kind, p.id))
        else:
            shift = self.central_offset
            listed = heapq.nsmallest(
                limit, self._peers.values(), key=lambda p: _furthest_first(p, shift)
            )
        return {
            "threshold_s": SKEW_WARNING_S,
            "central": {
                "offset_s": None if central is None else round(central, 3),
                "round_trip_ms": None if trip is None else round(trip * 1000, 1),
                "warning": central is not None and abs(central) >= SKEW_WARNING_S,
            },
            "peers": [p.as_api(self.central_offset, ages[(p.kind, p.id)]) for p in listed],
            "peers_measured": len(self._peers),
            "peers_off": sum(1 for p in self._peers.values() if p.warned),
            "hops": self.hops.as_api(),
        }


def _furthest_first(peer: PeerClock, central_offset: float) -> tuple[bool, float, str, str]:
    """Sort key: peers off first, then the furthest from the network's clock, then those not
    measured yet."""
    own = peer.estimate.offset
    away = -abs(own + central_offset) if own is not None else 0.0
    return (not peer.warned, away, peer.kind, peer.id)


async def _no_probe() -> float | None:
    return None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
