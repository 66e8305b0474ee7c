"""Command-line flags that mirror EV_ environment variables.

Each service builds one settings object from its parser; nothing else reads the environment.
A flag `--http-port` reads `EV_HTTP_PORT` when it is not given on the command line.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from shared.errors import ConfigError, EVError
from shared.kafka_access import KafkaLogin

IDENTIFIER = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def env_name(flag: str) -> str:
    return "EV_" + flag.lstrip("-").replace("-", "_").upper()


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose options default to their EV_ environment variable.

    Bad arguments give one line on stderr and exit code 2, not a usage dump.
    """

    def __init__(self, *args: Any, environ: Mapping[str, str] | None = None, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._environ = os.environ if environ is None else environ
        # Each option's environment variable, by destination (documentation and tests).
        self.env_names: dict[str, str] = {}

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_option(self, flag: str, *, env: str | None = None, **kwargs: Any) -> argparse.Action:
        """Add `flag`, defaulting to the environment variable named after it."""
        name = env or env_name(flag)
        if name in self._environ:
            raw = self._environ[name]
            if kwargs.get("action") in ("store_true", "store_false"):
                kwargs["default"] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                convert = kwargs.get("type", str)
                try:
                    kwargs["default"] = convert(raw)
                except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                    raise ConfigError(f"{name}={raw!r} is not valid: {exc}") from None
            kwargs["required"] = False
        help_text = kwargs.get("help", "")
        kwargs["help"] = f"{help_text} [env {name}]".strip()
        action = self.add_argument(flag, **kwargs)
        self.env_names[action.dest] = name
        return action


def host_port(value: str) -> tuple[str, int]:
    """Parse HOST:PORT (or [IPv6]:PORT) into a tuple."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def host_ports(value: str) -> tuple[tuple[str, int], ...]:
    """Parse HOST:PORT, or several separated by commas, into a tuple of (host, port)."""
    return tuple(host_port(item.strip()) for item in value.split(","))


def broker_address(value: str) -> str:
    """Kafka bootstrap servers: HOST:PORT, or several separated by commas (kept as given)."""
    for server in value.split(","):
        host_port(server.strip())
    return value.strip()


def port_number(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}")
    return int(value)


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def seconds(value: str) -> float:
    """A strictly positive number of seconds."""
    number = positive_float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return number


def identifier(value: str) -> str:
    """A CP or driver id: 1-32 letters, digits, '_', '.' or '-'."""
    if not IDENTIFIER.match(value):
        raise argparse.ArgumentTypeError(
            f"expected 1-32 letters, digits, '_', '.' or '-', got {value!r}"
        )
    return value


def is_loopback(host: str) -> bool:
    """True for a loopback address (or "localhost"): what only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def add_kafka_login_options(parser: EnvArgumentParser) -> None:
    """How a service logs in to a secured Kafka (docs/security.md, "Kafka"); plain without."""
    parser.add_option(
        "--kafka-user",
        default="",
        metavar="NAME",
        help="log in to Kafka as NAME over TLS (SCRAM-SHA-512); empty: plain, no login",
    )
    parser.add_option(
        "--kafka-password-file",
        default="",
        metavar="FILE",
        help="the Kafka login's password, on the first line of FILE",
    )
    parser.add_option(
        "--kafka-ca",
        default="",
        metavar="FILE",
        help="the CA certificate that signed the Kafka brokers' certificates",
    )


def take_kafka_login(args: argparse.Namespace) -> KafkaLogin | None:
    """The login the --kafka-* options give (None for a plain broker), taken out of `args`."""
    user, password_file, ca = args.kafka_user, args.kafka_password_file, args.kafka_ca
    del args.kafka_user, args.kafka_password_file, args.kafka_ca
    if not user:
        return None
    if not password_file or not ca:
        raise ConfigError("--kafka-user needs --kafka-password-file and --kafka-ca")
    try:
        return KafkaLogin.from_files(user, password_file, ca)
    except (OSError, EVError) as exc:
        raise ConfigError(f"cannot use the Kafka login: {exc}") from None


def add_common_options(parser: EnvArgumentParser) -> None:
    """Logging options every service has."""
    parser.add_option(
        "--log-level", type=log_level, default="INFO", metavar="LEVEL", help=", ".join(LOG_LEVELS)
    )
    parser.add_option("--log-json", action="store_true", help="log JSON lines (for containers)")


def read_secret(
    parser: argparse.ArgumentParser,
    secret: str | None,
    path: str | None,
    *,
    required: bool = True,
) -> str:
    """The CP's secret from --secret or --secret-file; exits 2 when there is none (and one is
    required; else "")."""
    if secret and path:
        parser.error("give --secret or --secret-file, not both")
    if path:
        try:
            secret = Path(path).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            parser.error(f"argument --secret-file: cannot read a secret from {path}: {exc}")
    if not secret and required:
        parser.error(
            "this CP's secret is required: --secret-file PATH (or --secret, EV_CP_SECRET); "
            "an admin gets it when registering the CP"
        )
    if secret is None:
        return ""
    if len(secret) > 256:
        parser.error("the secret is longer than 256 characters")
    return secret
