"""Central's database access: one aiosqlite connection, explicit transactions.

Every state-changing handler runs in one transaction that also records the message id it
handles and the messages it must publish (the outbox), so an effect, its idempotency record
and its notifications commit together or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from EV_Central import schema
from shared.messages import Message, TicketData, encode

log = logging.getLogger(__name__)

ACTIVE_STATUSES = ("AUTHORISED", "SUPPLYING", "ENDING")
ENDED_STATUSES = ("COMPLETED", "ABORTED", "EXPIRED")


class Transaction:
    """The handle a handler writes through while its transaction is open."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self.outgoing = 0

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Cursor:
        return await self.conn.execute(sql, tuple(params))

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        await self.conn.executemany(sql, [tuple(r) for r in rows])

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Row | None:
        async with self.conn.execute(sql, tuple(params)) as cur:
            return await cur.fetchone()

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        async with self.conn.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())

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
        await self.execute(
            "INSERT INTO outbox (topic, key, payload, created_at) VALUES (?, ?, ?, ?)",
            (topic, key, encode(message), time.time()),
        )
        self.outgoing += 1


class Database:
    def __init__(self, path: str | Path, *, demo: bool = True) -> None:
        self.path = Path(path)
        self.demo = demo  # seed the demo CPs and accounts when the file is created
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

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
        conn = await aiosqlite.connect(str(self.path), isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA busy_timeout=5000")
        self._conn = conn

    async def stop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("database not started")
        return self._conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; one at a time."""
        async with self._lock:
            await self.conn.execute("BEGIN IMMEDIATE")
            tx = Transaction(self.conn)
            try:
                yield tx
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
            else:
                await self.conn.execute("COMMIT")

    async def read(self, sql: str, params: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        async with self._lock, self.conn.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())

    async def ping(self) -> bool:
        try:
            await self.read("SELECT 1")
        except Exception:
            return False
        return True

    # --- queries used by more than one handler ------------------------------------------

    async def outbox_batch(self, limit: int = 200) -> list[aiosqlite.Row]:
        return await self.read(
            "SELECT seq, topic, key, payload, created_at FROM outbox ORDER BY seq LIMIT ?",
            (limit,),
        )

    async def outbox_done(self, seqs: list[int]) -> None:
        if not seqs:
            return
        async with self.transaction() as tx:
            await tx.execute(f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(seqs))})", seqs)

    async def prune(self, older_than_s: float) -> None:
        """Forget idempotency records old enough that no redelivery can come."""
        cutoff = time.time() - older_than_s
        async with self.transaction() as tx:
            await tx.execute("DELETE FROM processed_messages WHERE processed_at < ?", (cutoff,))


def ticket_from_row(row: aiosqlite.Row | dict[str, Any]) -> TicketData:
    return TicketData(
        session_id=row["id"],
        cp_id=row["cp_id"],
        driver_id=row["driver_id"],
        kwh=round(row["kwh"], 4),
        price_eur_kwh=row["price_eur_kwh"],
        amount_eur=row["amount_cents"] / 100,
        reason=row["reason"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        revision=max(1, row["ticket_revision"]),
    )


def session_api(row: aiosqlite.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "cp_id": row["cp_id"],
        "driver_id": row["driver_id"],
        "status": row["status"],
        "origin": row["origin"],
        "kwh": round(row["kwh"], 4),
        "price_eur_kwh": row["price_eur_kwh"],
        "amount_eur": row["amount_cents"] / 100,
        "reason": row["reason"],
        "requested_at": row["requested_at"],
        "authorized_at": row["authorized_at"],
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
        "ticket_revision": row["ticket_revision"],
    }
