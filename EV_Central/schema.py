"""The database schema and demo seed (synchronous: used by init_db.py and at Central start)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

from EV_Central.passwords import hash_password, hash_secret

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS charging_points (
    id            TEXT PRIMARY KEY,
    location      TEXT NOT NULL,
    price_eur_kwh REAL NOT NULL CHECK (price_eur_kwh >= 0),
    max_kw        REAL NOT NULL CHECK (max_kw > 0),
    in_service    INTEGER NOT NULL DEFAULT 1,
    created_at    REAL NOT NULL,
    secret_hash   TEXT
);
CREATE TABLE IF NOT EXISTS users (
    id            TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('driver', 'admin', 'weather')),
    password_hash TEXT NOT NULL,
    balance_cents INTEGER NOT NULL DEFAULT 0 CHECK (balance_cents >= 0),
    created_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id                 TEXT PRIMARY KEY,
    cp_id              TEXT NOT NULL,
    driver_id          TEXT NOT NULL,
    request_id         TEXT,
    origin             TEXT NOT NULL,
    status             TEXT NOT NULL,
    price_eur_kwh      REAL NOT NULL DEFAULT 0,
    max_kw             REAL NOT NULL DEFAULT 0,
    requested_at       REAL NOT NULL,
    authorized_at      REAL,
    expires_at         REAL,
    started_at         REAL,
    ended_at           REAL,
    kw                 REAL NOT NULL DEFAULT 0,
    kwh                REAL NOT NULL DEFAULT 0,
    amount_cents       INTEGER NOT NULL DEFAULT 0,
    last_telemetry_at  REAL,
    last_telemetry_seq INTEGER,
    reason             TEXT,
    ticket_revision    INTEGER NOT NULL DEFAULT 0,
    ticket_seen        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_driver ON sessions (driver_id, requested_at);
CREATE INDEX IF NOT EXISTS sessions_by_status ON sessions (status);
-- Accounts are no longer locked (failing sources are throttled in memory, EV_Central/auth.py):
-- the lockout counters of older databases go.
DROP TABLE IF EXISTS login_state;
CREATE TABLE IF NOT EXISTS processed_messages (
    id           TEXT PRIMARY KEY,
    processed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS channel_keys (
    key_id     TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('cp', 'driver')),
    principal  TEXT NOT NULL,
    key        BLOB NOT NULL,
    issued_at  REAL NOT NULL,
    expires_at REAL,
    retired_at REAL,
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS channel_keys_by_principal ON channel_keys (kind, principal);
CREATE TABLE IF NOT EXISTS replay_guard (
    key_id   TEXT NOT NULL,
    stream   TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (key_id, stream)
);
-- Where Central has read its Kafka topics up to, in high-availability mode: saved with what
-- the records changed, so that a Central taking over starts exactly there.
CREATE TABLE IF NOT EXISTS consumer_positions (
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
-- Logins to the admin web and ctl, with --ha only (the standby takes them over): the SHA-256
-- of each session's token, never the token; times are seconds since the epoch.
CREATE TABLE IF NOT EXISTS web_sessions (
    key        TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    role       TEXT NOT NULL,
    expires_at REAL NOT NULL
);
-- The weather service's last report of each place and its frost alert (EV_Central/weather.py,
-- docs/weather.md): replicated, so that a standby Central keeps the same CPs stopped.
CREATE TABLE IF NOT EXISTS weather (
    place       TEXT PRIMARY KEY,
    temperature REAL,
    provider    TEXT NOT NULL DEFAULT '',
    updated_at  REAL NOT NULL DEFAULT 0,
    checked_at  REAL NOT NULL DEFAULT 0,
    error       TEXT NOT NULL DEFAULT '',
    frozen_at   REAL
);
-- One-time enrolment tokens (EV_Central/enrolment.py, docs/registry.md): the SHA-256 of each
-- token, never the token; a redeemed or replaced token's row is deleted. Replicated.
CREATE TABLE IF NOT EXISTS enrolment_tokens (
    token_hash TEXT PRIMARY KEY,
    cp_id      TEXT NOT NULL,
    issued_at  REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT NOT NULL,
    key        TEXT NOT NULL,
    payload    BLOB NOT NULL,
    created_at REAL NOT NULL
);
-- The audit log (EV_Central/audit.py, docs/audit.md): append-only, each row chained to the one
-- before by its hash. The triggers stop ordinary writers; the chain catches the others.
CREATE TABLE IF NOT EXISTS audit_log (
    id        INTEGER PRIMARY KEY,
    ts        REAL NOT NULL,
    source    TEXT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    mac       TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;
"""

