"""The driver dashboard's settings: one dataclass, built from flags that mirror EV_ variables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shared.kafka_access import KafkaLogin
from shared.settings import (
    EnvArgumentParser,
    add_common_options,
    add_kafka_login_options,
    broker_address,
    port_number,
    positive_float,
    seconds,
)
from shared.tls import add_server_options
from shared.webapp import PER_ADDRESS, add_connection_options, server_fields
from shared.websession import add_session_options


@dataclass(frozen=True)
class DashboardSettings:
    broker: str
    http_port: int = 8001
    listen_host: str = "0.0.0.0"
    pause: float = 4.0  # seconds between the requests of an uploaded file
    reply_timeout: float = 10.0  # seconds to wait for Central's answer to a login or query
    log_level: str = "INFO"
    log_json: bool = False
    tls_cert: str | None = None  # HTTPS and WSS with both (docs/tls.md)
    tls_key: str | None = None
    central_key: str | None = None  # Central's identity key, pinned (else asked from Central)
    session_ttl: float = 8 * 3600.0  # seconds a browser's login lasts at most
    allowed_origin: tuple[str, ...] = ()  # other origins whose pages may use the WebSocket
    max_connections_per_address: int = PER_ADDRESS  # connections open at once from one host
    kafka: KafkaLogin | None = None  # a secured broker's login (docs/security.md)


def build_parser(environ: Mapping[str, str] | None = None) -> EnvArgumentParser:
    """The command line of `EV_Driver dashboard`; raises ConfigError for a bad EV_ variable."""
    parser = EnvArgumentParser(
        prog="EV_Driver dashboard",
        description=(
            "The drivers' browser dashboard: log in, see the charging points, ask for a "
            "supply and follow it live, run a file of requests, see tickets and balance."
        ),
        environ=environ,
        allow_abbrev=False,
    )
    parser.add_option(
        "--broker",
        required=True,
        type=broker_address,
        metavar="HOST:PORT",
        help="Kafka bootstrap HOST:PORT",
    )
    parser.add_option(
        "--http-port", type=port_number, default=8001, metavar="PORT", help="web port"
    )
    parser.add_option(
        "--listen-host", default="0.0.0.0", metavar="HOST", help="address the web server binds"
    )
    parser.add_option(
        "--pause",
        type=positive_float,
        default=4.0,
        metavar="S",
        help="seconds between the requests of an uploaded file",
    )
    parser.add_option(
        "--reply-timeout",
        type=seconds,
        default=10.0,
        metavar="S",
        help="seconds to wait for Central to answer a login or a query",
    )
    parser.add_option(
        "--central-key",
        default=None,
        metavar="BASE64",
        help="Central's identity key, pinned (Central logs it at start-up); "
        "without it the key is asked from Central on the first login",
    )
    add_session_options(parser, "the driver dashboard")
    add_server_options(parser, "the driver dashboard")
    add_connection_options(parser)
    add_kafka_login_options(parser)
    add_common_options(parser)
    return parser


def parse_settings(
    argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> DashboardSettings:
    """Settings from the command line and the environment (argparse exits 2 on bad flags)."""
    args = build_parser(environ).parse_args(list(argv))
    return DashboardSettings(
        **server_fields(args),
        pause=args.pause,
        reply_timeout=args.reply_timeout,
        central_key=args.central_key or None,
        session_ttl=args.session_ttl,
        allowed_origin=tuple(args.allowed_origin),
    )
