"""Clocks across PCs: the network's clock, each process's offset to it, and skew warnings.

PC clocks drift or are set wrong, so no service decides anything from another PC's wall clock
(docs/operations.md, "Clocks"). Kafka gives the network one clock that every part can measure
itself against: the broker stamps every record of the project's topics with its own time when
it appends it (`message.timestamp.type=LogAppendTime`). A process measures its offset to that
clock like NTP does, with round trips: it sends a small probe to `ev.clock` and the broker's
answer carries the probe's append time, taken between the moment it was sent and the moment the
answer came back. The probe with the shortest round trip gives the best estimate.

Offsets are "clock minus the network's clock": +60 s is a clock a minute ahead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# A clock this far (or more) from the network's is shown as a warning.
SKEW_WARNING_S = 2.0
# How often a process measures its offset, and how many measurements it keeps.
PROBE_INTERVAL = 15.0
PROBES_KEPT = 8
FIRST_BURST = 4
# Record timestamp types (Kafka's): the producer's clock, or the broker's at append time.
LOG_APPEND_TIME = 1
# Round-trip samples further apart than this (and than their trips allow) mean a clock was set.
STEP_S = 0.5
FIX = "set the clock right: `timedatectl set-ntp true` (Linux) or `w32tm /resync` (Windows)"


def ntp_offset(sent: float, served: float, received: float) -> tuple[float, float]:
    """(offset, round trip) of a clock from one exchange: `sent` and `received` on our clock,
    `served` on the other's. The offset is ours minus theirs, accurate to half the round trip."""
    return (sent + received) / 2 - served, max(0.0, received - sent)


def ntp_offset4(t1: float, t2: float, t3: float, t4: float) -> tuple[float, float]:
    """NTP's four times: `t1` sent and `t4` answer received on our clock, `t2` received and
    `t3` answered on the other's. Returns (their clock minus ours, round trip on the wire)."""
    return ((t2 - t1) + (t3 - t4)) / 2, max(0.0, (t4 - t1) - (t3 - t2))


@dataclass
class Sample:
    offset: float
    spread: float  # the uncertainty: a round trip, or (one way) unknown and taken as 0
    at: float  # monotonic time it was taken


class OffsetEstimate:
    """An offset from a window of samples: the one with the smallest round trip wins.

    One-way samples (a sender's timestamp against the time the message arrived) are all late
    by their trip, so the earliest-arriving of them, the largest offset, is the best.
    """

    def __init__(self, kept: int = PROBES_KEPT, *, one_way: bool = False) -> None:
        self._samples: deque[Sample] = deque(maxlen=kept)
        self._one_way = one_way
        self._best: Sample | None = None  # of the samples as they are: asked for per message

    def add(self, offset: float, spread: float = 0.0) -> None:
        best = self.best()
        if best is not None and not self._one_way:
            # Two round-trip samples of one clock agree within half their trips: further apart,
            # the clock was set (stepped) in between, and the older samples are history.
            if abs(offset - best.offset) > max(STEP_S, (spread + best.spread) / 2):
                self._samples.clear()
        self._samples.append(Sample(offset, spread, time.monotonic()))
        if self._one_way:
            self._best = max(self._samples, key=lambda s: s.offset)
        else:
            self._best = min(self._samples, key=lambda s: s.spread)

    def best(self) -> Sample | None:
        return self._best

    @property
    def offset(self) -> float | None:
        best = self.best()
        return best.offset if best is not None else None

    @property
    def age(self) -> float | None:
        """Seconds since the newest sample."""
        return time.monotonic() - self._samples[-1].at if self._samples else None


def broker_time(record: Any) -> float | None:
    """When the broker appended a consumed record (its clock, seconds), or None when the
    record carries its producer's time instead (a topic not set to LogAppendTime)."""
    if getattr(record, "timestamp_type", None) != LOG_APPEND_TIME or record.timestamp < 0:
        return None
    return float(record.timestamp) / 1000.0


def describe(offset: float) -> str:
    """'12.3 s ahead of' / 'behind' the network's clock."""
    return f"{abs(offset):.1f} s {'ahead of' if offset > 0 else 'behind'}"


class NetworkClock:
    """This process's offset to the network's clock (the brokers'), measured with probes.

    `send` publishes one probe and returns its append time (seconds, the broker's clock);
    `warn` is told once when the offset crosses SKEW_WARNING_S, and once when it is back.
    Until the first probe comes back the offset is unknown and `now()` is this PC's clock.
    """

    def __init__(
        self,
        send: Callable[[], Any],
        *,
        who: str,
        warn: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._send = send
        self._who = who
        self._warn = warn
        self._clock = clock
        self.estimate = OffsetEstimate()
        self.warned = False

    @property
    def offset(self) -> float | None:
        """This clock minus the network's (seconds), or None before the first probe."""
        return self.estimate.offset

    @property
    def round_trip(self) -> float | None:
        best = self.estimate.best()
        return best.spread if best is not None else None

    def now(self) -> float:
        """The network's time now, as well as this process knows it."""
        return self._clock() - (self.offset or 0.0)

    def to_local(self, network_time: float) -> float:
        """A time on the network's clock, on this PC's clock."""
        return network_time + (self.offset or 0.0)

    async def probe(self) -> float:
        """Measure once; returns the offset (raises what the send raises)."""
        sent = self._clock()
        served = await self._send()
        received = self._clock()
        if served is None:
            raise ValueError("the broker did not stamp the probe (topic not on LogAppendTime)")
        offset, trip = ntp_offset(sent, served, received)
        self.estimate.add(offset, trip)
        self._check()
        return offset

    def _check(self) -> None:
        offset = self.offset
        if offset is None:
            return
        off = abs(offset) >= SKEW_WARNING_S
        if off and not self.warned:
            text = f"this PC's clock is {describe(offset)} the network's ({self._who}); {FIX}"
            log.warning("%s", text)
            if self._warn is not None:
                self._warn(text)
        elif not off and self.warned:
            text = f"this PC's clock agrees with the network's again ({offset:+.2f} s)"
            log.info("%s", text)
            if self._warn is not None:
                self._warn(text)
        self.warned = off

    async def measure(self) -> None:
        """One measurement: a short burst of probes the first time (the very first send also
        fetches the topic's metadata, a slow round trip), one probe after that. Failures are
        logged, and the last estimate stands."""
        for _ in range(FIRST_BURST if self.offset is None else 1):
            try:
                await self.probe()
            except Exception as exc:  # a broker that is away
                log.debug("clock probe failed: %s", exc)
                return

    async def run(self, interval: float = PROBE_INTERVAL) -> None:
        """Measure now and every `interval` s (every second until the first answer)."""
        while True:
            await self.measure()
            await asyncio.sleep(interval if self.offset is not None else 1.0)
