"""The engine's settings: one dataclass, built from flags that mirror EV_ variables."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shared.kafka_access import KafkaLogin
from shared.messages import MAX_SPEED
from shared.settings import (
    EnvArgumentParser,
    add_common_options,
    add_kafka_login_options,
    broker_address,
    host_port,
    positive_float,
    read_secret,
    seconds,
    take_kafka_login,
)


@dataclass(frozen=True)
class EngineSettings:
    broker: str
    listen: tuple[str, int]
    auto_plug: float | None = None
    auto_unplug: float | None = None
    tick: float = 1.0
    speed: float = 1.0  # simulated seconds per real second (energy only; timers stay real)
    health_timeout: float = 3.0
    secret: str | None = field(default=None, repr=False)  # the CP's secret: checks the monitor
    ledger: Path | None = None  # append what is metered here, a JSON line per event (audits)
    journal: Path | None = None  # what must survive a crash (the command line's default: on)
    log_level: str = "INFO"
    log_json: bool = False
    kafka: KafkaLogin | None = None  # a secured broker's login (docs/security.md)


def time_scale(value: str) -> float:
    """A positive time scale, at most MAX_SPEED (one simulated hour a second)."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0 < number <= MAX_SPEED:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"expected how many times faster than real time, a number above 0 and at most "
            f"{MAX_SPEED:g} (1: real time), got {value!r}"
        )
    return number


def file_path(value: str) -> Path:
    """A file's path (not empty)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a file path, got an empty string")
    return Path(value)


def build_parser(environ: Mapping[str, str] | None = None) -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="EV_CP_E",
        description="The charging point's engine: supplies energy, answers its monitor.",
        environ=environ,
    )
    parser.add_option(
        "--broker", required=True, type=broker_address, help="Kafka bootstrap HOST:PORT"
    )
    parser.add_option(
        "--listen", required=True, type=host_port, help="HOST:PORT the monitor connects to"
    )
    parser.add_option(
        "--auto-plug",
        type=positive_float,
        default=None,
        help="plug in S seconds after authorisation",
    )
    parser.add_option(
        "--auto-unplug", type=positive_float, default=None, help="unplug S seconds after plugging"
    )
    parser.add_option("--tick", type=seconds, default=1.0, help="telemetry period in seconds")
    parser.add_option(
        "--speed",
        type=time_scale,
        default=1.0,
        help="simulated time runs N times faster: each tick delivers N ticks' worth of energy "
        "(demos); telemetry, plug and unplug timers stay in real seconds",
    )
    parser.add_option(
        "--health-timeout",
        type=seconds,
        default=3.0,
        help="seconds without a health check before the monitor counts as lost",
    )
    parser.add_option(
        "--secret",
        default=None,
        env="EV_CP_SECRET",
        help="the CP's secret (as its monitor has it): only a monitor that proves it knows it "
        "may connect; without it any local connection can",
    )
    parser.add_option(
        "--secret-file",
        default=None,
        env="EV_CP_SECRET_FILE",
        help="a file holding the CP's secret (first line)",
    )
    parser.add_option(
        "--ledger",
        type=file_path,
        default=None,
        metavar="PATH",
        help="append to PATH a JSON line for each supply this engine accepts, each telemetry "
        "sample and each supply's end, written before Central is told (a record of what was "
        "metered, for an independent audit)",
    )
    parser.add_option(
        "--journal",
        type=file_path,
        default=None,
        metavar="PATH",
        help="keep the supply in hand and the events Kafka has not taken in PATH, so that a "
        "crash loses no metered energy: sent again at the next start (default: "
        "engine-PORT.journal in $XDG_STATE_HOME/ev-charging, else ~/.local/state/ev-charging; "
        "PORT from --listen)",
    )
    parser.add_option(
        "--no-journal",
        action="store_true",
        default=False,
        help="keep no journal: a crash loses what Kafka had not taken",
    )
    add_kafka_login_options(parser)
    add_common_options(parser)
    return parser


def default_journal(port: int, environ: Mapping[str, str]) -> Path:
    """Where an engine listening on PORT keeps its journal unless told (XDG's state home)."""
    state = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ev-charging" / f"engine-{port}.journal"


def appendable(path: Path) -> str | None:
    """Why PATH cannot be appended to (it is created if missing), or None when it can."""
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def writable_beside(path: Path) -> str | None:
    """Why a file cannot be written at PATH by a rename from beside it (its directory is made
    if missing), or None."""
    probe = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with probe.open("w", encoding="utf-8"):
            pass
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> EngineSettings:
    """Parse the command line; exits 2 on bad arguments, raises ConfigError on bad env."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if args.ledger is not None and (problem := appendable(args.ledger)) is not None:
        parser.error(f"argument --ledger: cannot append to {args.ledger}: {problem}")
    journal = None
    if not args.no_journal:
        journal = args.journal or default_journal(
            args.listen[1], os.environ if environ is None else environ
        )
        if (problem := writable_beside(journal)) is not None:
            parser.error(
                f"argument --journal: cannot write {journal}: {problem} "
                "(--no-journal runs without one)"
            )
    return EngineSettings(
        broker=args.broker,
        listen=args.listen,
        auto_plug=args.auto_plug,
        auto_unplug=args.auto_unplug,
        tick=args.tick,
        speed=args.speed,
        health_timeout=args.health_timeout,
        secret=read_secret(parser, args.secret, args.secret_file, required=False),
        ledger=args.ledger,
        journal=journal,
        log_level=args.log_level,
        log_json=args.log_json,
        kafka=take_kafka_login(args),
    )
