"""Which Central a monitor tries next, given a list of them (pure, no I/O).

A monitor knows one Central or several (`--central A:5000,B:5000`: the active one and its hot
standby, docs/high-availability.md). It tries them in turn: after a failure the next address
at once, and the active Central at once when a standby's refusal names it; only after every
address has failed in one round does it pause. The monitor (EV_CP_M) and the fleet simulator
(tools/fleet) both follow this.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class Next(enum.Enum):
    NAMED = "named"  # the address a standby named as the active Central, at once
    NEXT = "next"  # the next address not tried in this round, at once
    ROUND_OVER = "round over"  # every address failed: pause, then a new round


@dataclass
class CentralRotation:
    """The Central addresses one monitor tries, and where it is in them."""

    addresses: Sequence[tuple[str, int]]
    index: int = 0
    failed: set[int] = field(default_factory=set)  # failed in this round
    standby_seen: bool = False  # a standby refused in this round (or the one just over)

    @property
    def current(self) -> tuple[str, int]:
        return self.addresses[self.index]

    def served(self) -> None:
        """The current address authenticated the monitor: a later loss starts a new round."""
        self.failed.clear()
        self.standby_seen = False

    def fail(self, active_central: str | None = None) -> Next:
        """The current address refused or did not answer: move on, and say how.

        `active_central` is the HOST:PORT a standby's refusal names. After ROUND_OVER,
        `standby_seen` tells whether a standby refused during the round that ended.
        """
        if not self.failed:
            self.standby_seen = False  # a new round
        self.failed.add(self.index)
        self.standby_seen = self.standby_seen or active_central is not None
        named = self.index_of(active_central)
        if named is not None and named not in self.failed:
            self.index = named
            return Next.NAMED
        n = len(self.addresses)
        untried = [i for i in range(n) if i not in self.failed]
        if untried:
            self.index = min(untried, key=lambda i: (i - self.index) % n)
            return Next.NEXT
        self.failed.clear()
        self.index = (self.index + 1) % n
        return Next.ROUND_OVER

    def index_of(self, address: str | None) -> int | None:
        """The position of HOST:PORT in the list, or None."""
        if not address:
            return None
        host, _, port = address.rpartition(":")
        for i, (h, p) in enumerate(self.addresses):
            if h == host and str(p) == port:
                return i
        return None
