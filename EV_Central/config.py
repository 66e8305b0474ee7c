"""Central's settings: command-line flags mirrored by EV_ environment variables."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from shared.kafka_access import KafkaLogin
from shared.settings import (
    EnvArgumentParser,
    add_common_options,
    add_kafka_login_options,
    port_number,
    positive_float,
    seconds,
    take_kafka_login,
)
from shared.tls import add_server_options, optional_server_context
from shared.webapp import PER_ADDRESS, add_connection_options
from shared.websession import add_session_options

DEFAULT_DB = "data/ev_charging.db"


@dataclass(frozen=True)
class CentralSettings:
    port: int
    broker: str
    db: str
    http_port: int
    listen_host: str
    heartbeat_timeout: float
    authorization_ttl: float
    end_grace: float
    monitor_grace: float
    telemetry_timeout: float
    request_ttl: float
    console: str
    log_level: str
    log_json: bool
    # People logging in (EV_Central/auth.py, docs/web-auth.md): a source that fails this many
    # times in a row on an account is blocked, for doubling times up to lockout_seconds.
    lockout_after: int = 5
    lockout_seconds: float = 300.0
    session_ttl: float = 8 * 3600.0
    allowed_origin: list[str] = field(default_factory=list)
    # What one address may do on :5000 (EV_Central/monitor_server.py, docs/security.md).
    max_unauthenticated: int = 256
    auth_block_after: int = 20
    # Connections open at once from one address on the admin web (shared/webshell.py).
    max_connections_per_address: int = PER_ADDRESS
    cp_answer_timeout: float = 5.0
    # TLS on :5000 and the admin web (docs/tls.md): both files, or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    demo: bool = False
    # High availability (docs/high-availability.md): two or more Centrals, one active.
    ha: bool = False
    advertise: str = ""
    lease_timeout: float = 3.0
    # A secured Kafka (docs/security.md, "Kafka"): Central's login, None for a plain broker.
    kafka: KafkaLogin | None = None


def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="EV_Central",
        description="The control centre: monitors over TCP, drivers and engines over Kafka.",
        epilog="Subcommands: 'ctl (stop|resume|register|revoke-key|reset-secret) ...' sends an "
        "admin command; 'user (add|passwd|list) ...' manages accounts; "
        "'ctl --help' and 'user --help' for details.",
    )
    parser.add_option("--port", type=port_number, default=5000, help="TCP port for monitors")
    parser.add_option(
        "--broker", required=True, help="Kafka bootstrap HOST:PORT (a comma-separated list)"
    )
    parser.add_option("--db", default=DEFAULT_DB, help="SQLite database file (created if absent)")
    parser.add_option(
        "--demo",
        action="store_true",
        help="seed a database created now with the demo CPs and accounts (public passwords: "
        "demos only); without it a new database has no accounts",
    )
    parser.add_option("--http-port", type=port_number, default=8002, help="admin web port")
    parser.add_option("--listen-host", default="0.0.0.0", help="address the servers bind to")
    parser.add_option(
        "--heartbeat-timeout",
        type=positive_float,
        default=3.0,
        help="seconds without a heartbeat before a CP is DESCONECTADO",
    )
    parser.add_option(
        "--authorization-ttl",
        type=positive_float,
        default=60.0,
        help="seconds an authorised supply waits to be plugged before it expires",
    )
    parser.add_option(
        "--end-grace",
        type=positive_float,
        default=2.0,
        help="seconds to wait for an engine's final figures after asking it to stop",
    )
    parser.add_option(
        "--monitor-grace",
        type=positive_float,
        default=6.0,
        help="seconds to wait for the engine to end a supply after its monitor is lost",
    )
    parser.add_option(
        "--telemetry-timeout",
        type=positive_float,
        default=15.0,
        help="seconds without telemetry before a supply is settled as engine lost",
    )
    parser.add_option(
        "--request-ttl",
        type=positive_float,
        default=30.0,
        help="requests older than this (e.g. sent while Central was down) are denied",
    )
    parser.add_option(
        "--cp-answer-timeout",
        type=positive_float,
        default=5.0,
        help="seconds to wait for a CP's engine to accept an authorisation before the "
        "request is denied (cp_no_answer)",
    )
    parser.add_option(
        "--console",
        choices=["auto", "panel", "log", "off"],
        default="auto",
        help="panel: live coloured table (terminal); log: one line per event",
    )
    parser.add_option(
        "--lockout-after",
        type=failure_count,
        default=5,
        help="failed logins in a row from one source (address, login key) on one account "
        "before that source is blocked; the account itself is never locked",
    )
    parser.add_option(
        "--lockout-seconds",
        type=seconds,
        default=300.0,
        help="the longest a failing source is blocked (blocks start at 30 s and double)",
    )
    parser.add_option(
        "--max-unauthenticated",
        type=connection_count,
        default=256,
        help="connections to the monitor port from one address that may wait to authenticate "
        "at once (each has 5 s); more are refused on arrival",
    )
    parser.add_option(
        "--auth-block-after",
        type=failure_count,
        default=20,
        help="failed CP authentications in a row from one address before its new connections "
        "are refused for a while (5 s, doubling up to 60 s)",
    )
    parser.add_option(
        "--ha",
        action="store_true",
        help="high availability: this Central is active or the hot standby of another one "
        "started the same way, decided through Kafka (docs/high-availability.md); its "
        "database is rebuilt from the Kafka changelog at every start",
    )
    parser.add_option(
        "--advertise",
        default="",
        help="with --ha: the host name monitors and browsers reach this Central at, named by "
        "a standby when it refuses them (default: this machine's host name)",
    )
    parser.add_option(
        "--lease-timeout",
        type=positive_float,
        default=3.0,
        help="with --ha: seconds without a sign of life from the active Central before a "
        "standby takes over (Kafka's group session timeout)",
    )
    add_session_options(parser, "the admin panel (and ctl)")
    add_server_options(parser, "the monitor port and the admin web")
    add_connection_options(parser)
    add_kafka_login_options(parser)
    add_common_options(parser)
    return parser


def connection_count(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 100_000:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 100000, got {value!r}")
    return int(value)


def failure_count(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 1000, got {value!r}")
    return int(value)


def parse(argv: list[str] | None) -> CentralSettings:
    args = build_parser().parse_args(argv)
    # An empty EV_TLS_CERT (as a compose file passes it) means TLS off.
    args.tls_cert, args.tls_key = args.tls_cert or None, args.tls_key or None
    # Bad TLS files stop Central now, with one line, not after it has opened its ports.
    optional_server_context(args.tls_cert, args.tls_key)
    kafka = take_kafka_login(args)
    return CentralSettings(**vars(args), kafka=kafka)
