"""EV_W's settings: one dataclass, built from flags that mirror EV_ variables."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from EV_W.providers import OPENWEATHER_URL
from shared.settings import (
    EnvArgumentParser,
    add_common_options,
    host_ports,
    identifier,
    seconds,
)
from shared.tls import client_context

DEFAULT_FILE = "data/weather.json"
PROVIDERS = ("file", "openweather")
MAX_SECRET_FILE = 4096


@dataclass(frozen=True)
class WeatherSettings:
    central: tuple[tuple[str, int], ...]  # Central's admin web; several are tried in turn
    password: str = field(repr=False)
    user: str = "weather"
    provider: str = "file"
    file: Path = Path(DEFAULT_FILE)
    api_key: str = field(default="", repr=False)
    openweather_url: str = OPENWEATHER_URL
    country: str = "ES"
    interval: float = 4.0
    timeout: float = 3.0
    tls_ca: str | None = None
    log_level: str = "INFO"
    log_json: bool = False


def add_file_option(parser: EnvArgumentParser) -> None:
    """--file, which the service and `set` share."""
    parser.add_option(
        "--file",
        env="EV_WEATHER_FILE",
        type=Path,
        default=Path(DEFAULT_FILE),
        metavar="PATH",
        help="the file provider's JSON file of place: °C",
    )


def build_parser(environ: Mapping[str, str] | None = None) -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="EV_W",
        description="The weather service: every few seconds the temperature of each place "
        "with registered CPs; below 0 °C it asks Central to stop them, above to resume them. "
        "`python -m EV_W set PLACE TEMP` sets a place's temperature for the file provider.",
        environ=environ,
    )
    parser.add_option(
        "--central",
        type=host_ports,
        default=host_ports("127.0.0.1:8002"),
        help="Central's admin HOST:HTTP_PORT, or several separated by commas (tried in turn)",
    )
    parser.add_option(
        "--user",
        env="EV_WEATHER_USER",
        type=identifier,
        default="weather",
        help="the weather service's account at Central (role weather)",
    )
    parser.add_option(
        "--password-file",
        env="EV_WEATHER_PASSWORD_FILE",
        default=None,
        metavar="PATH",
        help="file whose first line is the account's password",
    )
    parser.add_option(
        "--password",
        env="EV_WEATHER_PASSWORD",
        default=None,
        help="the account's password (prefer --password-file)",
    )
    parser.add_option(
        "--provider", choices=PROVIDERS, default="file", help="where temperatures come from"
    )
    add_file_option(parser)
    parser.add_option(
        "--api-key-file",
        env="EV_OPENWEATHER_API_KEY_FILE",
        default=None,
        metavar="PATH",
        help="file whose first line is the OpenWeather API key",
    )
    parser.add_option(
        "--api-key",
        env="EV_OPENWEATHER_API_KEY",
        default=None,
        help="the OpenWeather API key (prefer --api-key-file)",
    )
    parser.add_option(
        "--openweather-url",
        default=OPENWEATHER_URL,
        metavar="URL",
        help="base URL of OpenWeather's API (a local server in tests)",
    )
    parser.add_option(
        "--country",
        default="ES",
        help="ISO country code added to each place in OpenWeather queries ('' for none)",
    )
    parser.add_option(
        "--interval", type=seconds, default=4.0, help="seconds between rounds of readings"
    )
    parser.add_option(
        "--timeout", type=seconds, default=3.0, help="seconds a provider has to answer"
    )
    parser.add_option(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="CA certificate of Central's admin web: connect with TLS and verify it",
    )
    add_common_options(parser)
    return parser


def first_line(parser: argparse.ArgumentParser, flag: str, path: str) -> str:
    """The first line of a secret file; exits 2 when it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(MAX_SECRET_FILE).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"argument {flag}: cannot read {path}: {exc}")
    if not lines or not lines[0].strip():
        parser.error(f"argument {flag}: {path} is empty")
    return lines[0].strip()


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> WeatherSettings:
    """Parse the command line; exits 2 on bad arguments, raises ConfigError on bad env."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if args.password_file:
        password = first_line(parser, "--password-file", args.password_file)
    elif args.password:
        password = args.password
    else:
        parser.error(
            "the weather account's password is required: --password-file PATH "
            "(or EV_WEATHER_PASSWORD)"
        )
    api_key = ""
    if args.provider == "openweather":
        if args.api_key_file:
            api_key = first_line(parser, "--api-key-file", args.api_key_file)
        elif args.api_key:
            api_key = args.api_key.strip()
        else:
            parser.error(
                "--provider openweather needs an API key: --api-key-file PATH "
                "(or EV_OPENWEATHER_API_KEY)"
            )
        if not args.openweather_url.startswith(("http://", "https://")):
            parser.error("argument --openweather-url: expected an http:// or https:// URL")
    tls_ca = args.tls_ca or None
    if tls_ca:
        client_context(tls_ca)  # a missing or bad CA file: exit 2 now, in one line
    return WeatherSettings(
        central=args.central,
        password=password,
        user=args.user,
        provider=args.provider,
        file=args.file,
        api_key=api_key,
        openweather_url=args.openweather_url,
        country=args.country.strip(),
        interval=args.interval,
        timeout=args.timeout,
        tls_ca=tls_ca,
        log_level=args.log_level,
        log_json=args.log_json,
    )
