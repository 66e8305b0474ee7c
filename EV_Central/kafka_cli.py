"""`python -m EV_Central kafka-access`: the logins and ACLs of a secured Kafka.

    python -m EV_Central kafka-access --broker B --kafka-ca CA --kafka-password-file ADMIN \
        setup DIR [CP_ID ...]     the topics, and a login with its ACLs for every role; each
                                  role's password in DIR/kafka-ROLE.password (made when missing);
                                  with CP ids, their engines' logins too (as `cp` makes them)
    python -m EV_Central kafka-access ... cp CP_ID DIR
                                  the login of CP_ID's engine, cp-CP_ID, its password in
                                  DIR/kafka-cp-CP_ID.password
    python -m EV_Central kafka-access ... password NAME DIR
                                  a new password for the login NAME (any of them, `admin` too),
                                  written to DIR/kafka-NAME.password once the broker has it
    python -m EV_Central kafka-access ... withdraw NAME
                                  NAME can no longer log in, and its ACLs are gone

It logs in as `admin` (or --kafka-user), the principal whose password scripts/kafka.sh wrote
into the brokers' storage. Running `setup` again changes nothing that is there already, except
that every role's ACLs are granted again (granting one twice is harmless). docs/security.md,
"Kafka", says which file goes to which PC.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from aiokafka.errors import KafkaError

from shared.bus import KafkaBus
from shared.errors import ConfigError, EVError
from shared.kafka_access import ROLE_GRANTS, KafkaAccess, KafkaLogin, cp_principal
from shared.settings import (
    EnvArgumentParser,
    add_kafka_login_options,
    broker_address,
    identifier,
    take_kafka_login,
)

# The roles that log in with a login of their own name (a CP's engine has one per CP).
SHARED_ROLES = ("central", "monitor", "driver", "site", "kafka-ui")


def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="EV_Central kafka-access",
        description="Logins (SCRAM) and ACLs on a secured Kafka (docs/security.md).",
    )
    parser.add_option("--broker", required=True, type=broker_address, help="HOST:PORT,...")
    add_kafka_login_options(parser)
    parser.set_defaults(kafka_user="admin")
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("setup", help="topics, and every role's login and ACLs")
    setup.add_argument("dir", type=Path, help="where the roles' password files are")
    setup.add_argument(
        "cp_ids", nargs="*", type=identifier, metavar="CP_ID", help="engines' logins too"
    )
    cp = commands.add_parser("cp", help="the login of a CP's engine")
    cp.add_argument("cp_id", type=identifier)
    cp.add_argument("dir", type=Path, help="where its password file goes")
    rotate = commands.add_parser("password", help="a new password for a login")
    rotate.add_argument("name", type=login_name)
    rotate.add_argument("dir", type=Path, help="where its password file goes")
    withdraw = commands.add_parser("withdraw", help="a login and its ACLs removed")
    withdraw.add_argument("name")
    return parser


def login_name(value: str) -> str:
    """A login's name as the roles and `cp-ID` are spelt (it names a file too)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a login name")
    return value


def write_password(path: Path, password: str) -> None:
    """`path` holds `password` (mode 0600), replaced in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = path.with_name(path.name + ".new")
    descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(password + "\n")
    os.replace(fresh, path)


def password_file(directory: Path, name: str) -> tuple[Path, str]:
    """DIR/kafka-NAME.password, made (mode 0600) with a new random password when missing."""
    path = directory / f"kafka-{name}.password"
    if path.exists():
        password = path.read_text(encoding="utf-8").strip()
        if password:
            return path, password
    password = secrets.token_urlsafe(24)
    write_password(path, password)
    return path, password


async def setup(
    broker: str, admin: KafkaLogin, directory: Path, cp_ids: Sequence[str] = ()
) -> list[str]:
    bus = KafkaBus(broker, "ev-kafka-access", login=admin)
    await bus.ensure_topics()
    said = []
    async with KafkaAccess(broker, admin) as access:
        for role in SHARED_ROLES:
            path, password = password_file(directory, role)
            await access.enrol(role, password, role)
            said.append(f"{role}: {len(ROLE_GRANTS[role])} ACLs, password in {path}")
    for cp_id in cp_ids:
        said.append(await enrol_cp(broker, admin, cp_id, directory))
    return said


async def enrol_cp(broker: str, admin: KafkaLogin, cp_id: str, directory: Path) -> str:
    name = cp_principal(cp_id)
    path, password = password_file(directory, name)
    async with KafkaAccess(broker, admin) as access:
        await access.enrol(name, password, "cp")
    return (
        f"{name}: the engine of {cp_id} logs in with --kafka-user {name} "
        f"--kafka-password-file {path}"
    )


async def rotate(broker: str, admin: KafkaLogin, name: str, directory: Path) -> str:
    """A new password for `name`: the broker first, then the file (a failure leaves both as
    they were)."""
    password = secrets.token_urlsafe(24)
    async with KafkaAccess(broker, admin) as access:
        await access.set_password(name, password)
    path = directory / f"kafka-{name}.password"
    write_password(path, password)
    return f"{name}: a new password in {path}; the old one no longer logs in"


async def withdraw(broker: str, admin: KafkaLogin, name: str) -> str:
    async with KafkaAccess(broker, admin) as access:
        await access.withdraw(name)
    return f"{name}: no login, no ACLs"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        admin = take_kafka_login(args)
        if admin is None:
            raise ConfigError("--kafka-user is empty: log in as the admin principal")
        if args.command == "setup":
            lines = asyncio.run(setup(args.broker, admin, args.dir, args.cp_ids))
        elif args.command == "cp":
            lines = [asyncio.run(enrol_cp(args.broker, admin, args.cp_id, args.dir))]
        elif args.command == "password":
            lines = [asyncio.run(rotate(args.broker, admin, args.name, args.dir))]
        else:
            lines = [asyncio.run(withdraw(args.broker, admin, args.name))]
    except (EVError, KafkaError, OSError) as exc:
        print(f"kafka-access: error: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0
