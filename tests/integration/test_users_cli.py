"""`python -m EV_Central user` on a real SQLite file: accounts without any default password."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import pytest

import init_db
from EV_Central import users
from EV_Central.passwords import verify_password


class Pipe(io.StringIO):
    """A stdin that is not a terminal (as in a script or a container)."""

    def isatty(self) -> bool:
        return False


def run(db: Path, *args: str) -> int:
    return users.main(["--db", str(db), *args], stdin=Pipe())


def rows(db: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def password_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pw"
    path.write_text(text + "\n")
    return str(path)


def test_a_database_without_the_demo_seed_has_no_account(tmp_path: Path) -> None:
    db = tmp_path / "central.db"
    assert init_db.main(["--db", str(db), "--no-seed"]) == 0
    assert rows(db, "SELECT COUNT(*) FROM users") == [(0,)]
    assert run(db, "list") == 0


def test_accounts_are_added_with_a_real_password_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "central.db"
    assert (
        run(
            db,
            "add",
            "ana",
            "--role",
            "driver",
            "--password-file",
            password_file(tmp_path, "short"),
        )
        == 2
    )
    assert "at least 8 characters" in capsys.readouterr().err
    assert run(db, "add", "ana", "--role", "driver") == 2  # no file, no terminal
    assert "no password" in capsys.readouterr().err
    assert rows(db, "SELECT COUNT(*) FROM users") == [(0,)]

    good = password_file(tmp_path, "correct horse battery")
    assert (
        run(db, "add", "ana", "--role", "driver", "--balance", "12.5", "--password-file", good) == 0
    )
    assert run(db, "add", "boss", "--role", "admin", "--password-file", good) == 0
    assert run(db, "add", "ana", "--role", "admin", "--password-file", good) == 1
    assert "exists already" in capsys.readouterr().err
    ((role, stored, cents),) = rows(
        db, "SELECT role, password_hash, balance_cents FROM users WHERE id = 'ana'"
    )
    assert (role, cents) == ("driver", 1250)
    assert str(stored).startswith("scrypt$") and "correct horse" not in str(stored)
    assert verify_password("correct horse battery", str(stored))


def test_a_new_password_replaces_the_old_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "central.db"
    old = password_file(tmp_path, "first password")
    assert run(db, "add", "ana", "--role", "driver", "--password-file", old) == 0
    new = tmp_path / "new"
    new.write_text("second password\n")
    assert run(db, "passwd", "ana", "--password-file", str(new)) == 0
    ((stored,),) = rows(db, "SELECT password_hash FROM users WHERE id = 'ana'")
    assert verify_password("second password", str(stored))
    assert not verify_password("first password", str(stored))
    assert run(db, "passwd", "nobody", "--password-file", str(new)) == 1
    assert run(db, "list") == 0
    assert "ana" in capsys.readouterr().out


def test_unlock_is_gone_since_accounts_are_never_locked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "central.db"
    assert init_db.main(["--db", str(db)]) == 0
    with pytest.raises(SystemExit) as exit_code:
        run(db, "unlock", "user1")
    assert exit_code.value.code == 2
    assert "invalid choice: 'unlock'" in capsys.readouterr().err


def test_a_standby_centrals_database_refuses_changes_and_names_the_active_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "central.db"
    assert init_db.main(["--db", str(db)]) == 0
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO meta VALUES ('local.role', 'standby')")
        conn.execute("INSERT INTO meta VALUES ('active_central', '{\"name\": \"pc2:5000\"}')")
    before = rows(db, "SELECT id, password_hash, balance_cents FROM users ORDER BY id")
    assert run(db, "passwd", "user1", "--password-file", password_file(tmp_path, "n3w-Pass!")) == 1
    err = capsys.readouterr().err
    assert "standby Central (--ha)" in err and "the active Central is pc2:5000" in err
    assert rows(db, "SELECT id, password_hash, balance_cents FROM users ORDER BY id") == before
    assert run(db, "list") == 0  # reading is fine
