"""Holding off abuse: who fails is slowed down and then blocked, for longer and longer.

Pure rules, no I/O: every call takes the time (`now`, seconds) as an argument, so the rules are
tested without sleeping. Used by Central's logins (EV_Central/auth.py: per account and source),
by its monitor port (EV_Central/monitor_server.py: per address) and by the web shell
(shared/webshell.py: connections per address). docs/security.md, "Abuse", has the design.

- `Throttle`: failures counted per key; each failure is answered a little later (a doubling
  delay), and after `free` of them in a row the key is blocked for a time that doubles with
  every further failure, up to a cap. A success, or a long quiet, forgets the key.
- `LoginThrottle`: a `Throttle` per (account, source), and one budget per account shared by
  every source that has never logged in to it, so an attacker who makes up a new source for
  each guess is bounded too; a source that has logged in before is not held by that budget.
- `ConnectionCap`: connections open at once per address.
- `FailureDigest`: bounded audit rows for a flood of failures: the first failure of a source
  in a window is written at once, the others are counted and written as one summary row.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class ThrottleRules:
    """How a `Throttle` answers failures (every number in seconds but `free`)."""

    free: int = 5  # failures in a row before the key is blocked
    base_delay: float = 0.2  # the first failure's answer waits this long, then doubling ...
    max_delay: float = 3.0  # ... up to this
    first_block: float = 30.0  # the `free`-th failure blocks for this long, then doubling ...
    max_block: float = 300.0  # ... up to this
    max_keys: int = 100_000  # keys kept at most (the least recently failed are forgotten)

    def __post_init__(self) -> None:
        if self.free < 1:
            raise ValueError("free must be at least 1")
        if not 0 < self.first_block <= self.max_block:
            raise ValueError("first_block must be positive and at most max_block")

    @property
    def forget_after(self) -> float:
        """Quiet time after which a key's failures no longer count."""
        return 2 * self.max_block


@dataclass(frozen=True)
class Verdict:
    """What one failure earns: hold the answer back `delay` s; `blocked_for` > 0 when this
    failure (re)starts a block of that many seconds (worth an audit row)."""

    delay: float
    blocked_for: float
    failures: int


@dataclass
class _Record:
    failures: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class Throttle(Generic[K]):
    """Growing delays and blocks for a key that keeps failing (see the module docstring)."""

    def __init__(self, rules: ThrottleRules) -> None:
        self.rules = rules
        self._records: dict[K, _Record] = {}

    def __len__(self) -> int:
        return len(self._records)

    def retry_after(self, key: K, now: float) -> float:
        """0 when `key` may try now, else the seconds until it may."""
        record = self._records.get(key)
        if record is None or record.blocked_until <= now:
            return 0.0
        return record.blocked_until - now

    def failed(self, key: K, now: float) -> Verdict:
        """Count a failure of `key` and say how it is answered."""
        rules = self.rules
        record = self._records.pop(key, None)
        if record is None or now - record.last > rules.forget_after:
            record = _Record()
        self._records[key] = record  # the most recently failed last: forgotten last
        record.failures += 1
        record.last = now
        n = record.failures
        delay = min(rules.max_delay, rules.base_delay * 2.0 ** min(n - 1, 30))
        blocked_for = 0.0
        if n >= rules.free:
            blocked_for = min(rules.max_block, rules.first_block * 2.0 ** min(n - rules.free, 30))
            record.blocked_until = now + blocked_for
        while len(self._records) > rules.max_keys:
            del self._records[next(iter(self._records))]
        return Verdict(delay, blocked_for, n)

    def succeeded(self, key: K) -> None:
        """`key` got in: its failures are forgotten."""
        self._records.pop(key, None)


@dataclass(frozen=True)
class LoginVerdict:
    """A failed login: how long its answer waits, and the blocks it starts (0: none)."""

    delay: float
    failures: int  # in a row from this source on this account
    source_blocked_for: float
    unknown_blocked_for: float  # the account's budget for sources never seen to log in


