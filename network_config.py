"""Where every part of the network lives: the PCs' addresses and every port, in one place.

Each value can be overridden by an environment variable of the same name (for example
`PC2_IP=192.168.1.20`). `python network_config.py` prints the settings; with `--env FILE` it
writes them as a .env file for the Docker Compose files.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

DEFAULTS: dict[str, str] = {
    # PC1: driver dashboard. PC2: Kafka, Kafka UI, Central. PC3: charging points.
    "PC1_IP": "127.0.0.1",
    "PC2_IP": "127.0.0.1",
    "PC3_IP": "127.0.0.1",
    "KAFKA_PORT": "9092",
    "KAFKA_UI_PORT": "8080",
    "CENTRAL_PORT": "5000",
    "CENTRAL_HTTP_PORT": "8002",
    "DRIVER_HTTP_PORT": "8001",
    "MONITOR_HTTP_PORT": "8003",
    "ENGINE_BASE_PORT": "6101",
}


def load(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings: defaults overridden by the environment."""
    env = os.environ if environ is None else environ
    config = {key: env.get(key, value) for key, value in DEFAULTS.items()}
    for key, value in config.items():
        if key.endswith("_PORT") and not (value.isdigit() and 0 < int(value) < 65536):
            raise ValueError(f"{key}={value!r} is not a port number")
    config["KAFKA_BOOTSTRAP"] = f"{config['PC2_IP']}:{config['KAFKA_PORT']}"
    config["CENTRAL_ADDRESS"] = f"{config['PC2_IP']}:{config['CENTRAL_PORT']}"
    return config


def env_file(config: Mapping[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in config.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", metavar="FILE", help="write the settings as a .env file")
    args = parser.parse_args(argv)
    try:
        config = load()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.env:
        with open(args.env, "w", encoding="utf-8") as out:
            out.write(env_file(config))
        print(f"wrote {args.env}")
    else:
        sys.stdout.write(env_file(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
