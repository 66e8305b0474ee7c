"""People logging in (drivers and admins): password check, slow-down and lockout.

Used by the admin web (/login) and by driver logins that arrive over Kafka. Passwords are
scrypt hashes (EV_Central.passwords), verified in a worker thread so a login never blocks the
event loop. An unknown user costs one verification against a dummy hash, and every refusal
reads the same, so neither timing nor wording tells whether an account exists.

Each consecutive failure of an account is answered only after a delay that doubles (0.2 s,
0.4 s, ... at most 3 s); after `max_failures` of them the account is locked for
`lock_seconds`, during which even the right password is refused. Attempts on one account are
handled one at a time, so parallel guesses queue behind each other's delays. The counters
live in their own table, `login_state` (EV_Central/schema.py), so they survive a restart of
Central.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

from EV_Central.passwords import hash_password, verify_password
from EV_Central.store import Store

log = logging.getLogger(__name__)

WRONG = "wrong user or password"
BASE_DELAY = 0.2
MAX_DELAY = 3.0


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


def failure_delay(failures: int, base: float = BASE_DELAY, cap: float = MAX_DELAY) -> float:
    """Seconds to hold back the answer to the `failures`-th consecutive failure (1, 2, ...)."""
    if failures <= 0:
        return 0.0
    return min(cap, base * float(2 ** min(failures - 1, 30)))


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
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.store = store
        self.max_failures = max_failures
        self.lock_seconds = lock_seconds
        self.audit = audit
        self.base_delay = base_delay
        self.max_delay = max_delay
        # Verified against when the user does not exist: the same cost as a real account.
        self._dummy_hash = hash_password("no such account")
        self._queues: dict[str, tuple[asyncio.Lock, int]] = {}

    async def login(
        self,
        user_id: str,
        password: str,
        *,
        source: str,
        channel: str,
        role: str | None = None,
    ) -> LoginOutcome:
        """Check `user_id`'s password; `role`, when given, is the only role accepted here."""
        lock = self._enter(user_id)
        try:
            async with lock:
                return await self._attempt(user_id, password, source, channel, role)
        finally:
            self._leave(user_id)

    # --- one attempt, alone on its account ------------------------------------------------

    async def _attempt(
        self, user_id: str, password: str, source: str, channel: str, role: str | None
    ) -> LoginOutcome:
        now = time.time()
        failures, last_failure, locked_until = await self.store.login_state(user_id)
        counted = bool(failures or locked_until)
        if locked_until > now:
            retry = locked_until - now
            await self._record("login", "locked", user_id, source, channel)
            await asyncio.sleep(self.base_delay)
            return LoginOutcome(
                False,
                user_id,
                None,
                f"account locked, try again in {math.ceil(retry)} s",
                retry,
            )
        if locked_until or now - last_failure > self.lock_seconds:
            failures = 0  # a lock that ran out, or failures long ago, start the count afresh

        account = await self.store.credentials(user_id)
        stored = account[1] if account else self._dummy_hash
        matches = await asyncio.to_thread(verify_password, password, stored)
        account_role = account[0] if account else None
        if matches and account_role is not None and role in (None, account_role):
            if counted:
                await self.store.clear_login_state(user_id)
            await self._record("login", "ok", user_id, source, channel)
            return LoginOutcome(True, user_id, account_role, "")

        failures += 1
        locked = failures >= self.max_failures
        until = now + self.lock_seconds if locked else 0.0
        # Counters of attempts long past (unknown ids included) are of no use any more.
        await self.store.save_login_state(
            user_id, failures, now, until, forget_before=now - self.lock_seconds
        )
        await self._record("login", "failed", user_id, source, channel)
        if locked:
            log.warning(
                "account %s locked for %g s after %d failed logins (last from %s, %s)",
                user_id,
                self.lock_seconds,
                failures,
                source,
                channel,
            )
            await self._record(
                "lockout",
                "locked",
                user_id,
                source,
                f"{channel}: {failures} failed logins, locked for {self.lock_seconds:g} s",
            )
        await asyncio.sleep(failure_delay(failures, self.base_delay, self.max_delay))
        if locked:
            return LoginOutcome(
                False,
                user_id,
                None,
                f"account locked, try again in {math.ceil(self.lock_seconds)} s",
                self.lock_seconds,
            )
        return LoginOutcome(False, user_id, None, WRONG)

    # --- per-account queue ----------------------------------------------------------------

    def _enter(self, user_id: str) -> asyncio.Lock:
        lock, users = self._queues.get(user_id, (asyncio.Lock(), 0))
        self._queues[user_id] = (lock, users + 1)
        return lock

    def _leave(self, user_id: str) -> None:
        lock, users = self._queues[user_id]
        if users <= 1:
            del self._queues[user_id]
        else:
            self._queues[user_id] = (lock, users - 1)

    async def _record(
        self, action: str, outcome: str, user_id: str, source: str, detail: str
    ) -> None:
        if self.audit is None:
            return
        try:
            await self.audit.record(action, outcome, actor=user_id, source=source, detail=detail)
        except Exception:  # an audit failure must not decide a login
            log.exception("could not audit %s %s of %s", action, outcome, user_id)
