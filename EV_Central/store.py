"""Every SQL statement of Central's service and admin web, behind methods named for the domain.

`Store.transaction()` opens one database transaction (EV_Central/db.py) and hands back a
`StoreTx` whose methods read and write sessions, balances, CPs and keys, record handled
message ids and queue messages in the outbox. When a transaction that queued messages commits,
the database wakes the outbox relay so the messages leave at once. Reads that need no
transaction are methods of `Store` itself.

Two kinds of statement live elsewhere, each beside what it serves: the audit chain's
(EV_Central/audit.py: a row's hash covers the previous row, read and written in one
transaction) and the transaction plumbing of EV_Central/db.py (handled message ids, the outbox
table the relay drains).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from EV_Central.db import Database, Transaction
from EV_Central.session import ACTIVE_STATUSES, Send, Session, SessionStatus
from shared.bus import Topics
from shared.messages import TicketData

# Columns of the sessions table that `save_session` writes (all but the id and the request).
_SESSION_FIELDS = (
    "status",
    "price_eur_kwh",
    "max_kw",
    "authorized_at",
    "expires_at",
    "started_at",
    "ended_at",
    "kw",
    "kwh",
    "amount_cents",
    "last_telemetry_at",
    "reason",
    "ticket_revision",
)
_ACTIVE = ",".join(f"'{status}'" for status in ACTIVE_STATUSES)


@dataclass(frozen=True)
class RegisteredCP:
    id: str
    location: str
    price_eur_kwh: float
    max_kw: float
    in_service: bool


def session_from_row(row: sqlite3.Row) -> Session:
    return Session(
        session_id=row["id"],
        cp_id=row["cp_id"],
        driver_id=row["driver_id"],
        status=SessionStatus(row["status"]),
        price_eur_kwh=row["price_eur_kwh"],
        max_kw=row["max_kw"],
        origin=row["origin"],
        request_id=row["request_id"] or "",
        requested_at=row["requested_at"],
        authorized_at=row["authorized_at"],
        expires_at=row["expires_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        kw=row["kw"],
        kwh=row["kwh"],
        amount_cents=int(row["amount_cents"]),
        reason=row["reason"],
        ticket_revision=int(row["ticket_revision"]),
        last_seq=row["last_telemetry_seq"] if row["last_telemetry_seq"] is not None else -1,
        last_telemetry_at=row["last_telemetry_at"],
    )


def session_api(row: sqlite3.Row) -> dict[str, Any]:
    """A session as the admin API shows it."""
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


class StoreTx:
    """What a handler reads and writes while its transaction is open."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    # --- idempotency and the outbox -----------------------------------------------------------

    async def seen(self, message_id: str) -> bool:
        return await self._tx.seen(message_id)

    async def mark_processed(self, message_id: str) -> None:
        await self._tx.mark_processed(message_id)

    async def publish(self, sends: Iterable[Send]) -> None:
        for send in sends:
            await self._tx.publish(send.topic, send.key, send.message)

    # --- drivers ------------------------------------------------------------------------------

    async def account(self, user_id: str) -> tuple[str, int] | None:
        """A user's role and balance in cents, or None when unknown."""
        row = await self._tx.fetchone(
            "SELECT role, balance_cents FROM users WHERE id = ?", (user_id,)
        )
        return (row["role"], int(row["balance_cents"])) if row else None

    async def balance(self, driver_id: str) -> int:
        account = await self.account(driver_id)
        return account[1] if account else 0

    async def balances(self, driver_ids: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for i in range(0, len(driver_ids), 500):
            chunk = list(driver_ids[i : i + 500])
            for row in await self._tx.fetchall(
                f"SELECT id, balance_cents FROM users WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            ):
                found[row["id"]] = int(row["balance_cents"])
        return found

    async def debit(self, driver_id: str, cents: int) -> None:
        if cents:
            await self._tx.execute(
                "UPDATE users SET balance_cents = balance_cents - ? WHERE id = ?",
                (cents, driver_id),
            )

    async def driver_busy(self, driver_id: str) -> bool:
        """True when the driver has a session in progress."""
        row = await self._tx.fetchone(
            f"SELECT 1 FROM sessions WHERE driver_id = ? AND status IN ({_ACTIVE})", (driver_id,)
        )
        return row is not None

    async def ack_ticket(self, session_id: str, driver_id: str, revision: int) -> None:
        """The driver has seen `revision` of the ticket (not a correction made since)."""
        await self._tx.execute(
            "UPDATE sessions SET ticket_seen = MAX(ticket_seen, MIN(?, ticket_revision))"
            " WHERE id = ? AND driver_id = ?",
            (revision, session_id, driver_id),
        )

    # --- sessions -----------------------------------------------------------------------------

    async def session(self, session_id: str) -> Session | None:
        row = await self._tx.fetchone("SELECT * FROM sessions WHERE id = ?", (session_id,))
        return session_from_row(row) if row else None

    async def insert_session(self, s: Session) -> None:
        await self._tx.execute(
            "INSERT INTO sessions (id, cp_id, driver_id, request_id, origin, status,"
            " price_eur_kwh, max_kw, requested_at, authorized_at, expires_at, reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                s.session_id,
                s.cp_id,
                s.driver_id,
                s.request_id,
                s.origin,
                s.status.value,
                s.price_eur_kwh,
                s.max_kw,
                s.requested_at,
                s.authorized_at,
                s.expires_at,
                s.reason,
            ),
        )

    async def save_session(self, s: Session) -> None:
        values = [getattr(s, name) for name in _SESSION_FIELDS]  # status is a str enum
        await self._tx.execute(
            f"UPDATE sessions SET {', '.join(f'{name} = ?' for name in _SESSION_FIELDS)},"
            " last_telemetry_seq = ? WHERE id = ?",
            (*values, s.last_seq if s.last_seq >= 0 else None, s.session_id),
        )

    async def save_telemetry(self, sessions: Iterable[Session]) -> None:
        """The live figures of many sessions; kwh only grows and seq only moves forward."""
        await self._tx.executemany(
            "UPDATE sessions SET kw = ?, kwh = MAX(kwh, ?), last_telemetry_at = ?,"
            " last_telemetry_seq = MAX(COALESCE(last_telemetry_seq, -1), ?) WHERE id = ?",
            [(s.kw, s.kwh, s.last_telemetry_at, s.last_seq, s.session_id) for s in sessions],
        )

    # --- charging points ----------------------------------------------------------------------

    async def insert_cp(self, cp: RegisteredCP, secret_hash: str, created_at: float) -> None:
        await self._tx.execute(
            "INSERT INTO charging_points"
            " (id, location, price_eur_kwh, max_kw, created_at, secret_hash)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (cp.id, cp.location, cp.price_eur_kwh, cp.max_kw, created_at, secret_hash),
        )

    async def set_in_service(self, cp_ids: Iterable[str], in_service: bool) -> None:
        await self._tx.executemany(
            "UPDATE charging_points SET in_service = ? WHERE id = ?",
            [(int(in_service), cp_id) for cp_id in cp_ids],
        )

    async def set_secret_hash(self, cp_id: str, secret_hash: str) -> None:
        await self._tx.execute(
            "UPDATE charging_points SET secret_hash = ? WHERE id = ?", (secret_hash, cp_id)
        )

    async def delete_cp(self, cp_id: str) -> None:
        """Deregister a CP: its row and enrolment tokens go, and its state on the compacted
        state topic is tombstoned (its sessions stay, with their tickets)."""
        await self._tx.execute("DELETE FROM enrolment_tokens WHERE cp_id = ?", (cp_id,))
        await self._tx.execute("DELETE FROM charging_points WHERE id = ?", (cp_id,))
        await self._tx.publish_tombstone(Topics.CP_STATE, cp_id)

    # --- enrolment tokens ---------------------------------------------------------------------

    async def replace_enrolment(
        self, token_hash: str, cp_id: str, issued_at: float, expires_at: float
    ) -> None:
        """The CP's one enrolment token from now on (an earlier one, or any expired, goes)."""
        await self._tx.execute(
            "DELETE FROM enrolment_tokens WHERE cp_id = ? OR expires_at <= ?", (cp_id, issued_at)
        )
        await self._tx.execute(
            "INSERT INTO enrolment_tokens (token_hash, cp_id, issued_at, expires_at)"
            " VALUES (?, ?, ?, ?)",
            (token_hash, cp_id, issued_at, expires_at),
        )

    async def consume_enrolment(self, token_hash: str, cp_id: str, now: float) -> bool:
        """Use up the CP's token with this hash: True when it was there and still valid."""
        cursor = await self._tx.execute(
            "DELETE FROM enrolment_tokens WHERE token_hash = ? AND cp_id = ? AND expires_at > ?",
            (token_hash, cp_id, now),
        )
        return cursor.rowcount == 1

    # --- channel keys ---------------------------------------------------------------------------

    async def insert_key(
        self,
        key_id: str,
        kind: str,
        principal: str,
        key: bytes,
        issued_at: float,
        expires_at: float | None,
    ) -> None:
        await self._tx.execute(
            "INSERT INTO channel_keys (key_id, kind, principal, key, issued_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key_id, kind, principal, key, issued_at, expires_at),
        )

    async def retire_key(self, key_id: str, at: float) -> None:
        await self._tx.execute(
            "UPDATE channel_keys SET retired_at = ? WHERE key_id = ?", (at, key_id)
        )

    async def revoke_key(self, key_id: str, at: float) -> None:
        await self._tx.execute(
            "UPDATE channel_keys SET revoked_at = ? WHERE key_id = ?", (at, key_id)
        )

    async def revoke_keys_of(self, kind: str, principal: str, at: float) -> None:
        await self._tx.execute(
            "UPDATE channel_keys SET revoked_at = ? WHERE kind = ? AND principal = ?"
            " AND revoked_at IS NULL",
            (at, kind, principal),
        )

    async def save_replay_guard(self, rows: Iterable[tuple[Any, ...]]) -> None:
        await self._tx.executemany(
            "INSERT INTO replay_guard (key_id, stream, last_seq) VALUES (?, ?, ?)"
            " ON CONFLICT (key_id, stream) DO UPDATE SET last_seq = excluded.last_seq",
            rows,
        )

    async def set_meta(self, key: str, value: str) -> None:
        await self._tx.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))

    async def put_meta(self, key: str, value: str) -> None:
        await self._tx.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def put_web_session(self, key: str, user_id: str, role: str, expires_at: float) -> None:
        await self._tx.execute(
            "INSERT OR REPLACE INTO web_sessions (key, user_id, role, expires_at)"
            " VALUES (?, ?, ?, ?)",
            (key, user_id, role, expires_at),
        )

    async def end_web_session(self, key: str) -> None:
        await self._tx.execute("DELETE FROM web_sessions WHERE key = ?", (key,))

    async def save_positions(self, positions: dict[tuple[str, int], int]) -> None:
        """Where the consumer has read up to (high-availability mode): the next offsets."""
        await self._tx.executemany(
            "INSERT INTO consumer_positions (topic, partition, next_offset) VALUES (?, ?, ?)"
            " ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
            [(topic, partition, offset) for (topic, partition), offset in positions.items()],
        )


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreTx]:
        """One transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on any error)."""
        async with self.db.transaction() as tx:
            yield StoreTx(tx)

    async def ping(self) -> bool:
        return await self.db.ping()

    # --- start-up -----------------------------------------------------------------------------

    async def registered_cps(self) -> list[RegisteredCP]:
        return [
            RegisteredCP(
                id=row["id"],
                location=row["location"],
                price_eur_kwh=row["price_eur_kwh"],
                max_kw=row["max_kw"],
                in_service=bool(row["in_service"]),
            )
            for row in await self.db.read("SELECT * FROM charging_points ORDER BY id")
        ]

    async def active_sessions(self) -> list[Session]:
        rows = await self.db.read(f"SELECT * FROM sessions WHERE status IN ({_ACTIVE})")
        return [session_from_row(row) for row in rows]

    async def live_keys(self, now: float, retired_since: float) -> list[sqlite3.Row]:
        return await self.db.read(
            "SELECT * FROM channel_keys WHERE revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > ?)"
            " AND (retired_at IS NULL OR retired_at > ?)",
            (now, retired_since),
        )

    async def replay_guard(self) -> list[sqlite3.Row]:
        return await self.db.read("SELECT key_id, stream, last_seq FROM replay_guard")

    async def save_web_session(self, key: str, user_id: str, role: str, expires_at: float) -> None:
        async with self.transaction() as tx:
            await tx.put_web_session(key, user_id, role, expires_at)

    async def end_web_session(self, key: str) -> None:
        async with self.transaction() as tx:
            await tx.end_web_session(key)

    async def web_sessions(self, now: float) -> list[sqlite3.Row]:
        return await self.db.read(
            "SELECT key, user_id, role, expires_at FROM web_sessions WHERE expires_at > ?", (now,)
        )

    async def positions(self) -> dict[tuple[str, int], int]:
        rows = await self.db.read("SELECT topic, partition, next_offset FROM consumer_positions")
        return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}

    async def meta(self, key: str) -> str | None:
        rows = await self.db.read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0]["value"]) if rows else None

    # --- reads for CPs and drivers ----------------------------------------------------------

    async def secret_hash(self, cp_id: str) -> str | None:
        rows = await self.db.read("SELECT secret_hash FROM charging_points WHERE id = ?", (cp_id,))
        return rows[0]["secret_hash"] if rows else None

    async def credentials(self, user_id: str) -> tuple[str, str] | None:
        """A user's role and password hash, or None when no user has that id."""
        rows = await self.db.read("SELECT role, password_hash FROM users WHERE id = ?", (user_id,))
        return (rows[0]["role"], rows[0]["password_hash"]) if rows else None

    async def driver_balance(self, driver_id: str) -> int | None:
        """A driver's balance in cents, or None when no driver has that id."""
        rows = await self.db.read(
            "SELECT balance_cents FROM users WHERE id = ? AND role = 'driver'", (driver_id,)
        )
        return int(rows[0]["balance_cents"]) if rows else None

    async def unseen_tickets(self, driver_id: str) -> list[TicketData]:
        rows = await self.db.read(
            "SELECT * FROM sessions WHERE driver_id = ? AND ticket_revision > ticket_seen"
            " ORDER BY ended_at DESC LIMIT 20",
            (driver_id,),
        )
        return [session_from_row(row).ticket() for row in rows]

    async def tickets(self, driver_id: str, limit: int) -> list[TicketData]:
        rows = await self.db.read(
            "SELECT * FROM sessions WHERE driver_id = ? AND ticket_revision > 0"
            " ORDER BY ended_at DESC LIMIT ?",
            (driver_id, limit),
        )
        return [session_from_row(row).ticket() for row in rows]

    # --- the admin web ----------------------------------------------------------------------

    async def drivers(self) -> list[dict[str, Any]]:
        rows = await self.db.read(
            "SELECT id, balance_cents FROM users WHERE role = 'driver' ORDER BY id"
        )
        return [{"id": row["id"], "balance_eur": row["balance_cents"] / 100} for row in rows]

    async def sessions(self, limit: int, driver_id: str | None = None) -> list[dict[str, Any]]:
        """The newest sessions (of one driver, or of everyone) as the admin API shows them."""
        where, params = ("WHERE driver_id = ?", [driver_id]) if driver_id is not None else ("", [])
        rows = await self.db.read(
            f"SELECT * FROM sessions {where} ORDER BY requested_at DESC, rowid DESC LIMIT ?",
            [*params, limit],
        )
        return [session_api(row) for row in rows]

    async def sessions_by_status(self) -> dict[str, int]:
        rows = await self.db.read("SELECT status, COUNT(*) FROM sessions GROUP BY status")
        return {row[0]: int(row[1]) for row in rows}

    async def outbox_pending(self) -> int | None:
        rows = await self.db.read("SELECT COUNT(*) FROM outbox")
        return int(rows[0][0]) if rows else None

    async def prune(self, older_than_s: float) -> None:
        """Forget idempotency records old enough that no redelivery can come."""
        await self.db.prune(older_than_s)
