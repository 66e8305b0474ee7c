"""The monitor's settings: one dataclass, built from flags that mirror EV_ variables."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import ConfigError
from shared.kafka_access import KafkaLogin
from shared.settings import (
    EnvArgumentParser,
    add_common_options,
    add_kafka_login_options,
    broker_address,
    host_port,
    host_ports,
    identifier,
    is_loopback,
    read_secret,
    seconds,
    take_kafka_login,
)
from shared.tls import client_context


@dataclass(frozen=True)
class MonitorSettings:
    engine: tuple[str, int]
    central: tuple[tuple[str, int], ...]  # one Central, or several tried in turn
    cp_id: str
    secret: str = field(default="", repr=False)  # the CP's credentials at Central
    interval: float = 1.0
    check_timeout: float = 0.8
    broker: str | None = None  # publish health samples to Kafka when set
    log_level: str = "INFO"
    log_json: bool = False
    # TLS to Central (docs/tls.md): on with --central-tls or --tls-ca; the CA file verifies
    # Central's certificate (the system's CAs when None).
    central_tls: bool = False
    tls_ca: str | None = None
    # Self-enrolment (EV_CP_M/enrolment.py): a token while the CP has no secret file yet.
    secret_file: str | None = None
    registry: str | None = None
    enrolment_token: str | None = field(default=None, repr=False)
    registry_ca: str | None = None
    kafka: KafkaLogin | None = None  # a secured broker's login (docs/security.md)


def build_parser(environ: Mapping[str, str] | None = None) -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="EV_CP_M",
        description="The charging point's monitor: health-checks its engine, reports to Central.",
        environ=environ,
    )
    parser.add_option("--engine", required=True, type=host_port, help="the engine's HOST:PORT")
    parser.add_option(
        "--central",
        required=True,
        type=host_ports,
        help="Central's HOST:PORT, or several separated by commas: when one cannot be reached "
        "or refuses the CP, the next is tried at once",
    )
    parser.add_option("--cp-id", required=True, type=identifier, help="this CP's id")
    parser.add_option(
        "--secret",
        default=None,
        env="EV_CP_SECRET",
        help="this CP's secret, issued when it was registered (prefer --secret-file)",
    )
    parser.add_option(
        "--secret-file",
        default=None,
        env="EV_CP_SECRET_FILE",
        help="a file holding this CP's secret (first line)",
    )
    parser.add_option("--interval", type=seconds, default=1.0, help="seconds between checks")
    parser.add_option(
        "--check-timeout", type=seconds, default=0.8, help="seconds to wait for a health report"
    )
    parser.add_option(
        "--broker",
        default=None,
        help="Kafka bootstrap HOST:PORT: publish a health sample after every check "
        "(for the site dashboard); none by default",
    )
    parser.add_option(
        "--central-tls",
        action="store_true",
        help="talk TLS to Central, verifying its certificate and host name",
    )
    parser.add_option(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="CA certificate that signed Central's (implies --central-tls; "
        "default: the system's CAs)",
    )
    parser.add_option(
        "--registry",
        default=None,
        metavar="URL",
        help="EV_Registry's https:// URL: with --enrolment-token and no --secret-file yet, "
        "the CP enrols there once and keeps its secret in --secret-file (docs/registry.md)",
    )
    parser.add_option(
        "--enrolment-token",
        default=None,
        metavar="TOKEN",
        help="the one-time enrolment token an admin issued for this CP",
    )
    parser.add_option(
        "--registry-ca",
        default=None,
        metavar="PEM",
        help="CA certificate that signed the registry's (default: --tls-ca, else the system's CAs)",
    )
    add_kafka_login_options(parser)
    add_common_options(parser)
    return parser


def check_broker(parser: argparse.ArgumentParser, broker: str) -> None:
    """Exit 2 unless `broker` is a comma-separated list of HOST:PORT."""
    try:
        broker_address(broker)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"argument --broker: {exc}")


def check_enrolment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The registry's URL, when the enrolment flags fit together (exit 2 otherwise)."""
    if not (args.registry and args.enrolment_token):
        parser.error("--registry and --enrolment-token go together")
    if not args.secret_file or args.secret:
        parser.error("enrolment needs --secret-file PATH (where the secret is kept), not --secret")
    return check_registry_url(args.registry)


def check_registry_url(url: str) -> str:
    """`url` without a trailing slash; ConfigError unless it is https:// (or http:// to a
    loopback address, for tests)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"--registry must be an https:// URL, not {url!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(f"--registry must be https:// (the secret travels back): {url!r}")
    return url.rstrip("/")


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> MonitorSettings:
    """Parse the command line; exits 2 on bad arguments, raises ConfigError on bad env."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    broker = args.broker.strip() if args.broker else None
    if broker:
        check_broker(parser, broker)
    tls_ca = args.tls_ca or None  # empty (as compose passes it unset): no CA file
    central_tls = bool(args.central_tls or tls_ca)
    if central_tls:
        client_context(tls_ca)  # a missing or bad CA file: exit 2 now, in one line
    registry = None
    if args.enrolment_token or args.registry:
        registry = check_enrolment(parser, args)
    # Not enrolled yet: the secret comes from the registry (EV_CP_M/enrolment.py).
    enrolling = registry is not None and not Path(args.secret_file).exists()
    return MonitorSettings(
        engine=args.engine,
        central=args.central,
        cp_id=args.cp_id,
        secret="" if enrolling else read_secret(parser, args.secret, args.secret_file),
        interval=args.interval,
        check_timeout=args.check_timeout,
        broker=broker or None,
        log_level=args.log_level,
        log_json=args.log_json,
        central_tls=central_tls,
        tls_ca=tls_ca,
        secret_file=args.secret_file,
        registry=registry,
        enrolment_token=args.enrolment_token if enrolling else None,
        registry_ca=args.registry_ca or tls_ca,
        kafka=take_kafka_login(args),
    )
