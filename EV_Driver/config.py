"""The driver app's settings: one dataclass, built from flags that mirror EV_ variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from EV_Driver.requests_file import (
    MAX_BYTES,
    MAX_LINES,
    LineProblem,
    identifier_problem,
    load_requests,
)
from shared.errors import ConfigError
from shared.kafka_access import KafkaLogin
from shared.settings import (
    EnvArgumentParser,
    add_common_options,
    add_kafka_login_options,
    broker_address,
    positive_float,
    seconds,
    take_kafka_login,
)


class ExitCode(IntEnum):
    """How a run of the driver app ended, for scripts (listed in --help and the README)."""

    OK = 0  # every request ended with a ticket; `login`: logged in
    FAILED = 1  # no answer from Central in time, login failed, unknown driver, unexpected error
    USAGE = 2  # bad arguments or an unusable requests file (argparse's own code)
    DENIED = 3  # Central denied a request (with --file: at least one, and none failed)
    STOPPED = 4  # stopped (Ctrl-C, SIGTERM) before every request had its outcome


DESCRIPTION = """\
The driver app: asks Central for a supply at one CP (--cp) or at each CP of a
file (--file), shows the progress and the ticket. `EV_Driver dashboard --help`
describes the browser dashboard (:8001)."""

EPILOG = """\
exit codes:
  0  every request ended with a ticket (whatever ended the supply: the ticket
     says why); `login`: logged in
  1  a request got no answer from Central in time, the login failed (refused or
     unanswered), the driver is unknown, or an unexpected error
  2  bad arguments, or a requests file that cannot be used
  3  Central denied a request
  4  stopped (Ctrl-C, SIGTERM) before every request had its outcome, e.g. while
     Central cannot be reached; a supply already started goes on without the app
With --file: 1 if any request failed, else 4 if the app was stopped before the
last outcome, else 3 if any request was denied, else 0."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, and the description and exit codes laid out as written."""


@dataclass(frozen=True)
class DriverSettings:
    broker: str
    driver_id: str
    cp_ids: tuple[str, ...]
    source: str  # "--cp" or the path of the requests file
    json: bool = False
    pause: float = 4.0
    reply_timeout: float = 10.0
    log_level: str = "INFO"
    log_json: bool = False
    file_problems: tuple[LineProblem, ...] = ()
    password: str | None = field(default=None, repr=False)
    token_file: str | None = None
    login_key_file: Path | None = None  # the app's login key (None: a new one each run)
    central_key: str | None = None
    login_only: bool = False  # `python -m EV_Driver login`: log in, save the token, stop
    kafka: KafkaLogin | None = None  # a secured broker's login (docs/security.md)