class LoginThrottle:
    """Per (account, source) throttling, plus one budget per account for unknown sources.

    A source that fails is slowed down and then blocked, alone: the right password from any
    other source is checked at once. Sources cost an attacker nothing to make up where they
    are not network addresses (a driver app's login key over Kafka), so the failures of every
    source that has never logged in to an account also count towards a budget of that account
    (`unknown_rules`); once it is spent, unknown sources wait too, while the sources that have
    logged in to the account before (the last `known_per_account`) still get in at once.
    """

    def __init__(
        self,
        per_source: ThrottleRules,
        unknown_rules: ThrottleRules,
        *,
        known_per_account: int = 16,
        max_accounts: int = 100_000,
    ) -> None:
        self.sources: Throttle[tuple[str, str]] = Throttle(per_source)
        self.unknown: Throttle[str] = Throttle(unknown_rules)
        self.known_per_account = known_per_account
        self.max_accounts = max_accounts
        self._known: dict[str, dict[str, None]] = {}

    def known(self, account: str, source: str) -> bool:
        """Has `source` logged in to `account` (lately)?"""
        return source in self._known.get(account, {})

    def retry_after(self, account: str, source: str, now: float) -> float:
        """0 when `source` may try a password on `account` now, else the seconds to wait."""
        wait = self.sources.retry_after((account, source), now)
        if not self.known(account, source):
            wait = max(wait, self.unknown.retry_after(account, now))
        return wait

    def failed(self, account: str, source: str, now: float) -> LoginVerdict:
        verdict = self.sources.failed((account, source), now)
        unknown_blocked_for = 0.0
        if not self.known(account, source):
            unknown_blocked_for = self.unknown.failed(account, now).blocked_for
        return LoginVerdict(
            verdict.delay, verdict.failures, verdict.blocked_for, unknown_blocked_for
        )

    def succeeded(self, account: str, source: str) -> None:
        """The right password from `source`: it is known to the account from now on."""
        self.sources.succeeded((account, source))
        known = self._known.pop(account, {})
        known.pop(source, None)
        known[source] = None
        while len(known) > self.known_per_account:
            del known[next(iter(known))]
        self._known[account] = known
        while len(self._known) > self.max_accounts:
            del self._known[next(iter(self._known))]


class ConnectionCap:
    """Connections open at once per address, at most `per_address` of them."""

    def __init__(self, per_address: int) -> None:
        if per_address < 1:
            raise ValueError("per_address must be at least 1")
        self.per_address = per_address
        self._open: dict[str, int] = {}

    def open(self, address: str) -> bool:
        """A connection from `address` arrives: True if it may stay (then `close` it later)."""
        count = self._open.get(address, 0)
        if count >= self.per_address:
            return False
        self._open[address] = count + 1
        return True

    def close(self, address: str) -> None:
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)

    def count(self, address: str) -> int:
        return self._open.get(address, 0)


@dataclass(frozen=True)
class Summary:
    """Failures of `source` that were counted but not written, in the window that ended."""

    source: str
    count: int
    window: float


class FailureDigest:
    """Bounded audit rows for failures: per source, one row at the first failure of a window
    (`window` seconds) and one summary of the rest when the window ends. At most
    `max_sources` sources have windows of their own at a time; failures of any other source
    are counted together under `OTHERS`."""

    OTHERS = "(other sources)"

    def __init__(self, window: float = 60.0, max_sources: int = 100) -> None:
        self.window = window
        self.max_sources = max_sources
        self._windows: dict[str, tuple[float, int]] = {}  # source -> (window start, unwritten)

    def failed(self, source: str, now: float) -> bool:
        """Count a failure of `source`; True when it is to be written as a row of its own."""
        if source not in self._windows:
            if len(self._windows) < self.max_sources:
                self._windows[source] = (now, 0)
                return True
            source = self.OTHERS
        start, unwritten = self._windows.get(source, (now, 0))
        self._windows[source] = (start, unwritten + 1)
        return False

    def due(self, now: float) -> list[Summary]:
        """The windows that have ended: a summary for each that counted unwritten failures."""
        ended = [s for s, (start, _) in self._windows.items() if now - start >= self.window]
        summaries = []
        for source in ended:
            _, unwritten = self._windows.pop(source)
            if unwritten > 0:
                summaries.append(Summary(source, unwritten, self.window))
        return summaries
