"""A deregistration and an enrolment token reach a standby Central through the changelog
(docs/high-availability.md, docs/registry.md), on real SQLite files.

What an active Central writes when it issues a token, and when it deregisters a CP, replayed
into an empty database as a standby applies it: the standby has the same token hash and no
such CP; the CP's state on the public state topic is tombstoned in the same transaction.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from changelog_setup import capturing_database, queued, replay
from EV_Central import schema
from EV_Central.enrolment import token_hash
from EV_Central.store import Store
from shared.bus import Topics


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


async def test_tokens_and_deregistrations_are_in_the_changelog(tmp_path: Path) -> None:
    source = tmp_path / "active.db"
    async with capturing_database(source) as db:
        async with db.transaction() as seeding:
            schema.seed_demo(seeding.conn)
        store = Store(db)
        async with store.transaction() as tx:
            await tx.replace_enrolment(token_hash("token-of-CP001"), "CP001", 100.0, 1e12)
            await tx.replace_enrolment(token_hash("first-of-CP002"), "CP002", 100.0, 1e12)
            await tx.replace_enrolment(token_hash("later-of-CP002"), "CP002", 101.0, 1e12)
        async with store.transaction() as tx:
            assert await tx.consume_enrolment(token_hash("token-of-CP001"), "CP001", 200.0)
            assert not await tx.consume_enrolment(token_hash("token-of-CP001"), "CP001", 200.0)
            assert not await tx.consume_enrolment(token_hash("first-of-CP002"), "CP002", 200.0)
        async with store.transaction() as tx:
            await tx.delete_cp("CP003")
        records = await queued(db)
        tombstones = await db.read(
            "SELECT key, payload FROM outbox WHERE topic = ?", (Topics.CP_STATE,)
        )

    assert [(r["key"], bytes(r["payload"])) for r in tombstones] == [("CP003", b"")]
    replica = tmp_path / "standby.db"
    replay(records, replica)
    token_sql = "SELECT token_hash, cp_id FROM enrolment_tokens ORDER BY 1"
    assert rows(replica, token_sql) == rows(source, token_sql)
    assert rows(replica, token_sql) == [(token_hash("later-of-CP002"), "CP002")]
    assert rows(replica, "SELECT id FROM charging_points WHERE id = 'CP003'") == []
    assert rows(replica, "SELECT COUNT(*) FROM charging_points") == [(len(schema.DEMO_CPS) - 1,)]
