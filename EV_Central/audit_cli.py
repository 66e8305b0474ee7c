"""`python -m EV_Central audit (verify|show)`: check or print Central's audit log from a shell.

It reads the database (read-only) and the key file itself: Central need not be running. The
chain and its checks are in EV_Central/audit.py; docs/audit.md tells what each answer means.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from EV_Central.audit import COLUMNS, AuditError, key_path_for, read_key, verify_chain
from EV_Central.config import DEFAULT_DB
from shared.errors import ConfigError
from shared.settings import EnvArgumentParser


def _limit(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 10000:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 10000, got {value!r}")
    return int(value)


def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="EV_Central audit",
        description="Check or show Central's audit log (docs/audit.md).",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="(verify|show)", parser_class=EnvArgumentParser
    )
    verify = commands.add_parser(
        "verify",
        help="check the hash chain; exit 0 when intact, 1 when not",
        description="Check every row's hash, its link to the row before and, with the key "
        "file, its MAC. Exit 0 when intact, 1 naming the first bad row.",
    )
    show = commands.add_parser(
        "show", help="print the newest rows", description="Print the newest audit rows."
    )
    for command in (verify, show):
        command.add_option("--db", default=DEFAULT_DB, help="Central's SQLite database file")
    verify.add_option(
        "--key",
        env="EV_AUDIT_KEY",
        default=None,
        help="the audit key file (default: the database path + .audit-key)",
    )
    verify.add_option(
        "--expect",
        env="EV_AUDIT_EXPECT",
        default=None,
        metavar="HASH",
        help="a head hash noted earlier (12+ hex digits): it must still be in the chain",
    )
    show.add_option("--limit", env="EV_AUDIT_LIMIT", type=_limit, default=20, help="how many rows")
    return parser


def open_readonly(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def printable(text: str) -> str:
    """Text safe for a terminal: control characters shown as escapes, not obeyed."""
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def _verify(args: Any) -> int:
    db_path = Path(args.db)
    if not db_path.is_file():
        print(f"error: no database at {db_path}", file=sys.stderr)
        return 1
    expect = (args.expect or "").strip().lower()
    if expect and (len(expect) < 12 or any(c not in "0123456789abcdef" for c in expect)):
        print("error: --expect takes 12 or more hex digits of a head hash", file=sys.stderr)
        return 2
    key_file = Path(args.key) if args.key else key_path_for(db_path)
    try:
        key = read_key(key_file)
        if key is None and args.key:
            raise AuditError(f"no audit key at {key_file}")
        with contextlib.closing(open_readonly(db_path)) as conn:
            result = verify_chain(conn, key)
            found = (
                not expect
                or conn.execute(
                    "SELECT 1 FROM audit_log WHERE substr(hash, 1, ?) = ? AND id <= ? LIMIT 1",
                    (len(expect), expect, result.rows),
                ).fetchone()
                is not None
            )
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"error: cannot read the audit log in {db_path}: {exc}", file=sys.stderr)
        return 1
    if not result.ok:
        print(result.summary(), file=sys.stderr)
        return 1
    if not found:
        print(
            f"audit log BROKEN: the expected head {expect} is not in the chain"
            " (rows were removed from its end, or it was rebuilt)",
            file=sys.stderr,
        )
        return 1
    print(result.summary())
    if key is None:
        print(f"note: no key file at {key_file}, so the MACs were not checked")
    return 0


def _show(args: Any) -> int:
    db_path = Path(args.db)
    if not db_path.is_file():
        print(f"error: no database at {db_path}", file=sys.stderr)
        return 1
    try:
        with contextlib.closing(open_readonly(db_path)) as conn:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM audit_log ORDER BY id DESC LIMIT ?", (args.limit,)
            ).fetchall()
    except sqlite3.Error as exc:
        print(f"error: cannot read the audit log in {db_path}: {exc}", file=sys.stderr)
        return 1
    for row_id, ts, source, actor, action, outcome, detail, *_ in reversed(rows):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))
        fields = [printable(str(v)) for v in (source, actor, action, outcome, detail)]
        print(
            f"{row_id:>6}  {when}  {fields[0]:<21} {fields[1]:<12} {fields[2]:<16}"
            f" {fields[3]:<7} {fields[4]}".rstrip()
        )
    if not rows:
        print("the audit log is empty")
    return 0


def main(argv: list[str]) -> int:
    """`python -m EV_Central audit (verify|show) ...`; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "verify":
        return _verify(args)
    return _show(args)
