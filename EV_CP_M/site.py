"""The site's health, from the monitors' samples and Central's CP states: pure logic, no I/O.

`Site` turns a stream of HealthSample and CPStateUpdate messages into what the site dashboard
shows: per CP the latest check, whether its monitor is still heard, the faults (engine KO or
monitor lost) with their durations, and the availability over the last hour. Time comes from
an injected clock, so tests drive it by hand.

Time model: a sample counts at its own timestamp, moved onto the network's clock when the
sample carries its monitor's offset to it (a monitor whose clock is a minute behind would
otherwise look silent), clamped so that it is never in the future nor before the CP's previous
sample. A sample's verdict holds until the next sample, or until the monitor is declared lost
after `silence` seconds without one; a lost monitor is lost from its last sample on.

Each sample also says how far the monitor's and the engine's clocks are from the network's
(the Kafka brokers', shared/clock.py); the view shows both and warns from `SKEW_WARNING_S` on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.clock import SKEW_WARNING_S
from shared.messages import STATE_COLOURS, CPStateUpdate, HealthSample

SILENCE_S = 3.0  # no sample for this long: the monitor is lost
WINDOW_S = 3600.0  # availability and the timeline cover the last hour
BUCKETS = 60  # the availability strip: one bucket a minute
RTT_SPAN_S = 120.0  # round-trip history kept for the chart
MAX_FAULTS = 500  # timeline entries kept, whatever their age (open ones always stay)

FaultKind = Literal["engine", "monitor"]
FAULT_LABELS: dict[str, str] = {"engine": "Engine KO", "monitor": "Monitor lost"}


@dataclass
class Fault:
    """A period during which a CP was not healthy; open (ended_at None) until recovery."""

    cp_id: str
    kind: FaultKind
    detail: str
    started_at: float
    ended_at: float | None = None

    @property
    def open(self) -> bool:
        return self.ended_at is None

    def duration(self, now: float) -> float:
        end = now if self.ended_at is None else self.ended_at
        return max(0.0, end - self.started_at)

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "cp_id": self.cp_id,
            "kind": self.kind,
            "label": FAULT_LABELS[self.kind],
            "detail": self.detail,
            "started_at": round(self.started_at, 3),
            "ended_at": None if self.ended_at is None else round(self.ended_at, 3),
            "duration_s": round(self.duration(now), 1),
            "open": self.open,
        }


@dataclass
class Segment:
    """Consecutive samples with the same verdict (up = engine OK and Central link OK)."""

    start: float
    end: float
    up: bool


@dataclass
class CPHealth:
    """Everything the dashboard knows about one CP."""

    cp_id: str
    central: CPStateUpdate | None = None
    last: HealthSample | None = None
    last_at: float | None = None
    first_at: float | None = None
    lost: bool = False
    fault: Fault | None = None  # the open fault, if any
    segments: deque[Segment] = field(default_factory=deque)
    rtt: deque[tuple[float, float]] = field(default_factory=deque)

    @property
    def monitored(self) -> bool:
        return self.last is not None

    @property
    def engine(self) -> Literal["OK", "KO", "UNKNOWN"]:
        """The engine's health as far as the site knows now (UNKNOWN without a live monitor)."""
        if self.last is None or self.lost:
            return "UNKNOWN"
        return "OK" if self.last.engine_ok else "KO"

    @property
    def monitor_offset(self) -> float | None:
        """The monitor's clock minus the network's, from its latest sample."""
        return None if self.last is None else self.last.monitor_offset_s

    @property
    def engine_offset(self) -> float | None:
        """The engine's clock minus the network's, as its monitor measured it last."""
        return None if self.last is None else self.last.engine_offset_s


