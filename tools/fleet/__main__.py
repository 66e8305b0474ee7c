"""python -m tools.fleet --central HOST:PORT --broker HOST:PORT --admin HOST:PORT --cps N ...

Or `python -m tools.fleet seed --db PATH --cps N --credentials FILE [--supplying F]` to register
the CPs and driver accounts in Central's database before Central starts; their secrets and
passwords go to FILE (readable by its owner only), which the run reads with --credentials.

The run logs in at Central's admin web as --admin-user, with the password of
--admin-password-file, else of EV_ADMIN_PASSWORD, else a prompt on a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from EV_Central.ctl import LoginRefused, read_password
from shared.errors import EVError
from shared.kafka_access import KafkaLogin
from shared.lifecycle import run_loop
from shared.settings import positive_float
from tools.fleet.accounts import Credentials, CredentialsError, seed_database
from tools.fleet.failover import parse_addresses
from tools.fleet.sim import Fleet, FleetConfig, FleetError, cp_ids, driver_ids


def seed(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.fleet seed")
    p.add_argument("--db", required=True)
    p.add_argument("--cps", type=int, required=True)
    p.add_argument("--supplying", type=float, default=0.2)
    p.add_argument("--prefix", default="SIM")
    p.add_argument(
        "--credentials",
        type=Path,
        required=True,
        help="JSON file for the CPs' secrets and the drivers' passwords (kept, extended)",
    )
    a = p.parse_args(argv)
    drivers = max(1, round(a.cps * a.supplying))
    try:
        credentials = Credentials.load(a.credentials)
        seed_database(a.db, cp_ids(a.prefix, a.cps), driver_ids(a.prefix, drivers), credentials)
        credentials.save(a.credentials)
    except (CredentialsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"seeded {a.cps} CPs and {drivers} drivers into {a.db}; credentials in {a.credentials}")
    return 0


def seconds_range(text: str) -> tuple[float, float]:
    """LOW,HIGH: two positive numbers of seconds, LOW <= HIGH."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH seconds, got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


def print_event(event: dict[str, Any]) -> None:
    """A fleet event as one JSON line on stdout, at once (the bench reads them live)."""
    print(json.dumps(event), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["seed"]:
        return seed(argv[1:])
    p = argparse.ArgumentParser(prog="python -m tools.fleet", description=__doc__)
    p.add_argument(
        "--central",
        required=True,
        help="Central's monitor port HOST:PORT, or the Centrals of an HA pair HOST:PORT,HOST:PORT"
        " (a monitor whose link breaks or is refused tries the next one, following the active"
        " Central a standby names)",
    )
    p.add_argument("--broker", required=True, help="Kafka HOST:PORT")
    p.add_argument(
        "--kafka-user",
        default="",
        help="log in to a secured Kafka as this user (its ACLs must cover both the engines'"
        ' and the drivers\' topics: docs/security.md, "Kafka")',
    )
    p.add_argument("--kafka-password-file", default="", help="that login's password")
    p.add_argument("--kafka-ca", default="", help="the CA of the brokers' certificates")
    p.add_argument(
        "--admin",
        help="Central's admin HOST:PORT; without it (failover runs, where the Central changes)"
        " no CP is registered, no dashboard watched, no /metrics read and no CP cut off",
    )
    p.add_argument("--cps", type=int, default=1000)
    p.add_argument("--supplying", type=float, default=0.2, help="share of CPs supplying")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    p.add_argument("--request-rate", type=float, default=100.0, help="first requests a second")
    p.add_argument("--lose", type=int, default=10, help="CPs cut off near the end")
    p.add_argument(
        "--supply-seconds",
        type=seconds_range,
        default=(60.0, 120.0),
        metavar="LOW,HIGH",
        help="each supply lasts a random time in this range; then its driver asks again",
    )
    p.add_argument("--prefix", default="SIM", help="CP id prefix")
    p.add_argument("--central-pid", type=int, help="Central's pid (default: looked up)")
    p.add_argument(
        "--db",
        help="Central's database: insert (or refresh) the simulated driver accounts and read"
        " Central's identity key there",
    )
    p.add_argument(
        "--credentials",
        type=Path,
        help="JSON file of CP secrets and driver passwords (from `seed`); the secrets of CPs"
        " registered or reset during the run are added to it",
    )
    p.add_argument("--admin-user", default="admin", help="admin account at Central's web")
    p.add_argument("--admin-password-file", metavar="PATH", help="first line: its password")
    p.add_argument(
        "--central-key",
        help="Central's identity public key (base64) to pin; default: read from --db, else"
        " asked over Kafka",
    )
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument(
        "--stop-file",
        type=Path,
        help="end the measured window as soon as this file exists (--duration at most)",
    )
    p.add_argument(
        "--ledger",
        type=Path,
        metavar="PATH",
        help="append to PATH, a JSON line each, what the simulated engines metered (authorised,"
        " tick, ended: EV_CP_E's --ledger lines) and what the simulated drivers received"
        " (ticket, denied), for an audit that does not take Central's word for it",
    )
    p.add_argument(
        "--drain",
        type=positive_float,
        default=20.0,
        metavar="S",
        help="at the end of the run (--duration, or --stop-file), after no new supply is asked"
        " for and every supply in progress is ended as unplugged: wait up to S seconds for"
        " their tickets to reach the drivers (default 20)",
    )
    p.add_argument(
        "--events",
        action="store_true",
        help="print fleet-wide connection events as JSON lines on stdout (the CPs all connected"
        " again after a Central's loss, ...)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet %(message)s")
    # aiokafka logs every failed connection (thousands a second while a broker is away): the
    # fleet says once, itself, when Kafka keeps its events waiting (as the services do).
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        password: str | None = ""
        if a.admin is not None:
            password = read_password(a.admin_password_file, os.environ, sys.stdin, a.admin_user)
        credentials = Credentials.load(a.credentials) if a.credentials else Credentials()
        addresses = parse_addresses(a.central)
        kafka = (
            KafkaLogin.from_files(a.kafka_user, a.kafka_password_file, a.kafka_ca)
            if a.kafka_user
            else None
        )
    except (CredentialsError, EVError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if password is None:
        print(
            "error: no admin password (--admin-password-file or EV_ADMIN_PASSWORD)",
            file=sys.stderr,
        )
        return 2
    pid = a.central_pid
    if pid is None and a.admin is not None:
        from tools.fleet.procstat import find_pid

        pid = find_pid("EV_Central", str(addresses[0][1]))
    config = FleetConfig(
        central=a.central,
        broker=a.broker,
        admin=a.admin,
        cps=a.cps,
        supplying=a.supplying,
        duration=a.duration,
        warmup=a.warmup,
        request_rate=a.request_rate,
        supply_seconds=a.supply_seconds,
        lose=a.lose if a.admin is not None else 0,
        prefix=a.prefix,
        central_pid=pid,
        db=a.db,
        admin_user=a.admin_user,
        admin_password=password,
        credentials=credentials,
        credentials_path=a.credentials,
        central_key=a.central_key,
        stop_file=a.stop_file,
        on_event=print_event if a.events else None,
        ledger=a.ledger,
        drain=a.drain,
        kafka=kafka,
    )
    failure: BaseException | None = None
    try:
        result = run_loop(Fleet(config).run())  # uvloop, as Central: less CPU of the cores
    except* (EVError, FleetError, LoginRefused, OSError) as group:
        failure = group.exceptions[0]
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