# Keys of the meta table that high availability uses (EV_Central/ha.py): this Central's own
# role (local: never replicated), and, replicated, the active Central's address and term.
ROLE_KEY = "local.role"
ACTIVE_KEY = "active_central"
TERM_KEY = "term"

DEMO_CPS = [
    ("CP001", "Alicante - Campus, Aulario III", 0.35, 22.0),
    ("CP002", "Alicante - Campus, Parking Norte", 0.35, 22.0),
    ("CP003", "Alicante - Puerto, Muelle 12", 0.42, 50.0),
    ("CP004", "Alicante - Estación de Luceros", 0.30, 7.4),
    ("CP005", "San Vicente - Centro Comercial", 0.38, 11.0),
    ("CP006", "Elche - Parque Empresarial", 0.33, 22.0),
    ("CP007", "Elche - Estación Parque", 0.40, 50.0),
    ("CP008", "Benidorm - Avenida del Mediterráneo", 0.45, 11.0),
    ("CP009", "Valencia - Ciudad de las Artes", 0.39, 22.0),
    ("CP010", "Murcia - Plaza Circular", 0.36, 7.4),
]

# Demo accounts: (id, role, password, balance in cents). Demo only: see the README.
DEMO_USERS = [
    ("user1", "driver", "pass1", 15000),
    ("user2", "driver", "pass2", 20000),
    ("user3", "driver", "pass3", 7550),
    ("user4", "driver", "pass4", 5000),
    ("user5", "driver", "pass5", 10000),
    ("admin", "admin", "admin", 0),
]


def demo_cp_secret(cp_id: str) -> str:
    """The demo seed's CP secret (demo only, like the demo passwords: see the README)."""
    return f"demo-secret-{cp_id}"


# Columns added after the first release: (table, column, declaration).
MIGRATIONS = [("charging_points", "secret_hash", "TEXT")]


def connect(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _allow_weather_role(conn: sqlite3.Connection) -> None:
    """Widen an older users table's role check to take the weather service's account.

    SQLite cannot alter a CHECK constraint: the table is copied into one with the new check,
    in one transaction, so that a crash half-way leaves the accounts where they were.
    """
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'users'")
    sql = row.fetchone()
    if sql is None or "'weather'" in sql[0]:
        return
    conn.executescript(
        "BEGIN; ALTER TABLE users RENAME TO users_before_weather;"
        f"{SCHEMA}"
        "INSERT INTO users SELECT * FROM users_before_weather;"
        "DROP TABLE users_before_weather; COMMIT;"
    )


def create_schema(conn: sqlite3.Connection) -> None:
    _allow_weather_role(conn)
    conn.executescript(SCHEMA)
    for table, column, declaration in MIGRATIONS:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )


def seed_demo(conn: sqlite3.Connection) -> tuple[int, int]:
    """Insert the demo CPs and accounts that are missing; return how many of each were added."""
    now = time.time()
    cps = 0
    for cp_id, location, price, max_kw in DEMO_CPS:
        cur = conn.execute(
            "INSERT OR IGNORE INTO charging_points"
            " (id, location, price_eur_kwh, max_kw, created_at, secret_hash)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (cp_id, location, price, max_kw, now, hash_secret(demo_cp_secret(cp_id))),
        )
        cps += cur.rowcount
    users = 0
    for user_id, role, password, balance in DEMO_USERS:
        exists = conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone()
        if exists:
            continue
        conn.execute(
            "INSERT INTO users (id, role, password_hash, balance_cents, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (user_id, role, hash_password(password), balance, now),
        )
        users += 1
    return cps, users


def initialise(path: str | Path, *, reset: bool = False, seed: bool = True) -> tuple[int, int]:
    """Create (or with reset, re-create) the database at `path` and seed it."""
    db_path = Path(path)
    if reset:
        for suffix in ("", "-wal", "-shm"):
            Path(str(db_path) + suffix).unlink(missing_ok=True)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    # The database holds password hashes and channel keys: its owner alone may read it.
    db_path.touch(mode=0o600, exist_ok=True)
    with contextlib.suppress(OSError):
        db_path.chmod(0o600)
    conn = connect(db_path)
    try:
        with conn:
            create_schema(conn)
            added = seed_demo(conn) if seed else (0, 0)
    finally:
        conn.close()
    return added