class Site:
    """The CPs of a site, their faults and availability, fed with messages in order."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        silence: float = SILENCE_S,
        window: float = WINDOW_S,
        max_faults: int = MAX_FAULTS,
    ) -> None:
        self.clock = clock
        self.silence = silence
        self.window = window
        self.cps: dict[str, CPHealth] = {}
        self.faults: deque[Fault] = deque()
        self.max_faults = max_faults

    def _cp(self, cp_id: str) -> CPHealth:
        cp = self.cps.get(cp_id)
        if cp is None:
            cp = self.cps[cp_id] = CPHealth(cp_id)
        return cp

    # --- input ----------------------------------------------------------------------------

    def on_state(self, update: CPStateUpdate) -> None:
        """Central's latest view of a CP (state, location, price, live supply)."""
        self._cp(update.cp_id).central = update

    def on_removed(self, cp_id: str) -> None:
        """Central deregistered the CP (a tombstone on the state topic): it leaves the site."""
        self.cps.pop(cp_id, None)

    def on_sample(self, sample: HealthSample) -> None:
        """One health check reported by a CP's monitor."""
        now = self.clock()
        cp = self._cp(sample.cp_id)
        if cp.last is not None and sample.ts <= cp.last.ts:
            return  # a copy or an older sample (history read again): already counted
        # On the network's clock (a skewed monitor's stamps are off by its offset).
        at = min(sample.ts - (sample.monitor_offset_s or 0.0), now)
        if cp.last_at is not None and at < cp.last_at:
            at = cp.last_at
        gap = None if cp.last_at is None else at - cp.last_at
        if gap is not None and gap > self.silence and not cp.lost:
            # Silence seen only now (e.g. replaying history): the monitor was lost meanwhile.
            self._monitor_lost(cp)
        if cp.lost:
            cp.lost = False
            self._close(cp, at)
        if not sample.engine_ok and cp.fault is None:
            self._open(cp, "engine", sample.detail or "engine reports KO", at)
        elif sample.engine_ok and cp.fault is not None:
            self._close(cp, at)
        self._add_segment(cp, at, up=sample.engine_ok and sample.central_ok, gap=gap)
        if sample.rtt_ms is not None:
            cp.rtt.append((at, sample.rtt_ms))
        while cp.rtt and cp.rtt[0][0] < now - RTT_SPAN_S:
            cp.rtt.popleft()
        cp.last, cp.last_at = sample, at
        if cp.first_at is None:
            cp.first_at = at

    def tick(self) -> bool:
        """Declare silent monitors lost and forget what left the window; True if a CP changed."""
        now = self.clock()
        horizon = now - self.window
        changed = False
        for cp in self.cps.values():
            if cp.last_at is not None and not cp.lost and now - cp.last_at > self.silence:
                self._monitor_lost(cp)
                changed = True
            while cp.segments and self._segment_end(cp, 0, now) < horizon:
                cp.segments.popleft()
        horizon = now - self.window
        if any(not f.open and (f.ended_at or now) < horizon for f in self.faults):
            self.faults = deque(f for f in self.faults if f.open or (f.ended_at or now) >= horizon)
        return changed

    # --- faults ---------------------------------------------------------------------------

    def _open(self, cp: CPHealth, kind: FaultKind, detail: str, at: float) -> None:
        cp.fault = Fault(cp.cp_id, kind, detail, at)
        self.faults.append(cp.fault)
        while len(self.faults) > self.max_faults and not self.faults[0].open:
            self.faults.popleft()

    def _close(self, cp: CPHealth, at: float) -> None:
        if cp.fault is not None:
            cp.fault.ended_at = max(at, cp.fault.started_at)
            cp.fault = None

    def _monitor_lost(self, cp: CPHealth) -> None:
        """The monitor went silent after its last sample: that is when the fault began."""
        assert cp.last_at is not None
        since = cp.last_at
        cp.lost = True
        if cp.fault is not None and cp.fault.kind == "monitor":
            return
        self._close(cp, since)
        self._open(cp, "monitor", f"no health sample for {self.silence:g} s", since)

    # --- availability ---------------------------------------------------------------------

    def _add_segment(self, cp: CPHealth, at: float, *, up: bool, gap: float | None) -> None:
        last = cp.segments[-1] if cp.segments else None
        contiguous = last is not None and gap is not None and gap <= self.silence
        if last is not None and contiguous:
            last.end = at  # the previous verdict held until this sample
            if last.up == up:
                return
        cp.segments.append(Segment(at, at, up))

    def _segment_end(self, cp: CPHealth, index: int, now: float) -> float:
        """Where segment `index` stops counting: the next segment, or now while still heard."""
        if index == len(cp.segments) - 1:
            return cp.segments[index].end if cp.lost else max(now, cp.segments[index].end)
        return cp.segments[index].end

    def uptime(self, cp_id: str, start: float, end: float) -> tuple[float, float]:
        """Seconds up and seconds observed between `start` and `end` (observed = since the
        first sample; a lost monitor counts as down)."""
        cp = self.cps.get(cp_id)
        if cp is None or cp.first_at is None:
            return 0.0, 0.0
        now = self.clock()
        begin = max(start, cp.first_at)
        if end <= begin:
            return 0.0, 0.0
        up = 0.0
        for index, segment in enumerate(cp.segments):
            if not segment.up:
                continue
            seg_end = min(self._segment_end(cp, index, now), now)
            overlap = min(seg_end, end) - max(segment.start, begin)
            if overlap > 0:
                up += overlap
        return up, end - begin

    def availability(self, cp_id: str) -> float | None:
        """Fraction of the last hour (or of the time since the first sample, if shorter)
        during which the engine was OK and the monitor's link to Central was up."""
        now = self.clock()
        up, observed = self.uptime(cp_id, now - self.window, now)
        if observed <= 0:
            return None
        return min(1.0, up / observed)

    def availability_strip(self, cp_id: str, buckets: int = BUCKETS) -> list[float | None]:
        """The last hour in `buckets` slices, oldest first: the fraction up, None if unseen."""
        now = self.clock()
        size = self.window / buckets
        out: list[float | None] = []
        for i in range(buckets):
            start = now - self.window + i * size
            up, observed = self.uptime(cp_id, start, start + size)
            out.append(None if observed <= 0 else round(min(1.0, up / observed), 4))
        return out

    # --- views (JSON for the page and /api/site) ------------------------------------------

    def cp_view(self, cp_id: str) -> dict[str, Any]:
        now = self.clock()
        cp = self.cps[cp_id]
        central = cp.central
        last = cp.last
        state = central.state if central is not None else None
        horizon = now - self.window
        recent = [
            f
            for f in self.faults
            if f.cp_id == cp_id and (f.open or (f.ended_at or now) >= horizon)
        ]
        availability = self.availability(cp_id)
        return {
            "id": cp_id,
            "location": central.location if central is not None else None,
            "price_eur_kwh": central.price_eur_kwh if central is not None else None,
            "max_kw": central.max_kw if central is not None else None,
            "state": state.value if state is not None else None,
            "reserved": central.reserved if central is not None else False,
            "colour": STATE_COLOURS[state] if state is not None else None,
            "driver_id": central.driver_id if central is not None else None,
            "kw": central.kw if central is not None else 0.0,
            "kwh": central.kwh if central is not None else 0.0,
            "amount_eur": central.amount_eur if central is not None else 0.0,
            "speed": self._speed(cp),
            "monitored": cp.monitored,
            "monitor": "none" if last is None else ("lost" if cp.lost else "live"),
            "engine": cp.engine,
            "engine_ok": None if last is None else last.engine_ok,
            "central_ok": None if last is None or cp.lost else last.central_ok,
            "detail": "" if last is None else last.detail,
            "monitor_cp_state": None
            if last is None or last.cp_state is None
            else last.cp_state.value,
            "rtt_ms": None if last is None else last.rtt_ms,
            "last_check": cp.last_at,
            "silent_s": None if cp.last_at is None else round(max(0.0, now - cp.last_at), 1),
            "availability": None if availability is None else round(availability, 5),
            "observed_s": round(self.uptime(cp_id, horizon, now)[1], 1),
            "strip": self.availability_strip(cp_id) if cp.monitored else [],
            "fault": cp.fault.as_json(now) if cp.fault is not None else None,
            "faults_last_hour": len(recent),
            "monitor_offset_s": _rounded(cp.monitor_offset),
            "engine_offset_s": _rounded(cp.engine_offset),
            "clock_warning": any(
                offset is not None and abs(offset) >= SKEW_WARNING_S
                for offset in (cp.monitor_offset, cp.engine_offset)
            ),
        }

    @staticmethod
    def _speed(cp: CPHealth) -> float:
        """The engine's time scale: its monitor's word first (it asks the engine), Central's
        (relayed from the same monitor) for a CP no monitor of this site reports."""
        if cp.last is not None:
            return cp.last.speed
        return cp.central.speed if cp.central is not None else 1.0

    def sorted_ids(self) -> list[str]:
        return sorted(self.cps)

    def timeline(self, limit: int = 100) -> list[dict[str, Any]]:
        """Faults of the last hour (and every open one), newest first."""
        now = self.clock()
        horizon = now - self.window
        kept = [f for f in self.faults if f.open or (f.ended_at or now) >= horizon]
        kept.sort(key=lambda f: f.started_at, reverse=True)
        return [f.as_json(now) for f in kept[:limit]]

    def rtt_history(self) -> dict[str, list[list[float]]]:
        return {
            cp_id: [[round(t, 3), ms] for t, ms in cp.rtt]
            for cp_id, cp in sorted(self.cps.items())
            if cp.rtt
        }

    def view(self) -> dict[str, Any]:
        """The whole site, as the page and /api/site show it."""
        now = self.clock()
        cps = [self.cp_view(cp_id) for cp_id in self.sorted_ids()]
        monitored = [cp for cp in cps if cp["monitored"]]
        return {
            "now": round(now, 3),
            "silence_s": self.silence,
            "window_s": self.window,
            "clock_warning_s": SKEW_WARNING_S,
            "summary": {
                "monitored": len(monitored),
                "engine_ok": sum(1 for cp in monitored if cp["engine"] == "OK"),
                "engine_ko": sum(1 for cp in monitored if cp["engine"] == "KO"),
                "monitor_lost": sum(1 for cp in monitored if cp["monitor"] == "lost"),
                "open_faults": sum(1 for f in self.faults if f.open),
                "known": len(cps),
            },
            "cps": cps,
            "timeline": self.timeline(),
            "states": {state.value: colour for state, colour in STATE_COLOURS.items()},
        }


def _rounded(offset: float | None) -> float | None:
    return None if offset is None else round(offset, 3)
