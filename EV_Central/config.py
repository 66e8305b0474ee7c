"""Central's settings: command-line flags mirrored by EV_ environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import (
    EnvArgumentParser,
    add_common_options,
    port_number,
    positive_float,
)

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


def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="EV_Central",
        description="The control centre: monitors over TCP, drivers and engines over Kafka.",
        epilog="Subcommands: 'ctl (stop|resume) (CP_ID|all)' sends an admin command; "
        "'ctl --help' for details.",
    )
    parser.add_option("--port", type=port_number, default=5000, help="TCP port for monitors")
    parser.add_option("--broker", required=True, help="Kafka bootstrap HOST:PORT")
    parser.add_option("--db", default=DEFAULT_DB, help="SQLite database file (created if absent)")
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
        "--console",
        choices=["auto", "panel", "log", "off"],
        default="auto",
        help="panel: live coloured table (terminal); log: one line per event",
    )
    add_common_options(parser)
    return parser


def parse(argv: list[str] | None) -> CentralSettings:
    args = build_parser().parse_args(argv)
    return CentralSettings(**vars(args))
