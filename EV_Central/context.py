"""What every part of Central that handles input works with, handed over as one."""

from __future__ import annotations

from dataclasses import dataclass, field

from EV_Central.clocks import Clocks
from EV_Central.feed import Feed
from EV_Central.metrics import CentralStats
from EV_Central.registry import Registry
from EV_Central.store import Store
from shared.bus import KafkaBus


@dataclass(frozen=True)
class Context:
    store: Store  # the database, through statements named for the domain
    registry: Registry  # the CPs in memory
    bus: KafkaBus  # what is posted without waiting (live figures, answers)
    feed: Feed  # changes, for whoever shows them
    stats: CentralStats  # counters and timings for /metrics
    clocks: Clocks = field(default_factory=Clocks)  # peers' clock offsets, hop times


class Part:
    """A part of Central that handles input, with the context's collaborators at hand."""

    def __init__(self, context: Context) -> None:
        self._store = context.store
        self._registry = context.registry
        self._bus = context.bus
        self._feed = context.feed
        self._stats = context.stats
        self._clocks = context.clocks
