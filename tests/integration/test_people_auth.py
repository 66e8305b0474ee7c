"""People logging in (EV_Central.auth.PeopleAuth) against a real, seeded SQLite database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from EV_Central.auth import WRONG, LoginOutcome, PeopleAuth
from EV_Central.db import Database
from EV_Central.store import Store

BASE = 0.05  # a faster slow-down than Central's (0.2 s) keeps these tests short


class AuditRecorder:
    """Collects what PeopleAuth reports (the audit log has its own tests)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []

    async def record(
        self, action: str, outcome: str, *, actor: str = "", source: str = "", detail: str = ""
    ) -> None:
        self.rows.append((action, outcome, actor, source, detail))


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(tmp_path / "central.db")  # created and seeded with the demo accounts
    await database.start()
    try:
        yield database
    finally:
        await database.stop()


class Clock:
    """A clock the test moves (blocks run out without waiting for them)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def people(
    db: Database,
    audit: AuditRecorder | None = None,
    lock_seconds: float = 60.0,
    clock: Clock | None = None,
) -> PeopleAuth:
    return PeopleAuth(
        Store(db),
        max_failures=3,
        lock_seconds=lock_seconds,
        audit=audit,
        base_delay=BASE,
        max_delay=1.0,
        unknown_budget=6,
        clock=clock or Clock(),
    )


async def attempt(
    auth: PeopleAuth, user: str, password: str, source: str = "10.0.0.1", **kw: str
) -> LoginOutcome:
    return await auth.login(user, password, source=source, channel="test", **kw)


async def test_the_right_password_gives_the_account_s_role(db: Database) -> None:
    audit = AuditRecorder()
    auth = people(db, audit)
    assert await attempt(auth, "admin", "admin") == LoginOutcome(True, "admin", "admin", "")
    outcome = await attempt(auth, "user1", "pass1")
    assert (outcome.ok, outcome.role) == (True, "driver")
    assert audit.rows[0] == ("login", "ok", "admin", "10.0.0.1", "test")


async def test_every_refusal_reads_the_same(db: Database) -> None:
    auth = people(db)
    wrong = await attempt(auth, "user1", "pass2")
    unknown = await attempt(auth, "nobody", "pass1")
    # A right password on a channel for another role: refused, and counted, the same way.
    admin_as_driver = await attempt(auth, "admin", "admin", role="driver")
    for outcome in (wrong, unknown, admin_as_driver):
        assert (outcome.ok, outcome.role, outcome.reason) == (False, None, WRONG)
        assert outcome.retry_after is None
    for user in ("user1", "nobody", "admin"):
        assert auth.throttle.sources.retry_after((user, "10.0.0.1"), 1000.0) == 0.0
    assert len(auth.throttle.sources) == 3  # unknown accounts are counted like real ones


async def test_a_failing_source_is_blocked_and_the_right_password_elsewhere_gets_in(
    db: Database,
) -> None:
    audit = AuditRecorder()
    auth = people(db, audit)
    took = []
    for n in range(3):
        started = time.monotonic()
        outcome = await attempt(auth, "user2", f"guess{n}", source="10.6.6.6")
        took.append(time.monotonic() - started)
        assert outcome.ok is False
    assert took[0] >= BASE and took[1] >= 2 * BASE and took[2] >= 4 * BASE, took
    assert outcome.reason == "too many failed logins; try again in 30 s"
    assert outcome.retry_after == 30.0

    # The blocked source is refused even with the right password, unchecked and at once ...
    started = time.monotonic()
    right = await attempt(auth, "user2", "pass2", source="10.6.6.6")
    assert time.monotonic() - started < BASE
    assert right.ok is False and right.reason.startswith("too many failed logins; try again")
    # ... while the real driver, elsewhere, gets in at once; and a restarted Central forgets.
    started = time.monotonic()
    assert (await attempt(auth, "user2", "pass2", source="10.0.0.2")).ok
    assert time.monotonic() - started < 1.0
    assert (await attempt(people(db), "user2", "pass2", source="10.6.6.6")).ok
    actions = [(a, o, src) for a, o, actor, src, _ in audit.rows if actor == "user2"]
    assert actions == [
        ("login", "failed", "10.6.6.6"),
        ("login", "failed", "10.6.6.6"),
        ("login", "failed", "10.6.6.6"),
        ("throttle", "blocked", "10.6.6.6"),
        ("login", "ok", "10.0.0.2"),
    ]


async def test_blocks_run_out_and_grow_and_success_clears_the_count(db: Database) -> None:
    clock = Clock()
    auth = people(db, lock_seconds=100.0, clock=clock)
    for n in range(3):
        await attempt(auth, "user4", f"guess{n}")
    assert not (await attempt(auth, "user4", "pass4")).ok
    clock.now += 30.0
    # The block ran out: one more failure blocks again, twice as long.
    again = await attempt(auth, "user4", "guess3")
    assert again.retry_after == 60.0
    clock.now += 60.0
    assert (await attempt(auth, "user4", "pass4")).ok
    # Two failures, a success, two failures: never three in a row, never blocked.
    for password in ("x", "y", "pass4", "x", "y"):
        await attempt(auth, "user4", password)
    assert (await attempt(auth, "user4", "pass4")).ok


async def test_parallel_guesses_queue_behind_each_other_but_not_before_others(
    db: Database,
) -> None:
    audit = AuditRecorder()
    auth = people(db, audit)
    guesses = asyncio.gather(
        *(attempt(auth, "user5", f"guess{n}", source="10.6.6.6") for n in range(8))
    )
    await asyncio.sleep(BASE / 2)
    started = time.monotonic()
    assert (await attempt(auth, "user5", "pass5", source="10.0.0.5")).ok
    real_took = time.monotonic() - started
    outcomes = await guesses
    assert not any(o.ok for o in outcomes)
    blocked = [o for o in outcomes if o.retry_after]
    assert len(blocked) == 8 - 2  # the third failure blocks; every later guess finds it blocked
    assert real_took < 4 * BASE, real_took  # not behind the guesses' growing delays
    failed = [r for r in audit.rows if r[:2] == ("login", "failed")]
    assert len(failed) == 3  # guesses refused unchecked are not audited one by one
    assert auth._queues == {}  # nothing kept per account and source once attempts are done


async def test_made_up_sources_spend_a_budget_that_known_sources_do_not_need(
    db: Database,
) -> None:
    audit = AuditRecorder()
    auth = people(db, audit)
    assert (await attempt(auth, "user3", "pass3", source="the driver's app")).ok
    # An attacker with a new source for every guess: six (the budget), then new sources wait.
    for n in range(6):
        outcome = await attempt(auth, "user3", f"guess{n}", source=f"made-up {n}")
    assert outcome.retry_after == 30.0
    fresh = await attempt(auth, "user3", "pass3", source="made-up new")
    assert fresh.ok is False and fresh.retry_after is not None
    # The driver's own app has logged in before: it is not held by the budget.
    assert (await attempt(auth, "user3", "pass3", source="the driver's app")).ok
    assert ("throttle", "blocked") in [(a, o) for a, o, actor, _, _ in audit.rows]
