"""The fleet's credentials: each simulated CP's secret and each simulated driver's password.

`seed_database` writes them into Central's database (as hashes, like Central does) and keeps
the clear values in a `Credentials`, which the simulator reads back from a file made only for
its owner. Nothing here is a fixed password: every secret and password is random.

Simulated drivers get a real scrypt hash in Central's own format, but with a low cost
(n=16 instead of 2**14): a fleet of 10,000 CPs logs 2,000 drivers in at its start, and at
Central's cost that would keep Central's CPU busy for minutes before anything is measured.
A cheap hash is for throwaway benchmark databases only; real accounts keep Central's cost.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from EV_Central.passwords import hash_secret, new_secret

# scrypt parameters of simulated accounts: the same format as EV_Central.passwords, low cost.
SIM_SCRYPT_N, SIM_SCRYPT_R, SIM_SCRYPT_P = 16, 8, 1
DRIVER_BALANCE_CENTS = 10_000_000
MAX_CREDENTIALS_BYTES = 8 * 1024 * 1024  # room for 100,000 CPs and their drivers


class CredentialsError(ValueError):
    """A credentials file that cannot be used (unreadable, too big, not the expected JSON)."""


def cheap_password_hash(password: str) -> str:
    """A salted scrypt hash `scrypt$n$r$p$salt$digest` that Central verifies, at a low cost."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SIM_SCRYPT_N, r=SIM_SCRYPT_R, p=SIM_SCRYPT_P, dklen=32
    )
    salt_b64 = base64.b64encode(salt).decode()
    digest_b64 = base64.b64encode(digest).decode()
    return f"scrypt${SIM_SCRYPT_N}${SIM_SCRYPT_R}${SIM_SCRYPT_P}${salt_b64}${digest_b64}"


@dataclass
class Credentials:
    """CP id -> secret and driver id -> password, in clear (the simulator's side)."""

    cps: dict[str, str] = field(default_factory=dict)
    drivers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """Read a credentials file; an absent file is an empty set."""
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_CREDENTIALS_BYTES + 1)
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise CredentialsError(f"cannot read {path}: {exc.strerror}") from None
        if len(raw) > MAX_CREDENTIALS_BYTES:
            raise CredentialsError(f"{path} is larger than {MAX_CREDENTIALS_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CredentialsError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CredentialsError(f"{path} must hold a JSON object")
        out = cls()
        for name, table in (("cps", out.cps), ("drivers", out.drivers)):
            section = data.get(name, {})
            if not isinstance(section, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in section.items()
            ):
                raise CredentialsError(f"{path}: {name!r} must map ids to non-empty strings")
            table.update(section)
        return out

    def save(self, path: Path) -> None:
        """Write the file readable by its owner only (it holds secrets in clear)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"cps": self.cps, "drivers": self.drivers}, out)
        os.replace(tmp, path)


def seed_database(
    db_path: str | Path, cps: list[str], drivers: list[str], credentials: Credentials
) -> None:
    """Register CPs and driver accounts directly in Central's database (idempotent).

    CPs and drivers get the secret or password they have in `credentials`, or a new random
    one that is added there. Existing rows get the new hashes (and the drivers a full
    balance). Central reads CPs only at its start, but secrets and passwords at every login.
    """
    now = time.time()
    cp_rows = []
    for cp in cps:
        secret = credentials.cps.setdefault(cp, new_secret())
        cp_rows.append((cp, f"Fleet site {cp}", 0.35, 22.0, now, hash_secret(secret)))
    driver_rows = []
    for driver in drivers:
        password = credentials.drivers.setdefault(driver, secrets.token_urlsafe(12))
        driver_rows.append((driver, cheap_password_hash(password), DRIVER_BALANCE_CENTS, now))
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db, db:
        db.executemany(
            "INSERT INTO charging_points (id, location, price_eur_kwh, max_kw, created_at,"
            " secret_hash) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET secret_hash = excluded.secret_hash",
            cp_rows,
        )
        db.executemany(
            "INSERT INTO users (id, role, password_hash, balance_cents, created_at)"
            " VALUES (?, 'driver', ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET password_hash = excluded.password_hash,"
            " balance_cents = excluded.balance_cents WHERE users.role = 'driver'",
            driver_rows,
        )
