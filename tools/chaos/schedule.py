"""The faults of a chaos run, drawn from a seed: the same seed, the same schedule.

Pure: no processes, no clock. A schedule is a list of `Fault`s, each a kind, a target and a
length, at a time from the start of the run. Faults arrive at random (a Poisson process of
`rate` a minute), kinds are drawn evenly from those enabled, and targets among the parts of
that kind; two faults may overlap (an engine dies while Central restarts), but one target is
never hit again before it has recovered. The network kinds (`NET_KINDS`) need the run's
simulated PCs (--net): they are left out of "all" without them, and refused by name.
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
    "net-cut": "take a simulated PC off the network (its bridge port down), then back (--net)",
    "net-loss": "lose a share of a simulated PC's packets, both ways (--net)",
    "net-delay": "delay a simulated PC's packets, both ways, with jitter (--net)",
}
# Faults of the network between the simulated PCs: only in a run on them (--net).
NET_KINDS: tuple[str, ...] = ("net-cut", "net-loss", "net-delay")
# Kinds enabled by default: all of them (the network ones with --net only).
DEFAULT_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k not in NET_KINDS)
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
    "net-cut": (2.0, 8.0),
    "net-loss": (5.0, 15.0),
    "net-delay": (5.0, 15.0),
}
# Clock shifts (seconds, either sign) of a "clock" fault.
CLOCK_SHIFTS = (30, 45, 60, 90)
# A "net-loss" loses this share of the packets (percent, drawn evenly), each way.
LOSS_PERCENT = (10, 40)
# A "net-delay" holds each packet this long (ms, drawn evenly, in steps of 10), each way, give or
# take a fifth of it.
DELAY_MS = (100, 400)


class ScheduleError(ValueError):
    """Bad arguments for a schedule (an unknown kind, no targets, ...)."""


@dataclass(frozen=True)
class Fault:
    at: float  # seconds from the start of the run
    kind: str
    target: str  # "central", "broker", "CP002", "engine-CP002", "user3", "pc3", ...
    length: float  # seconds until the part is back
    detail: str = ""

    @property
    def ends(self) -> float:
        return self.at + self.length

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_kinds(text: str, net: bool = False) -> tuple[str, ...]:
    """A comma-separated list of kinds ("all" for every one there is, the network ones only
    with `net`); ScheduleError names a bad one, or a network one without `net`."""
    if text.strip() == "all":
        return tuple(KINDS) if net else DEFAULT_KINDS
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ScheduleError(f"unknown fault kind {unknown[0]!r}; the kinds are {', '.join(KINDS)}")
    if not kinds:
        raise ScheduleError(f"no fault kind given; the kinds are {', '.join(KINDS)}")
    networked = [k for k in kinds if k in NET_KINDS]
    if networked and not net:
        raise ScheduleError(
            f"fault kind {networked[0]!r} needs the simulated PCs: add --net (as root)"
        )
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
        elif kind == "net-loss":
            detail = f"loss {rng.randint(*LOSS_PERCENT)}%"
        elif kind == "net-delay":
            delay = rng.randrange(DELAY_MS[0], DELAY_MS[1] + 1, 10)
            detail = f"delay {delay}ms {delay // 5}ms"
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
    if kind in NET_KINDS:
        # One at a time on a PC's link: a loss would replace a delay, a mend end a loss.
        return f"net {target}"
    return target


def summary(faults: Sequence[Fault]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fault in faults:
        counts[fault.kind] = counts.get(fault.kind, 0) + 1
    return dict(sorted(counts.items()))
