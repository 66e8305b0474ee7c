"""The faults of a chaos run, drawn from a seed: the same seed, the same schedule.

Pure: no processes, no clock. A schedule is a list of `Fault`s, each a kind, a target and a
length, at a time from the start of the run. Faults arrive at random (a Poisson process of
`rate` a minute), kinds are drawn evenly from those enabled, and targets among the parts of
that kind; two faults may overlap (an engine dies while Central restarts), but one target is
never hit again before it has recovered.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Every kind of fault, with what it does; `targets` names which parts each may hit.
KINDS: dict[str, str] = {
    "kill-central": "kill -9 Central, start it again after a pause",
    "kill-engine": "kill -9 a CP's engine, start it again after a pause",
    "kill-monitor": "kill -9 a CP's monitor, start it again after a pause",
    "kill-driver": "kill -9 a driver app in the middle of its work, start it again",
    "restart-broker": "stop a Kafka broker (its data kept), start it again after a pause",
    "pause": "SIGSTOP a process for a few seconds, then SIGCONT (a stalled PC)",
    "clock": "restart an engine, monitor or driver app with its clock shifted (libfaketime)",
    "stop-cp": "an admin puts a CP out of service, then back in service",
}
# Kinds enabled by default (all of them).
DEFAULT_KINDS: tuple[str, ...] = tuple(KINDS)
# How long each kind lasts (seconds): drawn evenly in the range.
LENGTHS: dict[str, tuple[float, float]] = {
    "kill-central": (1.0, 4.0),
    "kill-engine": (1.0, 5.0),
    "kill-monitor": (1.0, 5.0),
    "kill-driver": (0.5, 3.0),
    "restart-broker": (1.0, 5.0),
    "pause": (2.0, 5.0),
    "clock": (20.0, 40.0),  # how long the clock stays shifted before a normal restart
    "stop-cp": (3.0, 8.0),
}
# Clock shifts (seconds, either sign) of a "clock" fault.
CLOCK_SHIFTS = (30, 45, 60, 90)


class ScheduleError(ValueError):
    """Bad arguments for a schedule (an unknown kind, no targets, ...)."""


@dataclass(frozen=True)
class Fault:
    at: float  # seconds from the start of the run
    kind: str
    target: str  # "central", "broker", "CP002", "engine CP002", "user3", ...
    length: float  # seconds until the part is back
    detail: str = ""

    @property
    def ends(self) -> float:
        return self.at + self.length

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_kinds(text: str) -> tuple[str, ...]:
    """A comma-separated list of kinds ("all" for every one); ScheduleError names a bad one."""
    if text.strip() == "all":
        return DEFAULT_KINDS
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ScheduleError(f"unknown fault kind {unknown[0]!r}; the kinds are {', '.join(KINDS)}")
    if not kinds:
        raise ScheduleError(f"no fault kind given; the kinds are {', '.join(KINDS)}")
    return kinds


def make_schedule(
    seed: int,
    duration: float,
    kinds: Sequence[str],
    targets: Mapping[str, Sequence[str]],
    *,
    rate: float = 12.0,
    start: float = 10.0,
    quiet: float = 15.0,
) -> list[Fault]:
    """Faults from `start` s to `duration - quiet` s, about `rate` a minute.

    `targets` maps each kind to the parts it may hit; a kind without targets is skipped. The
    last `quiet` seconds are left without a fault starting, so the last ones end in the run.
    """
    if duration <= start + quiet:
        raise ScheduleError(f"a run of {duration:g} s is too short: at least {start + quiet:g} s")
    usable = [k for k in kinds if targets.get(k)]
    if not usable:
        raise ScheduleError("none of the fault kinds has anything to hit")
    rng = random.Random(seed)
    busy_until: dict[str, float] = {}
    faults: list[Fault] = []
    at = start
    end = duration - quiet
    while True:
        at += rng.expovariate(rate / 60.0)
        if at >= end:
            return faults
        kind = rng.choice(usable)
        free = [t for t in targets[kind] if busy_until.get(_part(kind, t), 0.0) <= at]
        if not free:
            continue
        target = rng.choice(free)
        low, high = LENGTHS[kind]
        length = round(rng.uniform(low, high), 2)
        detail = ""
        if kind == "clock":
            shift = rng.choice(CLOCK_SHIFTS) * rng.choice((-1, 1))
            detail = f"{shift:+d}s"
        busy_until[_part(kind, target)] = at + length + 2.0  # and a moment to come back
        faults.append(Fault(round(at, 2), kind, target, length, detail))


def _part(kind: str, target: str) -> str:
    """The process a fault occupies (a CP's engine and monitor are two), whatever names it: a
    paused or clock-shifted process is the same part as one killed."""
    if kind == "stop-cp":
        return f"service {target}"
    if kind == "kill-engine":
        return f"engine-{target}"
    if kind == "kill-monitor":
        return f"monitor-{target}"
    if kind == "kill-driver":
        return f"driver-{target}"
    return target


def summary(faults: Sequence[Fault]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fault in faults:
        counts[fault.kind] = counts.get(fault.kind, 0) + 1
    return dict(sorted(counts.items()))
