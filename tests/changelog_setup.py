"""Central's changelog in tests: a database whose changes are captured, what it queued, and a
replay of that into a standby's database (EV_Central/changelog.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from EV_Central import changelog, schema
from EV_Central.db import Database
from shared.bus import Topics


@asynccontextmanager
async def capturing_database(path: Path) -> AsyncIterator[Database]:
    """An empty (unseeded) Central database at `path` whose every change is queued for the
    changelog, as an active Central's is; stopped at the end."""
    schema.initialise(path, seed=False)
    db = Database(path, demo=False)
    await db.start()
    try:
        changelog.start_capture(db.conn)
        db.capturing = True
        yield db
    finally:
        await db.stop()


async def queued(db: Database) -> list[tuple[bytes, bytes | None]]:
    """The changelog records waiting in the outbox, as the relay would send them."""
    rows = await db.read(
        "SELECT key, payload FROM outbox WHERE topic = ? ORDER BY seq", (Topics.CENTRAL_CHANGELOG,)
    )
    return [(r["key"].encode(), r["payload"].encode() or None) for r in rows]


def replay(records: list[tuple[bytes, bytes | None]], path: Path) -> int:
    """Apply `records` to a new database at `path`; how many were applied."""
    schema.initialise(path, seed=False)
    with sqlite3.connect(path) as conn:
        return changelog.apply(conn, records)
