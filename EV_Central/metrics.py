"""Central's metrics in the Prometheus text format (pure: no I/O).

Histograms are cumulative with fixed buckets in seconds; `render` turns a snapshot of
Central's state into the exposition text served on the admin port's /metrics.
"""

from __future__ import annotations

import bisect
import collections
import gc
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Handler latencies: from 50 µs to 2.5 s.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class Histogram:
    """A cumulative histogram: counts per upper bound, a sum and a count."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.buckets = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, ending with +Inf."""
        total = 0
        out = []
        for bound, n in zip((*map(_number, self.bounds), "+Inf"), self.buckets, strict=True):
            total += n
            out.append((bound, total))
        return out


class GcPauses:
    """How long Python's cyclic garbage collector stops the process, by generation.

    A collection of the oldest generation walks every live object; with ten thousand
    connections that is long enough to show in every latency, so it is measured.
    """

    def __init__(self) -> None:
        self.by_generation = {str(g): Histogram() for g in range(3)}
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            generation = str(info.get("generation"))
            if generation in self.by_generation:
                self.by_generation[generation].observe(time.perf_counter() - self._started)


def _histograms() -> collections.defaultdict[str, Histogram]:
    return collections.defaultdict(Histogram)


@dataclass
class CentralStats:
    """What Central counts and times as it runs; every part that counts is given this."""

    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    handler_seconds: collections.defaultdict[str, Histogram] = field(default_factory=_histograms)
    # Where a request's time goes (arrival, outbox, publish): see `render`.
    stage_seconds: collections.defaultdict[str, Histogram] = field(default_factory=_histograms)
    consumer_lag: dict[str, int] = field(default_factory=dict)
    loop_lag: Histogram = field(default_factory=Histogram)  # how late the 0.25 s timer fires
    gc_pauses: GcPauses = field(default_factory=GcPauses)
    # "single", or with --ha "active" (a standby serves its own small status page)
    role: str = "single"


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{value:.1f}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class Exposition:
    """Builds the text: one HELP and TYPE per family, then its samples."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        self._lines.append(f"{name}{_labels(labels or {})} {_value(value)}")

    def histogram(self, name: str, hist: Histogram, labels: Mapping[str, str]) -> None:
        for le, count in hist.cumulative():
            self.sample(f"{name}_bucket", count, {**labels, "le": le})
        self.sample(f"{name}_sum", hist.sum, labels)
        self.sample(f"{name}_count", hist.count, labels)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def render(
    *,
    cps_by_state: Mapping[str, int],
    sessions_by_status: Mapping[str, int],
    messages: Mapping[str, int],
    handler_seconds: Mapping[str, Histogram],
    consumer_lag: Mapping[str, int],
    monitors_connected: int,
    websocket_clients: int,
    outbox_pending: int | None = None,
    loop_lag: Histogram | None = None,
    stage_seconds: Mapping[str, Histogram] | None = None,
    gc_pauses: Mapping[str, Histogram] | None = None,
    role: str = "single",
    clocks: Mapping[str, Any] | None = None,
) -> str:
    """The whole /metrics page."""
    out = Exposition()
    out.family("ev_central_role", "gauge", "This Central's role (1 for the one it has).")
    for name in ("single", "active", "standby"):
        out.sample("ev_central_role", 1 if name == role else 0, {"role": name})
    out.family("ev_central_cps", "gauge", "Charging points by state.")
    for state, n in sorted(cps_by_state.items()):
        out.sample("ev_central_cps", n, {"state": state})
    out.family("ev_central_sessions", "gauge", "Sessions in the database by status.")
    for status, n in sorted(sessions_by_status.items()):
        out.sample("ev_central_sessions", n, {"status": status})
    out.family("ev_central_messages_total", "counter", "Messages handled, by type.")
    for kind, n in sorted(messages.items()):
        out.sample("ev_central_messages_total", n, {"type": kind})
    out.family("ev_central_handler_seconds", "histogram", "Time spent handling a message, by type.")
    for kind, hist in sorted(handler_seconds.items()):
        out.histogram("ev_central_handler_seconds", hist, {"type": kind})
    out.family(
        "ev_central_consumer_lag", "gauge", "Records behind the high watermark, by partition."
    )
    for partition, lag in sorted(consumer_lag.items()):
        out.sample("ev_central_consumer_lag", lag, {"partition": partition})
    out.family("ev_central_monitors_connected", "gauge", "Authenticated monitor connections.")
    out.sample("ev_central_monitors_connected", monitors_connected)
    out.family("ev_central_websocket_clients", "gauge", "Admin WebSocket clients.")
    out.sample("ev_central_websocket_clients", websocket_clients)
    if loop_lag is not None:
        out.family(
            "ev_central_event_loop_lag_seconds", "histogram", "How late a 0.25 s timer fires."
        )
        out.histogram("ev_central_event_loop_lag_seconds", loop_lag, {})
    if outbox_pending is not None:
        out.family("ev_central_outbox_pending", "gauge", "Messages waiting in the outbox.")
        out.sample("ev_central_outbox_pending", outbox_pending)
    if stage_seconds:
        out.family(
            "ev_central_stage_seconds",
            "histogram",
            "Where a message's time goes: arrival (sent -> handled), outbox (committed -> handed "
            "to the producer), publish (handed over -> the broker's acknowledgement).",
        )
        for stage, hist in sorted(stage_seconds.items()):
            out.histogram("ev_central_stage_seconds", hist, {"stage": stage})
    if gc_pauses:
        out.family(
            "ev_central_gc_pause_seconds",
            "histogram",
            "How long each garbage collection stopped Central, by generation.",
        )
        for generation, hist in sorted(gc_pauses.items()):
            out.histogram("ev_central_gc_pause_seconds", hist, {"generation": generation})
    if clocks is not None:
        _clock_metrics(out, clocks)
    return out.text()


def _clock_metrics(out: Exposition, clocks: Mapping[str, Any]) -> None:
    """Clock offsets (EV_Central/clocks.py) and the hops' times over the last minute."""
    out.family(
        "ev_clock_offset_seconds",
        "gauge",
        "A clock minus the network's (the brokers'), by kind and id; Central's is kind central"
        " (drivers' clocks are on the admin panel only).",
    )
    central = clocks["central"]["offset_s"]
    if central is not None:
        out.sample("ev_clock_offset_seconds", central, {"kind": "central", "id": "central"})
    for peer in clocks["peers"]:
        # Drivers are people: their ids stay off this public page (the panel shows them).
        if peer["offset_s"] is not None and peer["kind"] != "driver":
            labels = {"kind": peer["kind"], "id": peer["id"]}
            out.sample("ev_clock_offset_seconds", peer["offset_s"], labels)
    out.family(
        "ev_hop_seconds",
        "gauge",
        "How long each hop took over the last minute (quantile 0.5 and 0.95).",
    )
    for hop in clocks["hops"]:
        for quantile, key in (("0.5", "p50_ms"), ("0.95", "p95_ms")):
            if hop[key] is not None:
                labels = {"hop": hop["hop"], "quantile": quantile}
                out.sample("ev_hop_seconds", hop[key] / 1000, labels)
