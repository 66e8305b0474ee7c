"""CP secrets (hash, check, how a monitor is given one) and the driver's token file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from EV_Central.passwords import hash_secret, new_secret, verify_secret
from EV_CP_M.config import parse_settings
from EV_Driver.session import DriverSession
from shared.sealing import new_key

MONITOR = ["--engine", "127.0.0.1:7001", "--central", "127.0.0.1:5000", "--cp-id", "CP001"]


def test_a_secret_is_stored_as_a_salted_hash_and_checked() -> None:
    secret = new_secret()
    stored = hash_secret(secret)
    assert secret not in stored and stored.startswith("sha256$")
    assert hash_secret(secret) != stored  # salted
    assert verify_secret(secret, stored)
    assert not verify_secret(secret + "x", stored)
    assert not verify_secret(secret, None)
    assert not verify_secret(secret, "garbage")


def test_the_monitor_reads_its_secret_from_a_flag_a_file_or_the_environment(
    tmp_path: Path,
) -> None:
    assert parse_settings([*MONITOR, "--secret", "abc"], environ={}).secret == "abc"
    path = tmp_path / "secret"
    path.write_text("from-file\n")
    assert parse_settings([*MONITOR, "--secret-file", str(path)], environ={}).secret == "from-file"
    assert parse_settings(MONITOR, environ={"EV_CP_SECRET": "env"}).secret == "env"
    assert "abc" not in repr(parse_settings([*MONITOR, "--secret", "abc"], environ={}))


@pytest.mark.parametrize(
    "extra",
    [[], ["--secret", "a", "--secret-file", "x"], ["--secret-file", "/nonexistent/secret"]],
)
def test_a_monitor_without_a_usable_secret_exits_2(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        parse_settings([*MONITOR, *extra], environ={})
    assert stop.value.code == 2
    assert "secret" in capsys.readouterr().err


def test_a_token_file_is_private_and_ends_with_its_key(tmp_path: Path) -> None:
    token = tmp_path / "dir" / "user1.token"
    session = DriverSession("user1", "key0000000000001", new_key(), time.time() + 3600)
    session.save(token, "central-key")
    assert token.stat().st_mode & 0o777 == 0o600
    loaded = DriverSession.load(token, "user1")
    assert loaded is not None and loaded[0].key == session.key and loaded[1] == "central-key"
    assert DriverSession.load(token, "user2") is None  # someone else's token
    DriverSession("user1", "key0000000000002", new_key(), time.time() + 10).save(token, "k")
    assert DriverSession.load(token, "user1") is None  # about to expire: log in again
    token.write_text("{not json")
    assert DriverSession.load(token, "user1") is None
