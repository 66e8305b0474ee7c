"""Where every part of the network lives: the PCs' addresses and every port, in one place.

Each value can be overridden by an environment variable of the same name (for example
`PC2_IP=192.168.1.20`). `python network_config.py` prints the settings; with `--env FILE` it
writes them as a .env file for the Docker Compose files; `--ports pc2` prints the TCP ports
that PC serves to the others (what its firewall must let in).

Standard library only: it runs on any PC with Python 3.11, without the project installed.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
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
    # CP n of PC3 (1-based) has its engine listen on ENGINE_BASE_PORT + n - 1.
    "ENGINE_BASE_PORT": "6101",
    # Kafka's listeners inside PC2's Docker network: containers there (Central, Kafka UI, the
    # topic set-up) use kafka:KAFKA_INTERNAL_PORT; the controller quorum uses its own port.
    "KAFKA_INTERNAL_PORT": "29092",
    "KAFKA_CONTROLLER_PORT": "29093",
    # KRaft cluster id (16 bytes, URL-safe base64): formats the broker's volume on first start.
    "KAFKA_CLUSTER_ID": "XR8MOpt-TC2KYeL0t8nQEw",
    # The charging points PC3 runs, one engine + monitor pair each (docker-compose.pc3.yml
    # has PC3_SLOTS pairs; a second site PC runs the same file with other ids).
    "PC3_CPS": "CP001,CP002,CP003",
    # 1: Central seeds a new database with the demo CPs and accounts (public passwords, demos
    # only); 0 for a real deployment (create accounts with `python -m EV_Central user add`).
    "DEMO": "1",
    # The engines' time scale (EV_CP_E --speed): 60 makes a 10 s demo supply 10 simulated
    # minutes, a ticket of kWh rather than Wh; the dashboards mark such CPs. Empty: 60 with
    # the demo data (DEMO=1), real time (1) without it.
    "CP_SPEED": "",
    # TLS (docs/tls.md), off while empty: paths INSIDE the containers of the certificates the
    # operator mounts (e.g. /certs/central.crt). Central's pair turns on TLS for :5000 and the
    # admin web; the monitors then verify Central with CENTRAL_TLS_CA. Each dashboard has its
    # own pair.
    "CENTRAL_TLS_CERT": "",
    "CENTRAL_TLS_KEY": "",
    "CENTRAL_TLS_CA": "",
    "DRIVER_TLS_CERT": "",
    "DRIVER_TLS_KEY": "",
    "SITE_TLS_CERT": "",
    "SITE_TLS_KEY": "",
}

# Settings that may stay empty (TLS off); every other one needs a value.
OPTIONAL = frozenset(key for key in DEFAULTS if "_TLS_" in key)
# A certificate and its key: both set or both empty.
TLS_PAIRS = (
    ("CENTRAL_TLS_CERT", "CENTRAL_TLS_KEY"),
    ("DRIVER_TLS_CERT", "DRIVER_TLS_KEY"),
    ("SITE_TLS_CERT", "SITE_TLS_KEY"),
)

PC3_SLOTS = 3

# CP_SPEED when left empty on a demo deployment, and the highest accepted (as EV_CP_E's).
DEMO_SPEED = "60"
MAX_SPEED = 3600.0

# What each PC serves to the others: its firewall opens these, preflight checks them.
PC_PORTS: dict[str, tuple[str, ...]] = {
    "pc1": ("DRIVER_HTTP_PORT",),
    "pc2": ("KAFKA_PORT", "KAFKA_UI_PORT", "CENTRAL_PORT", "CENTRAL_HTTP_PORT"),
    "pc3": ("MONITOR_HTTP_PORT",),
}
PCS = tuple(PC_PORTS)

_CP_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_CLUSTER_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


def check_host(key: str, value: str) -> str:
    """An IPv4 address or a DNS host name that other machines can dial."""
    if re.fullmatch(r"[0-9.]+", value):
        try:
            address = ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a valid IPv4 address") from None
        if address.is_unspecified or address.is_multicast:
            raise ValueError(f"{key}={value!r} is not an address other machines can reach")
        return value
    labels = value.split(".")
    if not value or len(value) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(f"{key}={value!r} is not an IPv4 address or a host name")
    return value


def check_container_path(key: str, value: str) -> str:
    """Empty, or an absolute path inside a (Linux) container."""
    if value and (not value.startswith("/") or re.search(r"[\s\"'$\\]", value)):
        raise ValueError(
            f"{key}={value!r} is not a path inside the container (e.g. /certs/central.crt; "
            "no spaces, quotes, '$' or '\\')"
        )
    return value


def check_port(key: str, value: str) -> int:
    if not (value.isdigit() and 0 < int(value) < 65536):
        raise ValueError(f"{key}={value!r} is not a port number (1-65535)")
    return int(value)


def cp_ids(value: str) -> list[str]:
    """The CP ids of PC3_CPS: comma-separated, distinct, exactly PC3_SLOTS of them."""
    ids = [part.strip() for part in value.split(",") if part.strip()]
    bad = [cp for cp in ids if not _CP_ID.match(cp)]
    if bad:
        raise ValueError(f"PC3_CPS: {bad[0]!r} is not a CP id (letters, digits, '_', '.', '-')")
    if len(set(ids)) != len(ids):
        raise ValueError(f"PC3_CPS={value!r} names a CP twice")
    if len(ids) != PC3_SLOTS:
        raise ValueError(
            f"PC3_CPS={value!r} names {len(ids)} CPs; docker-compose.pc3.yml runs exactly "
            f"{PC3_SLOTS} (run a second site with other ids for more)"
        )
    return ids


def cp_speed(value: str, demo: str) -> str:
    """The engines' time scale: a number above 0 and at most MAX_SPEED; empty picks it from
    DEMO (a demo runs fast, a real deployment in real time)."""
    if not value:
        return DEMO_SPEED if demo == "1" else "1"
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number <= MAX_SPEED:  # NaN fails too
        raise ValueError(
            f"CP_SPEED={value!r} is not a time scale (a number above 0, at most {MAX_SPEED:g})"
        )
    return value


def load(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings: defaults overridden by the environment, validated, plus derived values.

    Raises ValueError with a one-line message for a bad address, port or CP list.
    """
    env = os.environ if environ is None else environ
    config = {key: env.get(key, value).strip() for key, value in DEFAULTS.items()}
    for key in ("PC1_IP", "PC2_IP", "PC3_IP"):
        check_host(key, config[key])
    ports = {key: check_port(key, value) for key, value in config.items() if key.endswith("_PORT")}
    if not _CLUSTER_ID.match(config["KAFKA_CLUSTER_ID"]):
        raise ValueError(
            f"KAFKA_CLUSTER_ID={config['KAFKA_CLUSTER_ID']!r} is not a 22-character "
            "URL-safe base64 id"
        )
    for key in OPTIONAL:
        check_container_path(key, config[key])
    for cert, key in TLS_PAIRS:
        if bool(config[cert]) != bool(config[key]):
            given, missing = (cert, key) if config[cert] else (key, cert)
            raise ValueError(f"{given} is set but {missing} is not: TLS needs both, or neither")
    if config["DEMO"] not in ("0", "1"):
        raise ValueError(f"DEMO={config['DEMO']!r}: 1 seeds the demo data, 0 does not")
    config["CP_SPEED"] = cp_speed(config["CP_SPEED"], config["DEMO"])
    ids = cp_ids(config["PC3_CPS"])
    config["PC3_CPS"] = ",".join(ids)
    for n, cp in enumerate(ids, start=1):
        engine_port = ports["ENGINE_BASE_PORT"] + n - 1
        check_port(f"CP{n}_ENGINE_PORT", str(engine_port))
        config[f"CP{n}_ID"] = cp
        config[f"CP{n}_ENGINE_PORT"] = str(engine_port)
        # The secret its monitor presents to Central: the one an admin got when registering
        # the CP (`ctl register`); the demo seed's only when none is given.
        config[f"CP{n}_SECRET"] = env.get(f"CP{n}_SECRET", "").strip() or f"demo-secret-{cp}"
        ports[f"CP{n}_ENGINE_PORT"] = engine_port
    del ports["ENGINE_BASE_PORT"]  # a base, not a port anything listens on by itself
    # docker-compose.yml publishes every port on one host: no two parts may share one.
    seen: dict[int, str] = {}
    for key, port in ports.items():
        if port in seen:
            raise ValueError(f"{key} and {seen[port]} are both {port}: give each its own port")
        seen[port] = key
    config["KAFKA_BOOTSTRAP"] = f"{config['PC2_IP']}:{config['KAFKA_PORT']}"
    config["CENTRAL_ADDRESS"] = f"{config['PC2_IP']}:{config['CENTRAL_PORT']}"
    return config


def pc_ports(config: Mapping[str, str], pc: str) -> list[int]:
    """The TCP ports `pc` (pc1, pc2, pc3 or all) serves to the other PCs."""
    pcs = PCS if pc == "all" else (pc,)
    return [int(config[key]) for name in pcs for key in PC_PORTS[name]]


def env_file(config: Mapping[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in config.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", metavar="FILE", help="write the settings as a .env file")
    parser.add_argument(
        "--ports",
        metavar="PC",
        choices=[*PCS, "all"],
        help="print the TCP ports this PC serves (pc1, pc2, pc3 or all), space-separated",
    )
    args = parser.parse_args(argv)
    try:
        config = load()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.ports:
        print(" ".join(str(port) for port in pc_ports(config, args.ports)))
    elif args.env:
        with open(args.env, "w", encoding="utf-8") as out:
            out.write(env_file(config))
        print(f"wrote {args.env}")
    else:
        sys.stdout.write(env_file(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
