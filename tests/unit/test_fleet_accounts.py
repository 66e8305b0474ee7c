"""The fleet simulator's accounts: cheap but real password hashes, CP secrets, credentials file."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from EV_Central.passwords import verify_password, verify_secret
from EV_Central.schema import initialise
from tools.fleet.accounts import (
    MAX_CREDENTIALS_BYTES,
    SIM_SCRYPT_N,
    Credentials,
    CredentialsError,
    cheap_password_hash,
    seed_database,
)


def test_cheap_hash_is_a_central_hash_with_a_low_cost() -> None:
    stored = cheap_password_hash("s3cret")
    scheme, n, r, p, _salt, _digest = stored.split("$")
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", SIM_SCRYPT_N, 8, 1)
    assert verify_password("s3cret", stored)
    assert not verify_password("s3cret!", stored)
    assert cheap_password_hash("s3cret") != stored  # salted


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


def test_seed_writes_hashes_that_match_the_credentials(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    initialise(db, seed=True)
    credentials = Credentials()
    seed_database(db, ["SIM00001", "SIM00002"], ["SIMD00001"], credentials)
    assert sorted(credentials.cps) == ["SIM00001", "SIM00002"]
    assert credentials.cps["SIM00001"] != credentials.cps["SIM00002"]
    secrets = dict(rows(db, "SELECT id, secret_hash FROM charging_points WHERE id LIKE 'SIM%'"))
    for cp_id, secret in credentials.cps.items():
        assert verify_secret(secret, str(secrets[cp_id]))
        assert secret not in str(secrets[cp_id])
    [(stored, role, balance)] = rows(
        db, "SELECT password_hash, role, balance_cents FROM users WHERE id = 'SIMD00001'"
    )
    assert role == "driver" and int(str(balance)) > 0
    assert verify_password(credentials.drivers["SIMD00001"], str(stored))

    # Again, with the secrets it has: same secrets, new hashes; nothing added twice.
    before = dict(credentials.cps)
    seed_database(db, ["SIM00001"], ["SIMD00001"], credentials)
    assert credentials.cps == before
    assert rows(db, "SELECT COUNT(*) FROM charging_points WHERE id LIKE 'SIM%'") == [(2,)]
    [(again,)] = rows(db, "SELECT secret_hash FROM charging_points WHERE id = 'SIM00001'")
    assert again != secrets["SIM00001"] and verify_secret(before["SIM00001"], str(again))


def test_seed_leaves_an_admin_account_of_the_same_name_alone(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    initialise(db, seed=True)
    [(admin_hash,)] = rows(db, "SELECT password_hash FROM users WHERE id = 'admin'")
    seed_database(db, [], ["admin"], Credentials())
    assert rows(db, "SELECT password_hash, role FROM users WHERE id = 'admin'") == [
        (admin_hash, "admin")
    ]


def test_credentials_file_round_trip_is_private(tmp_path: Path) -> None:
    path = tmp_path / "fleet" / "credentials.json"
    assert Credentials.load(path) == Credentials()  # absent: empty
    credentials = Credentials({"SIM00001": "a"}, {"SIMD00001": "b"})
    credentials.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Credentials.load(path) == credentials


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (json.dumps({"cps": {"SIM00001": 5}}).encode(), "'cps' must map ids"),
        (json.dumps({"drivers": {"SIMD00001": ""}}).encode(), "'drivers' must map ids"),
        (b" " * (MAX_CREDENTIALS_BYTES + 1), "larger than"),
    ],
)
def test_a_bad_credentials_file_is_a_clear_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "credentials.json"
    path.write_bytes(content)
    with pytest.raises(CredentialsError, match=message):
        Credentials.load(path)
