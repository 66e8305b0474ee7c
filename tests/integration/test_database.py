"""Central's SQLite database on real files: init_db.py as a real process, and the async layer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from EV_Central.db import Database
from EV_Central.passwords import verify_password
from EV_Central.schema import DEMO_CPS
from EV_Central.store import Store
from helpers import scaled
from shared.messages import Heartbeat, encode

REPO_ROOT = Path(__file__).resolve().parents[2]
INIT_DB = REPO_ROOT / "init_db.py"
CP_IDS = [f"CP{i:03d}" for i in range(1, 11)]
DRIVER_IDS = [f"user{i}" for i in range(1, 6)]
PLAIN_PASSWORDS = [b"pass1", b"pass2", b"pass3", b"pass4", b"pass5"]


def init_db(*args: str | Path) -> str:
    """Run `python init_db.py ARGS` from the repository root; return its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "EV_DB"}
    proc = subprocess.run(
        [sys.executable, str(INIT_DB), *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert proc.returncode == 0, f"init_db.py failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def hashes(path: Path) -> dict[str, str]:
    return dict(query(path, "SELECT id, password_hash FROM users"))


def file_bytes(path: Path) -> bytes:
    """The database file and, when there is one, its write-ahead log."""
    data = path.read_bytes()
    wal = Path(f"{path}-wal")
    if wal.exists():
        data += wal.read_bytes()
    return data


# --- init_db.py ---------------------------------------------------------------------------


def test_init_db_creates_the_demo_charging_points(tmp_path: Path) -> None:
    db = tmp_path / "data" / "central.db"  # the folder does not exist yet
    out = init_db("--db", db)
    assert "10 charging points and 6 accounts added" in out
    rows = query(db, "SELECT id, location, price_eur_kwh, max_kw, in_service FROM charging_points")
    assert sorted(r[0] for r in rows) == CP_IDS
    by_id = {r[0]: r for r in rows}
    assert by_id["CP001"][2:] == (0.35, 22.0, 1)
    assert by_id["CP003"][1:4] == ("Alicante - Puerto, Muelle 12", 0.42, 50.0)
    assert by_id["CP010"][2:4] == (0.36, 7.4)
    assert sorted(r[:4] for r in rows) == sorted(DEMO_CPS)
    for cp_id, location, price, max_kw, in_service in rows:
        assert location.strip(), cp_id
        assert price > 0 and max_kw > 0 and in_service == 1, cp_id


def test_init_db_creates_the_demo_accounts(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    init_db("--db", db)
    users = {r[0]: r[1:] for r in query(db, "SELECT id, role, balance_cents FROM users")}
    assert sorted(users) == sorted([*DRIVER_IDS, "admin"])
    assert users["user1"] == ("driver", 15000)
    assert users["user2"] == ("driver", 20000)
    assert users["user3"] == ("driver", 7550)
    assert all(users[d][0] == "driver" for d in DRIVER_IDS)
    assert users["admin"][0] == "admin"


def test_stored_hashes_verify_the_demo_passwords(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    init_db("--db", db)
    stored = hashes(db)
    assert verify_password("pass1", stored["user1"])
    assert verify_password("pass2", stored["user2"])
    assert verify_password("pass3", stored["user3"])
    assert not verify_password("pass2", stored["user1"])
    assert verify_password("admin", stored["admin"])
    assert all(h.startswith("scrypt$") for h in stored.values())


def test_no_plain_text_password_anywhere_in_the_file(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    init_db("--db", db)
    data = file_bytes(db)
    assert b"CP001" in data and b"user1" in data  # the bytes read are the real content
    for password in PLAIN_PASSWORDS:
        assert password not in data, password
    # The admin's demo password is its own user name, so the file holds "admin" as the id
    # and the role; the hash column at least must not.
    assert "admin" not in hashes(db)["admin"]


def test_running_init_db_twice_adds_nothing_and_keeps_the_hashes(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    init_db("--db", db)
    before = query(db, "SELECT id, password_hash, balance_cents, created_at FROM users")
    cps_before = query(db, "SELECT * FROM charging_points ORDER BY id")
    out = init_db("--db", db)
    assert "0 charging points and 0 accounts added" in out
    after = query(db, "SELECT id, password_hash, balance_cents, created_at FROM users")
    assert sorted(after) == sorted(before)
    assert query(db, "SELECT * FROM charging_points ORDER BY id") == cps_before


def test_running_init_db_again_keeps_what_central_changed(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    init_db("--db", db)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE users SET balance_cents = 1 WHERE id = 'user1'")
    init_db("--db", db)
    assert query(db, "SELECT balance_cents FROM users WHERE id = 'user1'") == [(1,)]


def test_reset_starts_over(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    init_db("--db", db)
    before = hashes(db)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE users SET balance_cents = 1 WHERE id = 'user1'")
        conn.execute("INSERT INTO processed_messages (id, processed_at) VALUES ('m1', 0)")
    out = init_db("--db", db, "--reset")
    assert "10 charging points and 6 accounts added" in out
    after = hashes(db)
    assert after.keys() == before.keys()
    assert all(after[u] != before[u] for u in before), "reset must hash the passwords anew"
    assert verify_password("pass1", after["user1"])
    assert query(db, "SELECT balance_cents FROM users WHERE id = 'user1'") == [(15000,)]
    assert query(db, "SELECT COUNT(*) FROM processed_messages") == [(0,)]


def test_no_seed_creates_only_the_schema(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    out = init_db("--db", db, "--no-seed")
    assert "0 charging points and 0 accounts added" in out
    tables = {r[0] for r in query(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"charging_points", "users", "sessions", "processed_messages", "outbox"} <= tables
    assert query(db, "SELECT COUNT(*) FROM users") == [(0,)]
    assert query(db, "SELECT COUNT(*) FROM charging_points") == [(0,)]


# --- the async Database -------------------------------------------------------------------


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(tmp_path / "central.db")
    await db.start()
    try:
        yield db
    finally:
        await db.stop()


def beat(seq: int) -> Heartbeat:
    return Heartbeat(cp_id="CP001", engine_ok=True, seq=seq)


async def balance(db: Database, user_id: str) -> int:
    rows = await db.read("SELECT balance_cents FROM users WHERE id = ?", (user_id,))
    return int(rows[0]["balance_cents"])


async def test_start_on_a_missing_path_creates_and_seeds_it(tmp_path: Path) -> None:
    path = tmp_path / "new" / "central.db"
    assert not path.exists()
    db = Database(path)
    await db.start()
    try:
        assert path.exists()
        cps = await db.read("SELECT id FROM charging_points ORDER BY id")
        assert [r["id"] for r in cps] == CP_IDS
        assert await balance(db, "user1") == 15000
        assert await db.ping()
    finally:
        await db.stop()


async def test_start_on_an_existing_database_does_not_seed_it(tmp_path: Path) -> None:
    path = tmp_path / "central.db"
    init_db("--db", path, "--no-seed")
    db = Database(path)
    await db.start()
    try:
        rows = await db.read("SELECT COUNT(*) AS n FROM users")
        assert rows[0]["n"] == 0
    finally:
        await db.stop()


async def test_start_and_stop_are_idempotent(tmp_path: Path) -> None:
    db = Database(tmp_path / "central.db")
    await db.start()
    await db.start()
    await db.stop()
    await db.stop()
    with pytest.raises(RuntimeError):
        _ = db.conn


async def test_a_committed_transaction_is_visible_to_another_connection(
    database: Database,
) -> None:
    async with database.transaction() as tx:
        await tx.mark_processed("m1")
        await tx.execute("UPDATE users SET balance_cents = 100 WHERE id = 'user1'")
        await tx.publish("driver.updates", "user1", beat(1))
        assert tx.outgoing == 1
    path = database.path
    assert query(path, "SELECT balance_cents FROM users WHERE id = 'user1'") == [(100,)]
    assert query(path, "SELECT id FROM processed_messages") == [("m1",)]
    assert query(path, "SELECT topic, key FROM outbox") == [("driver.updates", "user1")]


async def test_a_failing_transaction_rolls_back_effect_outbox_and_idempotency_record(
    database: Database,
) -> None:
    with pytest.raises(RuntimeError, match="handler failed"):
        async with database.transaction() as tx:
            assert not await tx.seen("m1")
            await tx.mark_processed("m1")
            await tx.execute("UPDATE users SET balance_cents = 1 WHERE id = 'user1'")
            await tx.publish("driver.updates", "user1", beat(1))
            # Inside the transaction, every write is there...
            assert await tx.seen("m1")
            row = await tx.fetchone("SELECT COUNT(*) AS n FROM outbox")
            assert row is not None and row["n"] == 1
            raise RuntimeError("handler failed")
    # ...and after the error none of them is.
    assert await balance(database, "user1") == 15000
    assert await database.outbox_batch() == []
    async with database.transaction() as tx:
        assert not await tx.seen("m1")
    path = database.path
    assert query(path, "SELECT COUNT(*) FROM processed_messages") == [(0,)]
    assert query(path, "SELECT COUNT(*) FROM outbox") == [(0,)]


async def test_the_database_is_usable_after_a_rollback(database: Database) -> None:
    with pytest.raises(ValueError):
        async with database.transaction() as tx:
            await tx.execute("UPDATE users SET balance_cents = 1 WHERE id = 'user2'")
            raise ValueError
    async with database.transaction() as tx:
        await tx.execute("UPDATE users SET balance_cents = 2 WHERE id = 'user2'")
    assert await balance(database, "user2") == 2


async def test_a_constraint_violation_rolls_back_the_whole_transaction(
    database: Database,
) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        async with database.transaction() as tx:
            await tx.mark_processed("m2")
            await tx.publish("driver.updates", "user3", beat(1))
            # balance_cents >= 0 is a CHECK constraint: the driver cannot go negative.
            await tx.execute("UPDATE users SET balance_cents = -1 WHERE id = 'user3'")
    assert await balance(database, "user3") == 7550
    assert await database.outbox_batch() == []
    async with database.transaction() as tx:
        assert not await tx.seen("m2")


async def test_seen_and_mark_processed_make_a_handler_idempotent(database: Database) -> None:
    applied = 0

    async def handle(message_id: str) -> None:
        nonlocal applied
        async with database.transaction() as tx:
            if await tx.seen(message_id):
                return
            await tx.execute(
                "UPDATE users SET balance_cents = balance_cents - 100 WHERE id = 'user1'"
            )
            await tx.mark_processed(message_id)
            applied += 1

    await handle("m1")
    await handle("m1")  # a redelivery
    await handle("m2")
    assert applied == 2
    assert await balance(database, "user1") == 15000 - 200
    async with database.transaction() as tx:
        assert await tx.seen("m1") and await tx.seen("m2")
        assert not await tx.seen("m3")
        await tx.mark_processed("m1")  # marking twice is harmless
    assert query(database.path, "SELECT COUNT(*) FROM processed_messages") == [(2,)]


async def test_outbox_comes_back_in_order_and_outbox_done_deletes(database: Database) -> None:
    sent = [beat(i) for i in range(5)]
    async with database.transaction() as tx:
        for msg in sent[:3]:
            await tx.publish("cp.events", "CP001", msg)
    async with database.transaction() as tx:
        await tx.publish("driver.updates", "user1", sent[3])
        await tx.publish("cp.events", "CP002", sent[4])

    rows = await database.outbox_batch()
    assert [bytes(r["payload"]) for r in rows] == [encode(m) for m in sent]
    assert [(r["topic"], r["key"]) for r in rows] == [
        ("cp.events", "CP001"),
        ("cp.events", "CP001"),
        ("cp.events", "CP001"),
        ("driver.updates", "user1"),
        ("cp.events", "CP002"),
    ]
    seqs = [r["seq"] for r in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5

    first = await database.outbox_batch(limit=2)
    assert [r["seq"] for r in first] == seqs[:2]

    await database.outbox_done([r["seq"] for r in first])
    await database.outbox_done([])  # nothing to do
    rest = await database.outbox_batch()
    assert [r["seq"] for r in rest] == seqs[2:]
    assert [bytes(r["payload"]) for r in rest] == [encode(m) for m in sent[2:]]

    async with database.transaction() as tx:
        await tx.publish("cp.events", "CP003", beat(9))
    newest = await database.outbox_batch()
    assert newest[-1]["seq"] > seqs[-1], "sequence numbers are never reused"

    await database.outbox_done([r["seq"] for r in newest])
    assert await database.outbox_batch() == []
    assert query(database.path, "SELECT COUNT(*) FROM outbox") == [(0,)]


async def test_prune_forgets_only_old_idempotency_records(database: Database) -> None:
    async with database.transaction() as tx:
        await tx.mark_processed("recent")
        await tx.execute(
            "INSERT INTO processed_messages (id, processed_at) VALUES ('old', ?)",
            (time.time() - 7200,),
        )
    await database.prune(older_than_s=3600)
    async with database.transaction() as tx:
        assert await tx.seen("recent")
        assert not await tx.seen("old")


async def test_the_write_ahead_log_is_checkpointed_while_central_runs(tmp_path: Path) -> None:
    """Commits stay in the WAL (no fsync on the event loop); a thread copies them back."""
    db = Database(tmp_path / "central.db")
    await db.start()
    try:
        main_file = db.path.stat().st_size
        payload = b"x" * 4000
        async with db.transaction() as tx:
            await tx.executemany(
                "INSERT INTO outbox (topic, key, payload, created_at) VALUES (?, ?, ?, ?)",
                [("t", f"k{i}", payload, time.time()) for i in range(500)],
            )
        # Nothing wrote the 2 MB into the database file itself yet: they are in the WAL.
        assert db.path.stat().st_size < main_file + 1_000_000
        deadline = time.monotonic() + scaled(10)
        while db.path.stat().st_size < main_file + 1_000_000:
            assert time.monotonic() < deadline, "no checkpoint copied the WAL back"
            await asyncio.sleep(0.1)
        assert query(db.path, "SELECT COUNT(*) FROM outbox") == [(500,)]
    finally:
        await db.stop()


async def test_a_ticket_corrected_after_the_revision_acknowledged_stays_unseen(
    database: Database,
) -> None:
    """The driver acknowledges revision 1 while Central has just written revision 2 (the
    engine's late figures): the correction must still be offered to the driver. A chaos run
    found this (docs/reliability.md)."""
    store = Store(database)
    now = time.time()
    async with database.transaction() as tx:
        await tx.execute(
            "INSERT INTO sessions (id, cp_id, driver_id, origin, status, requested_at,"
            " ticket_revision) VALUES ('s1', 'CP001', 'user1', 'driver', 'COMPLETED', ?, 2)",
            (now,),
        )
    async with store.transaction() as stx:
        await stx.ack_ticket("s1", "user1", 1)
    assert [t.revision for t in await store.unseen_tickets("user1")] == [2]
    async with store.transaction() as stx:
        await stx.ack_ticket("s1", "user1", 2)
    assert await store.unseen_tickets("user1") == []
    async with store.transaction() as stx:
        await stx.ack_ticket("s1", "user1", 1)  # a late copy of the first ack changes nothing
        await stx.ack_ticket("s1", "user2", 2)  # nor another driver's
    assert await store.unseen_tickets("user1") == []
