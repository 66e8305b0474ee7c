"""`python -m EV_Central user`: people's accounts in Central's database.

    user [--db PATH] add ID --role driver|admin|weather [--balance EUR] [--password-file PATH]
    user [--db PATH] passwd ID [--password-file PATH]
    user [--db PATH] list

Passwords are read from --password-file (its first line) or typed twice at a prompt; they
are never taken from the command line, where other users of the machine could see them.
Outside the demo seed a password has at least MIN_PASSWORD characters. Works beside a running
Central (SQLite allows one writer at a time and waits for its turn).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sqlite3
import sys
import time
from typing import TextIO

from EV_Central import schema
from EV_Central.config import DEFAULT_DB
from EV_Central.passwords import hash_password
from shared.settings import EnvArgumentParser, identifier

MIN_PASSWORD = 8
MAX_PASSWORD = 256  # what the login forms accept
MAX_BALANCE_EUR = 1_000_000


class AccountError(Exception):
    """A command that cannot be done (unknown account, weak password...): exit code 1 or 2."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def balance_eur(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an amount in euros, got {value!r}") from None
    if not 0 <= number <= MAX_BALANCE_EUR:
        raise argparse.ArgumentTypeError(f"expected 0 to {MAX_BALANCE_EUR} euros, got {value!r}")
    return number


def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="EV_Central user",
        description="Add accounts, set passwords, list accounts.",
    )
    parser.add_option("--db", default=DEFAULT_DB, help="Central's SQLite database file")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = commands.add_parser("add", help="add an account (asks for its password)")
    add.add_argument("user_id", type=identifier)
    # weather: the weather service's account (EV_W), which may only report the weather.
    add.add_argument("--role", choices=["driver", "admin", "weather"], required=True)
    add.add_argument("--balance", type=balance_eur, default=0.0, metavar="EUR")
    add.add_argument("--password-file", metavar="PATH", help="first line: the password")
    passwd = commands.add_parser("passwd", help="set an account's password")
    passwd.add_argument("user_id", type=identifier)
    passwd.add_argument("--password-file", metavar="PATH", help="first line: the password")
    commands.add_parser("list", help="list the accounts")
    return parser


def check_password(password: str) -> str:
    """The password if it may be used; AccountError (exit 2) saying why not otherwise."""
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password needs at least {MIN_PASSWORD} characters", 2)
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"a password has at most {MAX_PASSWORD} characters", 2)
    if password != password.strip():
        raise AccountError("a password may not start or end with a space", 2)
    return password


def read_new_password(password_file: str | None, stdin: TextIO, user_id: str) -> str:
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                lines = f.read(MAX_PASSWORD + 2).splitlines()
        except OSError as exc:
            raise AccountError(f"cannot read the password file: {exc}", 2) from None
        return check_password(lines[0] if lines else "")
    if not stdin.isatty():
        raise AccountError(
            "no password: give --password-file PATH, or run from a terminal to be asked", 2
        )
    first = check_password(getpass.getpass(f"new password of {user_id}: "))
    if getpass.getpass("the same again: ") != first:
        raise AccountError("the two passwords differ; nothing changed", 2)
    return first


def open_db(path: str) -> sqlite3.Connection:
    schema.initialise(path, seed=False)  # the schema, never the demo accounts
    conn = schema.connect(path)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def standby_refusal(conn: sqlite3.Connection) -> str | None:
    """Why accounts may not be changed in this database: a standby Central's (--ha), which is
    rebuilt from Kafka, so a change made here would be lost. None when they may."""
    rows = dict(
        conn.execute(
            "SELECT key, value FROM meta WHERE key IN (?, ?)", (schema.ROLE_KEY, schema.ACTIVE_KEY)
        ).fetchall()
    )
    if rows.get(schema.ROLE_KEY) != "standby":
        return None
    try:
        where = json.loads(rows.get(schema.ACTIVE_KEY) or "{}").get("name")
    except (ValueError, AttributeError):
        where = None
    return (
        "this database belongs to a standby Central (--ha): it is rebuilt from Kafka and the "
        "change would be lost; run the command with the active Central's database"
        + (f" (the active Central is {where})" if where else "")
    )


def add(conn: sqlite3.Connection, user_id: str, role: str, balance: float, password: str) -> str:
    with conn:
        if conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone():
            raise AccountError(f"account {user_id} exists already (use passwd to change it)")
        conn.execute(
            "INSERT INTO users (id, role, password_hash, balance_cents, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (user_id, role, hash_password(password), round(balance * 100), time.time()),
        )
    return f"added {role} {user_id}" + (f" with {balance:.2f} €" if role == "driver" else "")


def set_password(conn: sqlite3.Connection, user_id: str, password: str) -> str:
    with conn:
        cur = conn.execute(
            "UPDATE users SET password_hash = ? WHERE id = ?", (hash_password(password), user_id)
        )
        if cur.rowcount == 0:
            raise AccountError(f"no account {user_id}")
    return f"password of {user_id} changed"


def listing(conn: sqlite3.Connection) -> str:
    rows = conn.execute("SELECT id, role, balance_cents FROM users ORDER BY role, id").fetchall()
    lines = [f"{'account':<32} {'role':<7} {'balance':>12}"]
    for user_id, role, cents in rows:
        balance = f"{cents / 100:.2f} €" if role == "driver" else "-"
        lines.append(f"{user_id:<32} {role:<7} {balance:>12}")
    return "\n".join(lines)


def main(argv: list[str], stdin: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stdin = stdin or sys.stdin
    try:
        conn = open_db(args.db)
    except (OSError, sqlite3.Error) as exc:
        print(f"error: cannot open the database at {args.db}: {exc}", file=sys.stderr)
        return 1
    try:
        refusal = standby_refusal(conn) if args.command != "list" else None
        if refusal is not None:
            raise AccountError(refusal)
        if args.command == "add":
            password = read_new_password(args.password_file, stdin, args.user_id)
            print(add(conn, args.user_id, args.role, args.balance, password))
        elif args.command == "passwd":
            password = read_new_password(args.password_file, stdin, args.user_id)
            print(set_password(conn, args.user_id, password))
        else:
            print(listing(conn))
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except sqlite3.Error as exc:
        print(f"error: database: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    return 0
