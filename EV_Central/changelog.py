"""Central's changelog: every change to the replicated tables, in Kafka, in commit order.

In high-availability mode (docs/high-availability.md) SQLite itself records what changes:
triggers on each replicated table write the new row (or, for a deletion, its key) into the
outbox, in the same SQLite transaction as the change and as the messages that acknowledge it.
The outbox relay sends them to the compacted topic `ev.central.changelog` in one Kafka
transaction with those messages, so a change and its acknowledgement land together or not at
all. A record's key is `[table, primary key...]` (JSON), its value the row as a JSON object,
or nothing (a tombstone) when the row was deleted; compaction keeps the newest row per key.

`Replica` reads the topic into a standby's database; `apply` writes a batch of records. Only
committed Kafka transactions are read, so a standby never sees what a fenced Central wrote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from EV_Central.db import Database
from shared.bus import KafkaBus, Topics

log = logging.getLogger(__name__)

TOPIC = Topics.CENTRAL_CHANGELOG
PARTITION = TopicPartition(TOPIC, 0)

# Every table whose rows a standby must have, with its primary key. Not replicated: the outbox
# (what this Central still has to send) and the meta keys that start with "local." (this
# Central's own role and progress).
REPLICATED: dict[str, tuple[str, ...]] = {
    "meta": ("key",),
    "charging_points": ("id",),
    "users": ("id",),
    "sessions": ("id",),
    "processed_messages": ("id",),
    "channel_keys": ("key_id",),
    "replay_guard": ("key_id", "stream"),
    "audit_log": ("id",),
    "consumer_positions": ("topic", "partition"),
    "web_sessions": ("key",),
    "enrolment_tokens": ("token_hash",),
    "weather": ("place",),
}
LOCAL_META = "local.%"

# What the triggers compute as the time a change was queued (seconds since the epoch).
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    return [(row[1], str(row[2]).upper()) for row in conn.execute(f"PRAGMA table_info({table})")]


def _json_value(column: str, declared: str, row: str) -> str:
    value = f"{row}.{column}"
    if declared == "BLOB":
        return f"CASE WHEN {value} IS NULL THEN NULL ELSE hex({value}) END"
    if declared == "REAL":
        # json_object() prints 15 digits; quote() prints as many as the value needs.
        return f"CASE WHEN {value} IS NULL THEN NULL ELSE json(quote({value})) END"
    return value


def _trigger_sql(conn: sqlite3.Connection, table: str, key: tuple[str, ...]) -> list[str]:
    columns = _columns(conn, table)
    row = ", ".join(f"'{name}', {_json_value(name, kind, 'NEW')}" for name, kind in columns)
    only = f" WHEN NEW.key NOT LIKE '{LOCAL_META}'" if table == "meta" else ""
    only_old = f" WHEN OLD.key NOT LIKE '{LOCAL_META}'" if table == "meta" else ""

    def key_of(which: str) -> str:
        return f"json_array('{table}', {', '.join(f'{which}.{name}' for name in key)})"

    def queue(key_sql: str, payload: str) -> str:
        return (
            "INSERT INTO outbox (topic, key, payload, created_at)"
            f" VALUES ('{TOPIC}', {key_sql}, {payload}, {_NOW});"
        )

    tombstone = "''"
    return [
        f"CREATE TRIGGER IF NOT EXISTS changelog_{table}_insert AFTER INSERT ON {table}{only}"
        f" BEGIN {queue(key_of('NEW'), f'json_object({row})')} END",
        f"CREATE TRIGGER IF NOT EXISTS changelog_{table}_update AFTER UPDATE ON {table}{only}"
        f" BEGIN {queue(key_of('NEW'), f'json_object({row})')} END",
        f"CREATE TRIGGER IF NOT EXISTS changelog_{table}_delete AFTER DELETE ON {table}{only_old}"
        f" BEGIN {queue(key_of('OLD'), tombstone)} END",
    ]


def start_capture(conn: sqlite3.Connection) -> None:
    """Create the triggers: from now on every change to a replicated table is queued."""
    with conn:
        for table, key in REPLICATED.items():
            for statement in _trigger_sql(conn, table, key):
                conn.execute(statement)


def stop_capture(conn: sqlite3.Connection) -> None:
    """Drop the triggers (a standby applies changes without queueing them again)."""
    with conn:
        for table in REPLICATED:
            for event in ("insert", "update", "delete"):
                conn.execute(f"DROP TRIGGER IF EXISTS changelog_{table}_{event}")


def apply(conn: sqlite3.Connection, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
    """Write changelog records (key, value) into the database; return how many were applied.

    The caller holds a transaction. A record for an unknown table, or one that does not parse,
    is logged and skipped: a newer Central's changelog must not stop an older standby.
    """
    applied = 0
    columns: dict[str, dict[str, str]] = {}
    for raw_key, raw_value in records:
        try:
            table, *key_values = json.loads(raw_key or b"")
            key = REPLICATED[table]
            if table not in columns:
                columns[table] = dict(_columns(conn, table))
            if not raw_value:
                where = " AND ".join(f"{name} = ?" for name in key)
                conn.execute(f"DELETE FROM {table} WHERE {where}", key_values)
            else:
                row = _row(columns[table], json.loads(raw_value))
                names = ", ".join(row)
                marks = ", ".join("?" * len(row))
                conn.execute(
                    f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})",
                    list(row.values()),
                )
            applied += 1
        except (ValueError, KeyError, TypeError, sqlite3.Error) as exc:
            log.warning("skipped a changelog record %r: %s", raw_key, exc)
    return applied


def _row(declared: dict[str, str], data: dict[str, Any]) -> dict[str, Any]:
    """The columns this database knows, with BLOBs back from hex."""
    row: dict[str, Any] = {}
    for name, value in data.items():
        if name not in declared:
            continue  # a column a newer Central added
        if declared[name] == "BLOB" and isinstance(value, str):
            value = bytes.fromhex(value)
        row[name] = value
    return row


class Replica:
    """A standby's copy of the changelog: read from the start, applied as it comes."""

    def __init__(self, bus: KafkaBus, db: Database) -> None:
        self._bus = bus
        self._db = db
        self._consumer: AIOKafkaConsumer | None = None
        self.applied = 0  # records applied so far
        self.position = 0  # the next changelog offset to read
        self.end = 0  # the end of the changelog when last looked at
        self.started = asyncio.Event()  # the consumer is positioned

    async def run(self) -> None:
        """Apply the changelog as it grows, until cancelled."""
        consumer = await self._bus.assigned_consumer([PARTITION], None)
        await consumer.seek_to_beginning(PARTITION)
        self._consumer = consumer
        self.started.set()
        while True:
            await self.read_once(timeout_ms=500)

    async def read_once(self, timeout_ms: int) -> int:
        consumer = self._consumer
        if consumer is None:
            return 0
        batches = await consumer.getmany(PARTITION, timeout_ms=timeout_ms, max_records=5000)
        records: list[ConsumerRecord[bytes, bytes]] = batches.get(PARTITION, [])
        applied = 0
        if records:
            async with self._db.transaction() as tx:
                applied = apply(tx.conn, ((r.key, r.value) for r in records))
            self.applied += applied
        self.position = await consumer.position(PARTITION)
        return applied

    async def catch_up(self) -> int:
        """Read to the changelog's end as it is now (after fencing: nothing more can come).

        Reading only committed transactions, the end is the first offset of any transaction
        still open; once the new active has fenced the old one, that one's open transaction
        is aborted and the end is the log's end. Returns the end offset.
        """
        await self.started.wait()
        consumer = self._consumer
        assert consumer is not None
        self.end = (await consumer.end_offsets([PARTITION]))[PARTITION]
        while await consumer.position(PARTITION) < self.end:
            await self.read_once(timeout_ms=200)
            self.end = max(self.end, (await consumer.end_offsets([PARTITION]))[PARTITION])
        self.position = await consumer.position(PARTITION)
        return self.end

    async def lag(self) -> int:
        """How many changelog offsets this copy is behind (0 when caught up)."""
        consumer = self._consumer
        if consumer is None:
            return 0
        end: int = (await consumer.end_offsets([PARTITION]))[PARTITION]
        self.end = end
        return max(0, end - self.position)
