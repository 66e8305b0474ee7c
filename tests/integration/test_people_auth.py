"""People logging in (EV_Central.auth.PeopleAuth) against a real, seeded SQLite database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from EV_Central.auth import WRONG, LoginOutcome, PeopleAuth, failure_delay
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


def people(
    db: Database, audit: AuditRecorder | None = None, lock_seconds: float = 60.0
) -> PeopleAuth:
    return PeopleAuth(
        Store(db),
        max_failures=3,
        lock_seconds=lock_seconds,
        audit=audit,
        base_delay=BASE,
        max_delay=1.0,
    )


async def attempt(auth: PeopleAuth, user: str, password: str, **kw: str) -> LoginOutcome:
    return await auth.login(user, password, source="127.0.0.1:1", channel="test", **kw)


def test_the_delay_doubles_up_to_its_cap() -> None:
    assert [failure_delay(n) for n in range(0, 6)] == [0.0, 0.2, 0.4, 0.8, 1.6, 3.0]
    assert failure_delay(500) == 3.0


async def test_the_right_password_gives_the_account_s_role(db: Database) -> None:
    audit = AuditRecorder()
    auth = people(db, audit)
    assert await attempt(auth, "admin", "admin") == LoginOutcome(True, "admin", "admin", "")
    outcome = await attempt(auth, "user1", "pass1")
    assert (outcome.ok, outcome.role) == (True, "driver")
    assert audit.rows[0] == ("login", "ok", "admin", "127.0.0.1:1", "test")


async def test_every_refusal_reads_the_same(db: Database) -> None:
    auth = people(db)
    wrong = await attempt(auth, "user1", "pass2")
    unknown = await attempt(auth, "nobody", "pass1")
    # A right password on a channel for another role: refused, and counted, the same way.
    admin_as_driver = await attempt(auth, "admin", "admin", role="driver")
    for outcome in (wrong, unknown, admin_as_driver):
        assert (outcome.ok, outcome.role, outcome.reason) == (False, None, WRONG)
        assert outcome.retry_after is None
    rows = await db.read("SELECT user_id, failures FROM login_state ORDER BY user_id")
    assert [(r["user_id"], r["failures"]) for r in rows] == [
        ("admin", 1),
        ("nobody", 1),
        ("user1", 1),
    ]


async def test_failures_slow_down_then_lock_even_the_right_password(db: Database) -> None:
    audit = AuditRecorder()
    auth = people(db, audit)
    took = []
    for n in range(3):
        started = time.monotonic()
        outcome = await attempt(auth, "user2", f"guess{n}")
        took.append(time.monotonic() - started)
        assert outcome.ok is False
    assert took[0] >= BASE and took[1] >= 2 * BASE and took[2] >= 4 * BASE, took
    assert took[2] > took[0], took
    assert outcome.reason == "account locked, try again in 60 s"
    assert outcome.retry_after == 60.0

    right = await attempt(auth, "user2", "pass2")
    assert right.ok is False and right.reason.startswith("account locked, try again in ")
    assert right.retry_after is not None and 58 < right.retry_after <= 60
    # Another account is not touched; a new PeopleAuth (Central restarted) still sees the lock.
    assert (await attempt(auth, "user3", "pass3")).ok
    assert not (await attempt(people(db), "user2", "pass2")).ok
    actions = [(a, o) for a, o, actor, _, _ in audit.rows if actor == "user2"]
    assert actions == [
        ("login", "failed"),
        ("login", "failed"),
        ("login", "failed"),
        ("lockout", "locked"),
        ("login", "locked"),
    ]


async def test_a_lock_runs_out_and_success_clears_the_count(db: Database) -> None:
    auth = people(db, lock_seconds=0.5)
    for n in range(3):
        await attempt(auth, "user4", f"guess{n}")
    assert not (await attempt(auth, "user4", "pass4")).ok
    await asyncio.sleep(0.6)
    assert (await attempt(auth, "user4", "pass4")).ok
    assert not await db.read("SELECT 1 FROM login_state WHERE user_id = 'user4'")
    # Two failures, a success, two failures: never three in a row, never locked.
    for password in ("x", "y", "pass4", "x", "y"):
        await attempt(auth, "user4", password)
    assert (await attempt(auth, "user4", "pass4")).ok


async def test_parallel_guesses_queue_and_cannot_outrun_the_lock(db: Database) -> None:
    auth = people(db)
    outcomes = await asyncio.gather(*(attempt(auth, "user5", f"guess{n}") for n in range(8)))
    assert not any(o.ok for o in outcomes)
    locked = [o for o in outcomes if o.reason.startswith("account locked")]
    assert len(locked) == 8 - 2  # the third failure locks; every later guess finds it locked
    rows = await db.read("SELECT failures FROM login_state WHERE user_id = 'user5'")
    assert rows[0]["failures"] == 3
    assert auth._queues == {}  # nothing kept per account once its attempts are done
