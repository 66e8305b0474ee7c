"""Central's audit log: security-relevant events in an append-only, hash-chained table.

Each row's `hash` is a SHA-256 over its own fields and the previous row's hash, so an edited,
deleted or inserted row breaks the chain. Each row's `mac` is an HMAC-SHA256 of that hash keyed
with a secret kept beside the database, outside it (`<db>.audit-key`, mode 0600): someone who can
change the database but cannot read the key cannot forge a chain that still verifies. SQLite
triggers refuse UPDATE and DELETE on the table as a first line of defence. docs/audit.md has the
details and the limits.

`python -m EV_Central audit verify` checks the chain and `audit show` prints the newest rows
(EV_Central/audit_cli.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from EV_Central.db import Database
from shared.errors import EVError

log = logging.getLogger(__name__)

GENESIS = "0" * 64
KEY_SUFFIX = ".audit-key"
KEY_BYTES = 32

# The action names Central records (docs/audit.md says when each one is written).
ACTIONS = frozenset(
    {
        "login",
        "throttle",
        "logout",
        "cp_auth",
        "key_issued",
        "key_revoked",
        "cp_registered",
        "secret_reset",
        "stop",
        "resume",
        "message_rejected",
        "ws_rejected",
        "clock_skew",
    }
)

# Longer values are cut (with a trailing "…") so that one noisy caller cannot bloat the table.
FIELD_LIMITS = {"source": 200, "actor": 100, "action": 40, "outcome": 40, "detail": 500}

# A record() waiting longer than this for the database is abandoned (and logged): the usual cause
# is a caller that awaits record() while it holds a database transaction itself.
RECORD_TIMEOUT_S = 10.0

COLUMNS = "id, ts, source, actor, action, outcome, detail, prev_hash, hash, mac"


class AuditError(EVError):
    """The audit key file is unusable, or the audit log cannot be read."""


# --- the chain, without I/O -------------------------------------------------------------------


def clean(value: object, limit: int) -> str:
    """A field as it is stored: text, valid UTF-8 (lone surrogates replaced), at most `limit`."""
    text = value if isinstance(value, str) else str(value)
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def canonical(
    row_id: int,
    ts: float,
    source: str,
    actor: str,
    action: str,
    outcome: str,
    detail: str,
    prev_hash: str,
) -> bytes:
    """The exact bytes a row's hash covers: a compact JSON list of its fields, in order."""
    fields = [row_id, ts, source, actor, action, outcome, detail, prev_hash]
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def row_mac(key: bytes, row_hash: str) -> str:
    return hmac.new(key, row_hash.encode("ascii"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class AuditRow:
    id: int
    ts: float
    source: str
    actor: str
    action: str
    outcome: str
    detail: str
    prev_hash: str
    hash: str
    mac: str

    @classmethod
    def after(
        cls,
        previous: tuple[int, str] | None,
        *,
        ts: float,
        action: str,
        outcome: str,
        actor: str = "",
        source: str = "",
        detail: str = "",
        key: bytes | None = None,
    ) -> AuditRow:
        """The row that follows `previous` (its id and hash; None for the first row)."""
        row_id, prev_hash = (previous[0] + 1, previous[1]) if previous else (1, GENESIS)
        fields = (
            clean(source, FIELD_LIMITS["source"]),
            clean(actor, FIELD_LIMITS["actor"]),
            clean(action, FIELD_LIMITS["action"]),
            clean(outcome, FIELD_LIMITS["outcome"]),
            clean(detail, FIELD_LIMITS["detail"]),
        )
        digest = hashlib.sha256(canonical(row_id, ts, *fields, prev_hash)).hexdigest()
        mac = row_mac(key, digest) if key is not None else ""
        return cls(row_id, ts, *fields, prev_hash, digest, mac)

    def values(self) -> tuple[Any, ...]:
        """The values in COLUMNS order."""
        return (
            self.id,
            self.ts,
            self.source,
            self.actor,
            self.action,
            self.outcome,
            self.detail,
            self.prev_hash,
            self.hash,
            self.mac,
        )

    def as_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "source": self.source,
            "actor": self.actor,
            "action": self.action,
            "outcome": self.outcome,
            "detail": self.detail,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class VerifyResult:
    """What verify_chain found: `ok`, or the first bad row's id, the kind of damage and why."""

    ok: bool
    rows: int  # rows checked and found good (all of them when ok)
    head: str  # hash of the last good row; "" when there is none
    keyed: bool  # the MACs were checked too
    bad_id: int | None = None
    kind: str = ""  # "edited", "missing row", "broken link" or "bad MAC"
    reason: str = ""

    def summary(self) -> str:
        """One line for a terminal."""
        if self.ok:
            head = self.head[:16] if self.head else "(empty)"
            checked = "hashes, links and MACs" if self.keyed else "hashes and links; MACs NOT"
            return f"audit log intact: {self.rows} rows, head {head} ({checked} checked)"
        return f"audit log BROKEN at row {self.bad_id}: {self.kind}: {self.reason}"


def verify_rows(rows: Iterable[tuple[Any, ...]], key: bytes | None = None) -> VerifyResult:
    """Walk rows (COLUMNS order, by id) and stop at the first one that breaks the chain."""
    expected_id = 1
    prev_hash = GENESIS
    count = 0

    def broken(bad_id: int, kind: str, reason: str) -> VerifyResult:
        head = prev_hash if count else ""
        return VerifyResult(False, count, head, key is not None, bad_id, kind, reason)

    for row_id, ts, source, actor, action, outcome, detail, stored_prev, stored_hash, mac in rows:
        if row_id != expected_id:
            if isinstance(row_id, int) and row_id > expected_id:
                gap = (
                    f"row {expected_id} is missing"
                    if row_id == expected_id + 1
                    else f"rows {expected_id} to {row_id - 1} are missing"
                )
                return broken(expected_id, "missing row", f"{gap} (the next id is {row_id})")
            return broken(
                expected_id, "missing row", f"found id {row_id!r} where {expected_id} belongs"
            )
        if stored_prev != prev_hash:
            where = "the chain's start" if row_id == 1 else f"row {row_id - 1}'s hash"
            return broken(
                row_id,
                "broken link",
                f"its prev_hash is not {where}: this row or the one before was changed",
            )
        try:
            digest = hashlib.sha256(
                canonical(row_id, ts, source, actor, action, outcome, detail, stored_prev)
            ).hexdigest()
        except (TypeError, ValueError):
            digest = ""
        if not isinstance(stored_hash, str) or not hmac.compare_digest(
            digest.encode(), stored_hash.encode("utf-8", "replace")
        ):
            return broken(row_id, "edited", "its contents do not match its hash")
        if key is not None:
            good = isinstance(mac, str) and hmac.compare_digest(
                row_mac(key, stored_hash).encode(), mac.encode("utf-8", "replace")
            )
            if not good:
                return broken(
                    row_id,
                    "bad MAC",
                    "its hash was not signed with this key (rewritten without the key, "
                    "or the key file is not the one the log was written with)",
                )
        prev_hash = stored_hash
        expected_id += 1
        count += 1
    return VerifyResult(True, count, prev_hash if count else "", key is not None)


def verify_chain(conn: sqlite3.Connection, key: bytes | None = None) -> VerifyResult:
    """Check the whole audit_log table of `conn`; with `key`, also every row's MAC."""
    cursor = conn.execute(f"SELECT {COLUMNS} FROM audit_log ORDER BY id")
    try:
        return verify_rows(cursor, key)
    finally:
        cursor.close()


# --- the key file -----------------------------------------------------------------------------


def key_path_for(db_path: str | Path) -> Path:
    return Path(f"{db_path}{KEY_SUFFIX}")


def read_key(path: Path) -> bytes | None:
    """The key in `path`, or None when there is no such file."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot read the audit key {path}: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise AuditError(f"the audit key {path} is malformed (expected at least 32 hex digits)")
    return key


def load_or_create_key(path: Path) -> tuple[bytes, bool]:
    """The key in `path`, created (mode 0600) when absent; and whether it was just created."""
    key = read_key(path)
    if key is not None:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("audit key %s is readable by others (mode %o)", path, mode & 0o777)
        return key, False
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it a moment ago
        existing = read_key(path)
        if existing is None:
            raise AuditError(f"the audit key {path} vanished while being created") from None
        return existing, False
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(key.hex() + "\n")
    return key, True


# --- the log Central writes -------------------------------------------------------------------


class AuditLog:
    """Appends audit rows through Central's database; never raises into the caller."""

    def __init__(self, db: Database, key_path: Path | None = None) -> None:
        self.db = db
        self.key_path = key_path or key_path_for(db.path)
        # Called with each new row (its as_api dict) once it is committed.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._key: bytes | None = None
        self._key_loaded = False

    def on_record(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call `listener` with each new row (its as_api dict) once it is committed."""
        self.listeners.append(listener)

    async def record(
        self,
        action: str,
        outcome: str,
        *,
        actor: str = "",
        source: str = "",
        detail: str = "",
    ) -> None:
        """Append one row (commits at once). Do not call it while holding a transaction."""
        if action not in ACTIONS:
            log.warning("audit: unknown action %r recorded", action)
        try:
            async with asyncio.timeout(RECORD_TIMEOUT_S):
                row = await self._append(action, outcome, actor, source, detail)
        except TimeoutError:
            log.error(
                "audit: %s/%s by %r not recorded: the database was busy for %g s"
                " (is record() awaited inside a transaction?)",
                action,
                outcome,
                actor,
                RECORD_TIMEOUT_S,
            )
            return
        except Exception:
            log.exception("audit: %s/%s by %r not recorded", action, outcome, actor)
            return
        entry = row.as_api()
        for listener in list(self.listeners):
            try:
                listener(entry)
            except Exception:
                log.exception("audit listener failed")

    async def _append(
        self, action: str, outcome: str, actor: str, source: str, detail: str
    ) -> AuditRow:
        async with self.db.transaction() as tx:
            # In the transaction: one writer at a time, so each row sees the true previous one.
            last = await tx.fetchone("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1")
            if not self._key_loaded:
                await self._load_key(has_rows=last is not None)
            row = AuditRow.after(
                (int(last["id"]), str(last["hash"])) if last is not None else None,
                ts=time.time(),
                action=action,
                outcome=outcome,
                actor=actor,
                source=source,
                detail=detail,
                key=self._key,
            )
            await tx.execute(
                f"INSERT INTO audit_log ({COLUMNS}) VALUES ({', '.join('?' * 10)})", row.values()
            )
        return row

    async def _load_key(self, *, has_rows: bool) -> None:
        self._key_loaded = True
        try:
            self._key, created = await asyncio.to_thread(load_or_create_key, self.key_path)
        except (AuditError, OSError) as exc:
            log.error("audit: rows are written without a MAC: %s", exc)
            return
        if created and has_rows:
            log.warning(
                "audit: created a new key %s for a log that already has rows:"
                " the older rows will not verify with it",
                self.key_path,
            )
        elif created:
            log.info("audit: created the key %s", self.key_path)

    async def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest rows, newest first (at most 1000)."""
        limit = max(1, min(int(limit), 1000))
        rows = await self.db.read(
            f"SELECT {COLUMNS} FROM audit_log ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [AuditRow(*tuple(row)).as_api() for row in rows]