class _StoreGiven(argparse.Action):
    """Store the value and remember that it came from the command line, not the environment."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def identifier(value: str) -> str:
    problem = identifier_problem(value, "id")
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def build_parser(environ: Mapping[str, str] | None = None) -> EnvArgumentParser:
    """The command line; raises ConfigError when an EV_ variable is malformed."""
    parser = EnvArgumentParser(
        prog="EV_Driver",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
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
        "--driver-id",
        required=True,
        type=identifier,
        metavar="ID",
        help="the driver's id, as registered",
    )
    parser.add_option(
        "--cp",
        type=identifier,
        action=_StoreGiven,
        default=None,
        metavar="CP_ID",
        help="ask for a supply here",
    )
    parser.add_option(
        "--file",
        action=_StoreGiven,
        default=None,
        metavar="PATH",
        help="file of requests: one CP id a line, '#' comments; a regular UTF-8 file of "
        f"at most {MAX_BYTES // 1024} KiB and {MAX_LINES} lines",
    )
    parser.add_option("--json", action="store_true", help="print one JSON object a line")
    parser.add_option(
        "--pause",
        type=positive_float,
        default=4.0,
        metavar="S",
        help="seconds between requests of a file",
    )
    parser.add_option(
        "--reply-timeout",
        type=seconds,
        default=10.0,
        metavar="S",
        help="seconds to wait for Central before saying it cannot be reached",
    )
    parser.add_option(
        "--password-file",
        default=None,
        metavar="PATH",
        help="a file holding the driver's password (first line)",
    )
    parser.add_option(
        "--password",
        default=None,
        help="the driver's password (prefer --password-file or EV_PASSWORD; "
        "asked for when neither is given and a terminal is attached)",
    )
    parser.add_option(
        "--token-file",
        default=None,
        metavar="PATH",
        help="keep the login in this file (mode 0600) and reuse it until it expires",
    )
    parser.add_option(
        "--login-key-file",
        default=None,
        metavar="PATH",
        help="keep this app's login key in PATH (mode 0600), so that Central knows it from "
        "earlier logins when someone else guesses the password (default: driver-ID.key in "
        "$XDG_STATE_HOME/ev-charging, else ~/.local/state/ev-charging)",
    )
    parser.add_option(
        "--central-key",
        default=None,
        metavar="BASE64",
        help="Central's identity key, pinned (Central logs it at start-up); "
        "without it the key is asked from Central and its fingerprint shown",
    )
    add_kafka_login_options(parser)
    add_common_options(parser)
    return parser


def _password(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    if args.password and args.password_file:
        parser.error("give --password or --password-file, not both")
    if args.password_file:
        try:
            text = Path(args.password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"argument --password-file: cannot read {args.password_file}: {exc}")
        lines = text.splitlines()
        return lines[0] if lines else ""
    return str(args.password) if args.password else None


def _choose_target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, str]:
    """Pick --cp or --file: the command line wins over the environment; never both."""
    cp_cli = getattr(args, "cp_given", False)
    file_cli = getattr(args, "file_given", False)
    if cp_cli and file_cli:
        parser.error("--cp and --file are mutually exclusive")
    if cp_cli:
        return "cp", args.cp
    if file_cli:
        return "file", args.file
    if args.cp is not None and args.file is not None:
        parser.error("EV_CP and EV_FILE are both set; use one of them")
    if args.cp is not None:
        return "cp", args.cp
    if args.file is not None:
        return "file", args.file
    parser.error("one of --cp or --file is required")
    raise AssertionError("unreachable")  # parser.error exits


def default_login_key_file(driver_id: str, environ: Mapping[str, str]) -> Path:
    """Where the app keeps a driver's login key unless told: XDG's state home."""
    state = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ev-charging" / f"driver-{driver_id}.key"


def parse_settings(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    login_only: bool = False,
) -> DriverSettings:
    """Parse the command line and read the requests file.

    Exits 2 on bad flags; raises ConfigError for a bad EV_ variable or an unusable file.
    """
    parser = build_parser(environ)
    if login_only:
        parser.prog = "EV_Driver login"
    args = parser.parse_args(argv)
    kind, value = ("login", "") if login_only else _choose_target(parser, args)
    if kind == "login":
        cp_ids: tuple[str, ...] = ()
        source = "login"
        problems: tuple[LineProblem, ...] = ()
    elif kind == "cp":
        cp_ids = (value,)
        source = "--cp"
        problems = ()
    else:
        if not value:
            raise ConfigError("--file needs a path")
        requests = load_requests(value)
        cp_ids, source, problems = requests.cp_ids, value, requests.problems
    return DriverSettings(
        broker=args.broker,
        driver_id=args.driver_id,
        cp_ids=cp_ids,
        source=source,
        json=args.json,
        pause=args.pause,
        reply_timeout=args.reply_timeout,
        log_level=args.log_level,
        log_json=args.log_json,
        file_problems=problems,
        password=_password(parser, args),
        token_file=args.token_file,
        login_key_file=Path(args.login_key_file)
        if args.login_key_file
        else default_login_key_file(args.driver_id, os.environ if environ is None else environ),
        central_key=args.central_key,
        login_only=login_only,
        kafka=take_kafka_login(args),
    )
