"""Failover arithmetic for the fleet and the bench (pure, no I/O).

- `Rotation`: which Central a simulated monitor tries next, as the real monitor does
  (shared/centrals.py): the addresses in turn, the active Central at once when a standby
  names it, a short pause only after a whole round has failed.
- The figures of a failover window: the requests in flight during it, and how long the CPs
  took to be connected again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shared.centrals import CentralRotation, Next
from tools.fleet.stats import summarise

ROUND_PAUSE_S = 1.0  # after every address of the list has failed once, as EV_CP_M's standby pause


def parse_addresses(text: str) -> list[tuple[str, int]]:
    """HOST:PORT[,HOST:PORT...] as (host, port) pairs, in order, duplicates kept out."""
    out: list[tuple[str, int]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {part!r}")
        if (host, int(port)) not in out:
            out.append((host, int(port)))
    if not out:
        raise ValueError("no Central address given")
    return out


class Rotation:
    """A simulated monitor's way through the Centrals: shared/centrals.py, as EV_CP_M's, with
    a fixed pause after a whole round."""

    def __init__(
        self, addresses: Sequence[tuple[str, int]], round_pause: float = ROUND_PAUSE_S
    ) -> None:
        self._order = CentralRotation(addresses)
        self.round_pause = round_pause

    @property
    def current(self) -> tuple[str, int]:
        return self._order.current

    def served(self) -> None:
        """The current address authenticated the monitor: a later loss starts a new round."""
        self._order.served()

    def fail(self, active_central: str | None = None) -> float:
        """The current address refused or did not answer: move on; the pause before trying."""
        return self.round_pause if self._order.fail(active_central) is Next.ROUND_OVER else 0.0


def in_flight(
    requests: Iterable[tuple[float, float | None]], start: float, end: float
) -> list[float]:
    """Latencies (s) of the answered requests in flight at some moment of [start, end].

    `requests` holds (sent at, latency or None when unanswered), on one clock. A request
    counts when it was sent before `end` and answered after `start`: those sent during the
    window and those the failover caught half-way.
    """
    return [
        latency
        for sent, latency in requests
        if latency is not None and sent <= end and sent + latency >= start
    ]


def time_until_all_back(
    outages: Iterable[tuple[float, float | None]], start: float, end: float
) -> float | None:
    """Seconds from `start` until the last CP lost in [start, end] was connected again.

    `outages` holds (lost at, connected again at or None), on one clock. None when no CP
    was lost in the window, or one lost in it is still not back.
    """
    lost = [(down, up) for down, up in outages if start <= down <= end]
    if not lost or any(up is None for _, up in lost):
        return None
    return max(up for _, up in lost if up is not None) - start


def reconnection_times(
    outages: Iterable[tuple[float, float | None]], start: float, end: float
) -> list[float]:
    """Per CP lost in [start, end] and back since: seconds from its loss to its return."""
    return [up - down for down, up in outages if start <= down <= end and up is not None]


def summarise_seconds(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, p50, p95, p99 and max of values in seconds, kept in seconds (3 decimals)."""
    return summarise(values, scale=1.0)
