"""`python -m EV_Central audit` as a real process on a real database written by AuditLog."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from EV_Central import audit_cli as audit
from EV_Central import schema
from EV_Central.audit import AuditLog
from EV_Central.db import Database
from helpers import scaled
from procs import REPO_ROOT


async def audit_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `python -m EV_Central audit ARGS`; return its exit code, stdout and stderr."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EV_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "EV_Central",
        "audit",
        *args,
        cwd=REPO_ROOT,
        env={**base, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(scaled(30)):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def write_log(path: Path) -> None:
    schema.initialise(path, seed=False)
    db = Database(path)
    await db.start()
    try:
        audit = AuditLog(db)
        await audit.record("login", "failed", actor="admin", source="10.1.2.3:5555")
        await audit.record("lockout", "ok", actor="admin", source="10.1.2.3:5555", detail="300 s")
        await audit.record("cp_auth", "ok", actor="CP001", source="10.1.2.9:40001")
        await audit.record("stop", "ok", actor="console", source="console", detail="\x1b[2Jall")
    finally:
        await db.stop()


def copy_db(src: Path, dst_dir: Path, *, key: bool = True) -> Path:
    dst_dir.mkdir()
    dst = dst_dir / src.name
    shutil.copy(src, dst)
    if key:
        shutil.copy(f"{src}.audit-key", f"{dst}.audit-key")
    return dst


def tamper(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER audit_log_no_update")
        conn.execute("DROP TRIGGER audit_log_no_delete")
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


async def test_verify_and_show_on_a_real_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "central.db"
    await write_log(db)  # closed: the WAL is checkpointed into the file, copies are whole
    edited = copy_db(db, tmp_path / "edited")
    tamper(edited, "UPDATE audit_log SET outcome = 'ok' WHERE id = 1")
    truncated = copy_db(db, tmp_path / "truncated")
    tamper(truncated, "DELETE FROM audit_log WHERE id = 4")
    keyless = copy_db(db, tmp_path / "keyless", key=False)

    # Real processes for what scripts rely on: the exit codes and the one-line verdicts.
    code, out, err = await audit_cli("verify", "--db", str(db))
    assert code == 0, err
    match = re.fullmatch(
        r"audit log intact: 4 rows, head ([0-9a-f]{16}) \(hashes, links and MACs checked\)\n", out
    )
    assert match, out
    head = match.group(1)
    edit, trunc, expect = await asyncio.gather(
        audit_cli("verify", "--db", str(edited)),
        audit_cli("verify", env={"EV_DB": str(truncated)}),  # --db also reads EV_DB
        audit_cli("verify", "--db", str(truncated), "--expect", head),
    )

    # An edited row: exit 1, one line naming the row and why.
    assert edit[0] == 1 and edit[1] == ""
    assert edit[2] == "audit log BROKEN at row 1: edited: its contents do not match its hash\n"

    # A removed newest row leaves a shorter chain that holds, unless its head was noted.
    assert trunc[0] == 0 and "intact: 3 rows" in trunc[1], trunc
    assert expect[0] == 1 and f"expected head {head} is not in the chain" in expect[2], expect

    # The rest in-process (same main(), no interpreter start-up to pay for).
    monkeypatch.delenv("EV_DB", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = audit.main(list(args))
        except SystemExit as exc:  # argparse's exit on bad arguments
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    # Without the key file the hashes and links are still checked, and it says so.
    code, out, _ = run("verify", "--db", str(keyless))
    assert code == 0 and "MACs NOT checked" in out and "no key file" in out, out

    # show: the newest rows, oldest first, control characters escaped for the terminal.
    code, out, _ = run("show", "--db", str(db), "--limit", "2")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2, out
    assert lines[0].split()[0] == "3" and "CP001" in lines[0] and "cp_auth" in lines[0]
    assert lines[1].split()[0] == "4" and "\\x1b[2Jall" in lines[1] and "\x1b" not in out

    code, _, err = run("verify", "--db", str(db), "--limit", "2")
    assert code == 2 and err.count("\n") == 1 and "--limit" in err, err
    code, _, err = run("verify", "--db", str(tmp_path / "absent.db"))
    assert code == 1 and "no database at" in err, err
    code, _, err = run("verify", "--db", str(db), "--key", str(tmp_path / "no.key"))
    assert code == 1 and "no audit key at" in err, err
