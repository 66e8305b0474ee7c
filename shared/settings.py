"""Command-line flags that mirror EV_ environment variables.

Each service builds one settings object from its parser; nothing else reads the environment.
A flag `--http-port` reads `EV_HTTP_PORT` when it is not given on the command line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from shared.errors import ConfigError


def env_name(flag: str) -> str:
    return "EV_" + flag.lstrip("-").replace("-", "_").upper()


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose options default to their EV_ environment variable."""

    def __init__(self, *args: Any, environ: Mapping[str, str] | None = None, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._environ = os.environ if environ is None else environ

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
        return self.add_argument(flag, **kwargs)


def host_port(value: str) -> tuple[str, int]:
    """Parse HOST:PORT (or [IPv6]:PORT) into a tuple."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


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


def add_common_options(parser: EnvArgumentParser) -> None:
    """Logging options every service has."""
    parser.add_option("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_option("--log-json", action="store_true", help="log JSON lines (for containers)")
