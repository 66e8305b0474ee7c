"""Central's database access: one SQLite connection, explicit transactions.

Every state-changing handler runs in one transaction that also records the message id it
handles and the messages it must publish (the outbox), so an effect, its idempotency record
and its notifications commit together or not at all.

Statements run on the event loop's own thread. In WAL mode with synchronous=NORMAL a
statement or a commit is a few microseconds of work in memory and the page cache, never an
fsync; going through a worker thread instead cost a full event-loop turn per statement,
which under ten thousand monitor connections was tens of milliseconds each. The one slow
step, copying the write-ahead log back into the database file (a checkpoint, with its
fsyncs), runs in a thread of its own on a second connection (`CHECKPOINT_INTERVAL`).
The methods stay coroutines, so callers do not depend on where the work is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from EV_Central import schema
from shared.messages import Message, encode

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 1.0  # seconds between write-ahead-log checkpoints
BUSY_TIMEOUT_MS = 5000  # how long a write waits for another process's (user CLI) to finish


class Transaction:
    """The handle a handler writes through while its transaction is open."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.outgoing = 0

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, tuple(params))

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        self.conn.executemany(sql, [tuple(r) for r in rows])

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(sql, tuple(params)).fetchone()
        return row

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, tuple(params)).fetchall()

    async def seen(self, message_id: str) -> bool:
        """True when this message id was handled before (a redelivery)."""
        row = await self.fetchone("SELECT 1 FROM processed_messages WHERE id = ?", (message_id,))
        return row is not None

    async def mark_processed(self, message_id: str) -> None:
        await self.execute(
            "INSERT OR IGNORE INTO processed_messages (id, processed_at) VALUES (?, ?)",
            (message_id, time.time()),
        )

    async def publish(self, topic: str, key: str, message: Message) -> None:
        """Queue a message; the outbox relay sends it once this transaction commits."""
        await self._queue(topic, key, encode(message))

    async def publish_tombstone(self, topic: str, key: str) -> None:
        """Queue a tombstone (a record with no value) for `key` on a compacted topic: its
        readers forget the key, and compaction drops its older records."""
        await self._queue(topic, key, b"")

    async def _queue(self, topic: str, key: str, payload: bytes) -> None:
        await self.execute(
            "INSERT INTO outbox (topic, key, payload, created_at) VALUES (?, ?, ?, ?)",
            (topic, key, payload, time.time()),
        )
        self.outgoing += 1


class Database:
    def __init__(self, path: str | Path, *, demo: bool = True) -> None:
        self.path = Path(path)
        self.demo = demo  # seed the demo CPs and accounts when the file is created
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._checkpointer: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # Set when a transaction that queued messages commits; the outbox relay waits for it.
        self.outbox_waiting = asyncio.Event()
        # High-availability mode: triggers queue every change (EV_Central/changelog.py), so
        # any transaction that changed a row may have queued something.
        self.capturing = False

    async def start(self) -> None:
        if self._conn is not None:
            return
        if not self.path.exists():
            cps, users = await asyncio.to_thread(schema.initialise, self.path, seed=self.demo)
            log.info("created database %s (%d CPs, %d accounts)", self.path, cps, users)
            if not self.demo:
                log.warning(
                    "the new database has no accounts: create an admin with "
                    "'python -m EV_Central user add NAME --role admin --db %s'",
                    self.path,
                )
        else:
            await asyncio.to_thread(schema.initialise, self.path, seed=False)
        conn = sqlite3.connect(str(self.path), isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
        self._conn = conn
        self._stopping.clear()
        self._checkpointer = asyncio.get_running_loop().create_task(
            self._checkpoints(), name="db-checkpoint"
        )

    async def stop(self) -> None:
        task, self._checkpointer = self._checkpointer, None
        if task is not None:
            self._stopping.set()  # it ends after the checkpoint in progress, if any
            with contextlib.suppress(Exception):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # the last connection to close checkpoints what is left

    async def _checkpoints(self) -> None:
        """Copy the write-ahead log into the database file, off the event loop's thread."""
        checkpointer = await asyncio.to_thread(
            sqlite3.connect, str(self.path), check_same_thread=False
        )
        try:
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), CHECKPOINT_INTERVAL)
                try:
                    await asyncio.to_thread(checkpointer.execute, "PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    log.warning("database checkpoint failed: %s", exc)
        finally:
            await asyncio.to_thread(checkpointer.close)

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("database not started")
        return self._conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; one at a time."""
        async with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            tx = Transaction(self.conn)
            changes = self.conn.total_changes
            try:
                yield tx
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")
                if tx.outgoing or (self.capturing and self.conn.total_changes != changes):
                    self.outbox_waiting.set()

    async def read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            return self.conn.execute(sql, tuple(params)).fetchall()

    async def ping(self) -> bool:
        try:
            await self.read("SELECT 1")
        except Exception:
            return False
        return True

    # --- queries used by more than one handler ------------------------------------------

    async def outbox_batch(self, limit: int = 200, after: int = 0) -> list[sqlite3.Row]:
        """The oldest LIMIT messages waiting in the outbox, from sequence AFTER + 1 on."""
        return await self.read(
            "SELECT seq, topic, key, payload, created_at FROM outbox WHERE seq > ?"
            " ORDER BY seq LIMIT ?",
            (after, limit),
        )

    async def outbox_all(self, after: int = 0) -> list[sqlite3.Row]:
        """Every row waiting in the outbox from sequence AFTER + 1 on (whole transactions)."""
        return await self.read(
            "SELECT seq, topic, key, payload, created_at FROM outbox WHERE seq > ? ORDER BY seq",
            (after,),
        )

    async def outbox_last(self) -> int:
        """The newest outbox sequence number still waiting (0 when the outbox is empty)."""
        rows = await self.read("SELECT COALESCE(MAX(seq), 0) AS seq FROM outbox")
        return int(rows[0]["seq"])

    async def outbox_done(self, seqs: list[int]) -> None:
        if not seqs:
            return
        # One JSON parameter: a transaction of the HA relay can carry more rows than SQLite
        # takes parameters (32,766), after Kafka was away for a while.
        async with self.transaction() as tx:
            await tx.execute(
                "DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))",
                (json.dumps(seqs),),
            )

    async def prune(self, older_than_s: float) -> None:
        """Forget idempotency records old enough that no redelivery can come."""
        cutoff = time.time() - older_than_s
        async with self.transaction() as tx:
            await tx.execute("DELETE FROM processed_messages WHERE processed_at < ?", (cutoff,))
