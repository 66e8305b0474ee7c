"""The hash-chained audit log (EV_Central.audit) on real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from EV_Central import schema
from EV_Central.audit import (
    COLUMNS,
    GENESIS,
    AuditLog,
    AuditRow,
    canonical,
    key_path_for,
    read_key,
    verify_chain,
)
from EV_Central.db import Database

DROP_TRIGGERS = (
    "DROP TRIGGER IF EXISTS audit_log_no_update",
    "DROP TRIGGER IF EXISTS audit_log_no_delete",
)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    path = tmp_path / "central.db"
    schema.initialise(path, seed=False)  # no demo accounts: no scrypt hashing to wait for
    database = Database(path)
    await database.start()
    try:
        yield database
    finally:
        await database.stop()


@contextlib.contextmanager
def opened(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def rows_of(path: Path) -> list[tuple[Any, ...]]:
    with opened(path) as conn:
        return conn.execute(f"SELECT {COLUMNS} FROM audit_log ORDER BY id").fetchall()


def plain_hash(fields: list[Any]) -> str:
    """What anyone can compute without the key: the bare SHA-256 of a row's fields."""
    return hashlib.sha256(canonical(*fields)).hexdigest()


async def filled(db: Database, count: int = 6) -> AuditLog:
    audit = AuditLog(db)
    for n in range(count):
        await audit.record(
            "login" if n % 2 else "cp_auth",
            "ok" if n % 3 else "failed",
            actor=f"user{n}",
            source=f"127.0.0.1:{40000 + n}",
            detail=f"event {n}",
        )
    return audit


def database_bytes(path: Path) -> bytes:
    """The database file and its write-ahead log, as stored."""
    return path.read_bytes() + Path(f"{path}-wal").read_bytes()


def verify(path: Path, keyed: bool = True) -> Any:
    key = read_key(key_path_for(path)) if keyed else None
    assert key is not None or not keyed
    with opened(path) as conn:
        return verify_chain(conn, key)


# --- writing ------------------------------------------------------------------------------------


async def test_rows_form_one_chain_that_verifies(db: Database) -> None:
    audit = AuditLog(db)
    pushed: list[dict[str, Any]] = []
    audit.listeners.append(pushed.append)
    await audit.record("login", "ok", actor="admin", source="10.0.0.7:51234", detail="admin web")
    await audit.record("cp_auth", "failed", actor="CP001", source="10.0.0.9:40001")
    await audit.record("stop", "ok", actor="console", source="console", detail="all")

    rows = rows_of(db.path)
    assert [r[0] for r in rows] == [1, 2, 3]
    assert rows[0][7] == GENESIS
    assert rows[1][7] == rows[0][8] and rows[2][7] == rows[1][8]
    assert rows[0][2:7] == ("10.0.0.7:51234", "admin", "login", "ok", "admin web")
    assert all(len(r[8]) == 64 and len(r[9]) == 64 for r in rows)  # hash and MAC, hex

    result = verify(db.path)
    assert result.ok and result.keyed and result.rows == 3 and result.head == rows[2][8]
    assert "intact: 3 rows" in result.summary()

    newest = await audit.recent(2)
    assert [e["id"] for e in newest] == [3, 2]
    assert newest[0] == {
        "id": 3,
        "ts": rows[2][1],
        "source": "console",
        "actor": "console",
        "action": "stop",
        "outcome": "ok",
        "detail": "all",
        "hash": rows[2][8],
    }
    assert pushed == list(reversed(await audit.recent()))


async def test_the_key_lives_beside_the_database_readable_by_its_owner_only(
    db: Database,
) -> None:
    await filled(db, 1)
    key_file = key_path_for(db.path)
    assert key_file.name == "central.db.audit-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = read_key(key_file)
    assert key is not None and len(key) == 32
    # The key is nowhere in the database.
    assert key.hex().encode() not in database_bytes(db.path)


async def test_concurrent_records_keep_a_single_unbroken_chain(db: Database) -> None:
    audit = AuditLog(db)
    await asyncio.gather(
        *(audit.record("login", "failed", actor=f"user{n % 5}", detail=str(n)) for n in range(60))
    )
    result = verify(db.path)
    assert result.ok and result.rows == 60
    assert sorted(int(r[6]) for r in rows_of(db.path)) == list(range(60))


