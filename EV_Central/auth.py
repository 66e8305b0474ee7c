"""People logging in (drivers and admins): password check, and slowing down who guesses.

Used by the admin web (/login) and by driver logins that arrive over Kafka. Passwords are
scrypt hashes (EV_Central.passwords), verified in a worker thread so a login never blocks the
event loop. An unknown user costs one verification against a dummy hash, and every refusal
reads the same, so neither timing nor wording tells whether an account exists.

Failures are held against the *source* that makes them, never against the account itself, so
that guessing cannot lock the real person out (shared/abuse.py, `LoginThrottle`): each failure
of a source on an account is answered after a delay that doubles (0.2 s, 0.4 s, ... at most
3 s); after `max_failures` in a row that source is blocked for `first_block` seconds, doubling
with each further failure up to `lock_seconds`; the right password from another source is
checked at once. A source is the client's address on the web, the login's ephemeral key over
Kafka; sources that have never logged in to an account also share a budget per account, which
bounds an attacker who makes up a new key for each guess. Attempts from one source on one
account are handled one at a time, so its parallel guesses queue behind each other's delays.
The counters live in memory: a restart of Central forgets them (docs/web-auth.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from EV_Central.passwords import hash_password, verify_password
from EV_Central.store import Store
from shared.abuse import LoginThrottle, ThrottleRules

log = logging.getLogger(__name__)

WRONG = "wrong user or password"
BASE_DELAY = 0.2
MAX_DELAY = 3.0
FIRST_BLOCK = 30.0  # seconds a source is first blocked (at most --lockout-seconds)
# Failures from sources that never logged in to an account, before every such source waits.
UNKNOWN_SOURCE_BUDGET = 20
VERIFY_CONCURRENCY = 4  # scrypt verifications at once (each one a worker thread)


class AuditSink(Protocol):
    """Where security events go (EV_Central.audit.AuditLog)."""

    async def record(
        self, action: str, outcome: str, *, actor: str = "", source: str = "", detail: str = ""
    ) -> None: ...


@dataclass(frozen=True)
class LoginOutcome:
    """The answer to one login attempt; `role` is the account's when ok."""

    ok: bool
    user_id: str
    role: str | None
    reason: str
    retry_after: float | None = None


class PeopleAuth:
    def __init__(
        self,
        store: Store,
        *,
        max_failures: int = 5,
        lock_seconds: float = 300.0,
        audit: AuditSink | None = None,
        base_delay: float = BASE_DELAY,
        max_delay: float = MAX_DELAY,
        unknown_budget: int = UNKNOWN_SOURCE_BUDGET,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.store = store
        self.audit = audit
        first_block = min(FIRST_BLOCK, lock_seconds)
        self.throttle = LoginThrottle(
            ThrottleRules(max_failures, base_delay, max_delay, first_block, lock_seconds),
            ThrottleRules(unknown_budget, base_delay, max_delay, first_block, lock_seconds),
        )
        self._clock = clock
        # Verified against when the user does not exist: the same cost as a real account.
        self._dummy_hash = hash_password("no such account")
        self._queues: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self._verifying = asyncio.Semaphore(VERIFY_CONCURRENCY)

    async def login(
        self,
        user_id: str,
        password: str,
        *,
        source: str,
        channel: str,
        role: str | None = None,
    ) -> LoginOutcome:
        """Check `user_id`'s password; `role`, when given, is the only role accepted here.

        `source` says where the attempt comes from (an address, a login key's fingerprint):
        failures slow down and block that source only."""
        queue = (user_id, source)
        lock = self._enter(queue)
        try:
            async with lock:
                return await self._attempt(user_id, password, source, channel, role)
        finally:
            self._leave(queue)

    # --- one attempt, alone on its account and source ---------------------------------------

    async def _attempt(
        self, user_id: str, password: str, source: str, channel: str, role: str | None
    ) -> LoginOutcome:
        wait = self.throttle.retry_after(user_id, source, self._clock())
        if wait > 0:
            # Refused unchecked, and not audited one by one: the block itself was.
            return _blocked(user_id, wait)
        account = await self.store.credentials(user_id)
        stored = account[1] if account else self._dummy_hash
        async with self._verifying:
            matches = await asyncio.to_thread(verify_password, password, stored)
        account_role = account[0] if account else None
        if matches and account_role is not None and role in (None, account_role):
            self.throttle.succeeded(user_id, source)
            await self._record("login", "ok", user_id, source, channel)
            return LoginOutcome(True, user_id, account_role, "")

        verdict = self.throttle.failed(user_id, source, self._clock())
        await self._record("login", "failed", user_id, source, channel)
        blocked_for = verdict.source_blocked_for
        if blocked_for:
            log.warning(
                "login source %s blocked on %s for %g s after %d failed logins (%s)",
                source,
                user_id,
                blocked_for,
                verdict.failures,
                channel,
            )
            await self._record(
                "throttle",
                "blocked",
                user_id,
                source,
                f"{channel}: {verdict.failures} failed logins from this source, "
                f"blocked for {blocked_for:g} s",
            )
        if verdict.unknown_blocked_for:
            log.warning(
                "logins to %s from sources never seen to log in are held for %g s",
                user_id,
                verdict.unknown_blocked_for,
            )
            await self._record(
                "throttle",
                "blocked",
                user_id,
                source,
                f"{channel}: too many failed logins from new sources, those wait "
                f"{verdict.unknown_blocked_for:g} s (known sources do not)",
            )
        await asyncio.sleep(verdict.delay)
        wait = max(blocked_for, verdict.unknown_blocked_for)
        return _blocked(user_id, wait) if wait else LoginOutcome(False, user_id, None, WRONG)

    # --- per-source queue -------------------------------------------------------------------

    def _enter(self, queue: tuple[str, str]) -> asyncio.Lock:
        lock, users = self._queues.get(queue, (asyncio.Lock(), 0))
        self._queues[queue] = (lock, users + 1)
        return lock

    def _leave(self, queue: tuple[str, str]) -> None:
        lock, users = self._queues[queue]
        if users <= 1:
            del self._queues[queue]
        else:
            self._queues[queue] = (lock, users - 1)

    async def _record(
        self, action: str, outcome: str, user_id: str, source: str, detail: str
    ) -> None:
        if self.audit is None:
            return
        try:
            await self.audit.record(action, outcome, actor=user_id, source=source, detail=detail)
        except Exception:  # an audit failure must not decide a login
            log.exception("could not audit %s %s of %s", action, outcome, user_id)


def _blocked(user_id: str, wait: float) -> LoginOutcome:
    return LoginOutcome(
        False, user_id, None, f"too many failed logins; try again in {math.ceil(wait)} s", wait
    )
