"""The registry's settings: one dataclass, built from flags that mirror EV_ variables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shared.errors import ConfigError
from shared.settings import (
    EnvArgumentParser,
    add_common_options,
    host_port,
    is_loopback,
    port_number,
    positive_float,
)
from shared.tls import add_server_options, client_context, optional_server_context

DEFAULT_PORT = 8004
MAX_BODY = 16 * 1024  # bytes of one request body; more is 413


@dataclass(frozen=True)
class RegistrySettings:
    central: tuple[str, int]  # Central's admin web, HOST:HTTP_PORT
    http_port: int = DEFAULT_PORT
    listen_host: str = "0.0.0.0"
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure_http: bool = False  # plain HTTP, on a loopback address only (tests, development)
    central_ca: str | None = None  # wss:// to Central, verifying it with this CA
    timeout: float = 10.0  # seconds Central has to answer one call
    max_body: int = MAX_BODY
    log_level: str = "INFO"
    log_json: bool = False

    @property
    def scheme(self) -> str:
        return "http" if self.insecure_http else "https"

    @property
    def central_tls(self) -> bool:
        return self.central_ca is not None


def build_parser(environ: Mapping[str, str] | None = None) -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="EV_Registry",
        description="Register, deregister and enrol charging points over a REST API (HTTPS); "
        "Central keeps the records, reached over its admin web (docs/registry.md).",
        environ=environ,
    )
    parser.add_option(
        "--central",
        type=host_port,
        default=host_port("127.0.0.1:8002"),
        help="Central's admin web HOST:HTTP_PORT",
    )
    parser.add_option(
        "--central-ca",
        default=None,
        metavar="PEM",
        help="CA certificate of Central's admin web: talk TLS (wss://) to it and verify it",
    )
    parser.add_option("--http-port", type=port_number, default=DEFAULT_PORT, help="REST API port")
    parser.add_option("--listen-host", default="0.0.0.0", help="address the API binds to")
    add_server_options(parser, "the REST API")
    parser.add_option(
        "--insecure-http",
        action="store_true",
        help="serve plain HTTP instead of HTTPS; only on a loopback --listen-host (tests, "
        "development): bearer tokens and CP secrets would cross the network in clear",
    )
    parser.add_option(
        "--timeout", type=positive_float, default=10.0, help="seconds Central has to answer"
    )
    add_common_options(parser)
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RegistrySettings:
    """Parse the command line; exits 2 on bad arguments, raises ConfigError on bad settings.

    The certificate files are read when the service starts (`check_files`), so that settings
    can be checked where the files are not (the compose tests)."""
    args = build_parser(environ).parse_args(argv)
    tls_cert, tls_key = args.tls_cert or None, args.tls_key or None
    if args.insecure_http:
        if tls_cert or tls_key:
            raise ConfigError("--insecure-http and --tls-cert/--tls-key exclude each other")
        if not is_loopback(args.listen_host):
            raise ConfigError(
                f"--insecure-http serves only a loopback address, not {args.listen_host}: "
                "give the registry --tls-cert and --tls-key (scripts/make-certs.py)"
            )
    elif not (tls_cert and tls_key):
        raise ConfigError(
            "the registry serves HTTPS: give --tls-cert and --tls-key (scripts/make-certs.py "
            "makes them), or --insecure-http on a loopback address for tests"
        )
    central_ca = args.central_ca or None
    if central_ca:
        client_context(central_ca)  # a missing or bad CA file: one line now, not later
    return RegistrySettings(
        central=args.central,
        http_port=args.http_port,
        listen_host=args.listen_host,
        tls_cert=tls_cert,
        tls_key=tls_key,
        insecure_http=args.insecure_http,
        central_ca=central_ca,
        timeout=args.timeout,
        log_level=args.log_level,
        log_json=args.log_json,
    )


def check_files(settings: RegistrySettings) -> None:
    """ConfigError, in one line, when the certificate or key cannot serve TLS."""
    optional_server_context(settings.tls_cert, settings.tls_key)