async def test_a_restarted_central_continues_the_chain_with_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "central.db"
    schema.initialise(path, seed=False)
    for run in range(2):
        database = Database(path)
        await database.start()
        try:
            await AuditLog(database).record("login", "ok", actor=f"run{run}")
        finally:
            await database.stop()
    result = verify(path)
    assert result.ok and result.rows == 2


async def test_long_fields_are_cut_and_hostile_text_is_stored_as_given(db: Database) -> None:
    audit = AuditLog(db)
    hostile = '<img src=x onerror="alert(1)">\'; DROP TABLE users; --\x1b[2J'
    await audit.record("login", "failed", actor=hostile, source="s" * 300, detail="d" * 2000)
    await audit.record("ws_rejected", "failed", detail="bad \ud800 surrogate")
    first, second = rows_of(db.path)
    assert first[3] == hostile
    assert len(first[2]) == 200 and first[2].endswith("…")
    assert len(first[6]) == 500 and first[6].endswith("…")
    assert second[6] == "bad ? surrogate"
    assert verify(db.path).ok


async def test_record_never_raises_into_its_caller(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    audit = AuditLog(db)
    seen: list[int] = []

    def broken_listener(entry: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    audit.listeners += [broken_listener, lambda entry: seen.append(entry["id"])]
    with caplog.at_level(logging.ERROR, logger="EV_Central.audit"):
        await audit.record("login", "ok", actor="admin")
        assert seen == [1]  # the second listener still ran
        await db.stop()  # the database goes away under it
        await audit.record("login", "ok", actor="admin")
    assert seen == [1]
    assert "listener failed" in caplog.text
    assert "login/ok by 'admin' not recorded" in caplog.text


def test_an_old_database_gets_the_table_and_its_guards(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with opened(path) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    schema.initialise(path, seed=False)
    with opened(path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"audit_log", "audit_log_no_update", "audit_log_no_delete"} <= names


# --- tampering ----------------------------------------------------------------------------------


async def test_the_database_refuses_to_update_or_delete_rows(db: Database) -> None:
    await filled(db, 2)
    with opened(db.path) as conn:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit_log SET outcome = 'ok' WHERE id = 1")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM audit_log WHERE id = 2")
    assert verify(db.path).ok


def edit_detail(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit_log SET detail = 'nothing to see' WHERE id = 3")


def edit_outcome_and_rehash_it(conn: sqlite3.Connection) -> None:
    """Someone without the key changes a row and recomputes that row's plain hash."""
    row = conn.execute(f"SELECT {COLUMNS} FROM audit_log WHERE id = 3").fetchone()
    fields = list(row[:8])
    fields[5] = "forged"
    new_hash = plain_hash(fields)
    conn.execute("UPDATE audit_log SET outcome = 'forged', hash = ? WHERE id = 3", (new_hash,))


def rehash_the_tail(conn: sqlite3.Connection) -> None:
    """Change row 3, then recompute every plain hash after it so that all links hold."""
    conn.execute("UPDATE audit_log SET actor = 'someone else' WHERE id = 3")
    rows = conn.execute(f"SELECT {COLUMNS} FROM audit_log WHERE id >= 3 ORDER BY id").fetchall()
    prev = conn.execute("SELECT hash FROM audit_log WHERE id = 2").fetchone()[0]
    for row in rows:
        fields = [*row[:7], prev]
        prev = plain_hash(fields)
        conn.execute(
            "UPDATE audit_log SET prev_hash = ?, hash = ? WHERE id = ?", (fields[7], prev, row[0])
        )


def delete_a_middle_row(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit_log WHERE id = 3")


def delete_the_first_row(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit_log WHERE id = 1")


def delete_and_renumber(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit_log WHERE id = 3")
    conn.execute("UPDATE audit_log SET id = id - 1 WHERE id > 3")


def insert_in_the_middle(conn: sqlite3.Connection) -> None:
    """Shift rows 3.. up by one and slip a well-formed row in at 3."""
    conn.execute("UPDATE audit_log SET id = id + 1000 WHERE id >= 3")
    conn.execute("UPDATE audit_log SET id = id - 999 WHERE id >= 1003")
    prev = conn.execute("SELECT hash, ts FROM audit_log WHERE id = 2").fetchone()
    fields = [3, prev[1] + 0.001, "console", "admin", "resume", "ok", "all", prev[0]]
    conn.execute(
        f"INSERT INTO audit_log ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*fields, plain_hash(fields), "0" * 64),
    )


def edit_the_timestamp(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit_log SET ts = ts - 3600 WHERE id = 5")


# (tampering, first bad row and kind with the key, the same without the key)
TAMPERING: list[tuple[Callable[[sqlite3.Connection], None], tuple[int, str], Any]] = [
    (edit_detail, (3, "edited"), (3, "edited")),
    (edit_the_timestamp, (5, "edited"), (5, "edited")),
    (edit_outcome_and_rehash_it, (3, "bad MAC"), (4, "broken link")),
    (delete_a_middle_row, (3, "missing row"), (3, "missing row")),
    (delete_the_first_row, (1, "missing row"), (1, "missing row")),
    (delete_and_renumber, (3, "broken link"), (3, "broken link")),
    (insert_in_the_middle, (3, "bad MAC"), (4, "broken link")),
    # Without the key a consistently re-hashed tail cannot be told apart: that is what the MAC
    # is for (docs/audit.md).
    (rehash_the_tail, (3, "bad MAC"), None),
]


@pytest.mark.parametrize(
    ("tamper", "with_key", "without_key"), TAMPERING, ids=[t[0].__name__ for t in TAMPERING]
)
async def test_verify_names_the_first_bad_row(
    db: Database,
    tamper: Callable[[sqlite3.Connection], None],
    with_key: tuple[int, str],
    without_key: tuple[int, str] | None,
) -> None:
    await filled(db, 6)
    assert verify(db.path).ok
    with opened(db.path) as conn:
        for statement in DROP_TRIGGERS:
            conn.execute(statement)
        tamper(conn)

    keyed = verify(db.path)
    assert not keyed.ok
    assert (keyed.bad_id, keyed.kind) == with_key, keyed.summary()
    assert keyed.summary().startswith(f"audit log BROKEN at row {with_key[0]}: {with_key[1]}")

    plain = verify(db.path, keyed=False)
    if without_key is None:
        assert plain.ok and not plain.keyed
        assert "MACs NOT checked" in plain.summary()
    else:
        assert not plain.ok and (plain.bad_id, plain.kind) == without_key, plain.summary()


async def test_the_wrong_key_does_not_verify(db: Database) -> None:
    await filled(db, 2)
    with opened(db.path) as conn:
        result = verify_chain(conn, b"\x01" * 32)
    assert (result.ok, result.bad_id, result.kind) == (False, 1, "bad MAC")


# --- any content, any single edit -----------------------------------------------------------

TEXT = st.text(max_size=60)
EVENT = st.tuples(TEXT, TEXT, TEXT, TEXT, TEXT)
FIELD_INDEX = {"ts": 1, "source": 2, "actor": 3, "action": 4, "outcome": 5, "detail": 6}


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(EVENT, min_size=1, max_size=8),
    keyed=st.booleans(),
    target=st.integers(min_value=0),
    field=st.sampled_from([*FIELD_INDEX, "prev_hash", "hash", "mac"]),
    replacement=st.text(max_size=20),
)
def test_any_log_verifies_and_any_single_edit_is_caught(
    events: list[tuple[str, str, str, str, str]],
    keyed: bool,
    target: int,
    field: str,
    replacement: str,
) -> None:
    key = b"k" * 32 if keyed else None
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        schema.create_schema(conn)
        previous = None
        for n, (source, actor, action, outcome, detail) in enumerate(events):
            row = AuditRow.after(
                previous,
                ts=1_700_000_000.0 + n / 7,
                source=source,
                actor=actor,
                action=action,
                outcome=outcome,
                detail=detail,
                key=key,
            )
            conn.execute(
                f"INSERT INTO audit_log ({COLUMNS}) VALUES ({','.join('?' * 10)})", row.values()
            )
            previous = (row.id, row.hash)
        result = verify_chain(conn, key)
        assert result.ok and result.rows == len(events) and result.head == previous[1]

        if field == "mac" and not keyed:
            return  # nothing checks the MACs without the key
        row_id = target % len(events) + 1
        old = conn.execute(f"SELECT {field} FROM audit_log WHERE id = ?", (row_id,)).fetchone()[0]
        new: Any = old + 1.5 if field == "ts" else replacement
        if new == old:
            new = f"{old}x"
        for statement in DROP_TRIGGERS:
            conn.execute(statement)
        conn.execute(f"UPDATE audit_log SET {field} = ? WHERE id = ?", (new, row_id))
        result = verify_chain(conn, key)
        assert not result.ok and result.bad_id == row_id, (field, result.summary())
    finally:
        conn.close()
