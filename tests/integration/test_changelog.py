"""The changelog's capture and replay on real SQLite files (EV_Central/changelog.py).

What the triggers queue in one database, applied to an empty one, gives the same rows: every
replicated table, REAL values to the last digit, BLOBs, deletions. Kafka is not involved here:
tests/e2e/test_high_availability.py carries the same records through a cluster.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from changelog_setup import capturing_database, queued, replay
from EV_Central import changelog, schema
from EV_Central.ha import adopt, fresh_database


def table_rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()


async def test_every_change_to_a_replicated_table_is_replayed_exactly(tmp_path: Path) -> None:
    source = tmp_path / "active.db"
    async with capturing_database(source) as db:
        precise = time.time() + 0.123456789  # more digits than json_object() prints
        async with db.transaction() as tx:
            schema.seed_demo(tx.conn)
            await tx.execute(
                "INSERT INTO sessions (id, cp_id, driver_id, origin, status, requested_at, kwh)"
                " VALUES ('s1', 'CP001', 'user1', 'driver', 'SUPPLYING', ?, 1.0000000001)",
                (precise,),
            )
            await tx.execute(
                "INSERT INTO channel_keys (key_id, kind, principal, key, issued_at)"
                " VALUES ('k1', 'cp', 'CP001', ?, ?)",
                (bytes(range(32)), precise),
            )
            await tx.execute(
                "INSERT INTO replay_guard (key_id, stream, last_seq) VALUES ('k1', 'events', 7)"
            )
            await tx.execute("INSERT INTO processed_messages VALUES ('m1', 1.5), ('m2', 2.5)")
            await tx.execute("INSERT INTO meta (key, value) VALUES ('identity_key', 'abc')")
            await tx.execute("INSERT INTO meta (key, value) VALUES ('local.role', 'active')")
        assert db.outbox_waiting.is_set()  # a commit that changed rows wakes the relay
        async with db.transaction() as tx:
            await tx.execute(
                "UPDATE users SET balance_cents = balance_cents - 123 WHERE id = 'user1'"
            )
            await tx.execute("UPDATE sessions SET status = 'COMPLETED' WHERE id = 's1'")
            await tx.execute("DELETE FROM processed_messages WHERE id = 'm1'")
        records = await queued(db)

    replica = tmp_path / "standby.db"
    assert replay(records, replica) == len(records)
    for table in changelog.REPLICATED:
        expected = table_rows(source, table)
        if table == "meta":  # this Central's own keys stay its own
            expected = [row for row in expected if not str(row[0]).startswith("local.")]
            expected = [row for row in expected if row[0] != "schema_version"]
            got = [row for row in table_rows(replica, table) if row[0] != "schema_version"]
        else:
            got = table_rows(replica, table)
        assert got == expected, table
    with sqlite3.connect(replica) as conn:
        requested, kwh = conn.execute("SELECT requested_at, kwh FROM sessions").fetchone()
        key = conn.execute("SELECT key FROM channel_keys").fetchone()[0]
    assert requested == precise and kwh == 1.0000000001
    assert key == bytes(range(32))
    assert [k for k, v in records if v is None] == [b'["processed_messages","m1"]']


def test_a_record_the_standby_cannot_read_is_skipped_not_fatal(tmp_path: Path) -> None:
    good = (
        b'["users","u9"]',
        json.dumps(
            {
                "id": "u9",
                "role": "driver",
                "password_hash": "x",
                "balance_cents": 5,
                "created_at": 1.0,
                "added_later": 1,
            }
        ).encode(),
    )
    records = [(b'["no_such_table",1]', b"{}"), (b"not json", b"{}"), good]
    path = tmp_path / "standby.db"
    assert replay(records, path) == 1
    assert table_rows(path, "users") == [("u9", "driver", "x", 5, 1.0)]


async def test_the_first_active_central_adopts_its_earlier_database(tmp_path: Path) -> None:
    path = tmp_path / "central.db"
    schema.initialise(path, seed=True)  # a network that ran with one Central
    before = {table: table_rows(path, table) for table in ("users", "charging_points")}
    db, previous = fresh_database(str(path))
    assert previous is not None and previous.exists()
    assert table_rows(path, "users") == []  # the Central itself starts empty
    await db.start()
    try:
        changelog.start_capture(db.conn)
        copied = await adopt(db, previous)
        records = await queued(db)
    finally:
        await db.stop()
    assert copied >= len(before["users"]) + len(before["charging_points"])
    replica = tmp_path / "standby.db"
    replay(records, replica)
    for table, rows in before.items():
        assert table_rows(path, table) == rows
        assert table_rows(replica, table) == rows
