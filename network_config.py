"""Where every part of the network lives: the PCs' addresses and every port, in one place.

Each value can be overridden by an environment variable of the same name (for example
`PC2_IP=192.168.1.20`). `python network_config.py` prints the settings; with `--env FILE` it
writes them as a .env file for the Docker Compose files; `--ports pc2` prints the TCP ports
that PC serves to the others (what its firewall must let in); `--three-pcs` refuses settings
the three-PC deployment cannot run on; `--audit-key FILE` creates the audit key the two
Centrals share, unless FILE exists; `--kafka-passwords DIR` creates the Kafka logins' passwords
that are missing in DIR (secure by default: docs/security.md, "The deployment").

Standard library only: it runs on any PC with Python 3.11, without the project installed.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Mapping

DEFAULTS: dict[str, str] = {
    # PC1: driver dashboard, the standby Central. PC2: Kafka UI, the active Central. PC3:
    # charging points. Each PC runs one node of the three-node Kafka cluster.
    "PC1_IP": "127.0.0.1",
    "PC2_IP": "127.0.0.1",
    "PC3_IP": "127.0.0.1",
    "KAFKA_PORT": "9092",
    "KAFKA_UI_PORT": "8080",
    "CENTRAL_PORT": "5000",
    "CENTRAL_HTTP_PORT": "8002",
    "DRIVER_HTTP_PORT": "8001",
    "MONITOR_HTTP_PORT": "8003",
    # EV_Registry's REST API (HTTPS) on PC2 (docs/registry.md).
    "REGISTRY_PORT": "8004",
    # CP n of PC3 (1-based) has its engine listen on ENGINE_BASE_PORT + n - 1.
    "ENGINE_BASE_PORT": "6101",
    # Kafka's listeners inside the one-host Docker network (docker-compose.yml): containers
    # there use kafka:KAFKA_INTERNAL_PORT. The controller quorum uses its own port: on three
    # PCs each node's controllers talk to the others' on PCn_IP:KAFKA_CONTROLLER_PORT.
    "KAFKA_INTERNAL_PORT": "29092",
    "KAFKA_CONTROLLER_PORT": "29093",
    # The brokers clients bootstrap from, HOST:PORT,...; empty: the three PCs' nodes,
    # PC1_IP:KAFKA_PORT,PC2_IP:KAFKA_PORT,PC3_IP:KAFKA_PORT (each node advertises its own).
    "KAFKA_BROKERS": "",
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
    # 1 (the default): TLS on :5000, the dashboards and Kafka, and Kafka's logins and ACLs
    # (docs/security.md, "The deployment"); the deploy scripts make the certificates and
    # passwords on the first `up`. 0 turns all of it off, on purpose: a trusted test bench only.
    "SECURE": "1",
    # TLS (docs/tls.md), off while empty: paths INSIDE the containers of the certificates (the
    # compose files' one-shot `keys` service copies ./certs into the volume mounted at /keys).
    # Central's pair turns on TLS for :5000 and the admin web; the monitors then verify
    # Central with CENTRAL_TLS_CA. Each dashboard has its own pair. Unset, they are the paths
    # below with SECURE=1 and empty with SECURE=0.
    "CENTRAL_TLS_CERT": "",
    "CENTRAL_TLS_KEY": "",
    "CENTRAL_TLS_CA": "",
    "DRIVER_TLS_CERT": "",
    "DRIVER_TLS_KEY": "",
    "SITE_TLS_CERT": "",
    "SITE_TLS_KEY": "",
}

# Settings that may stay empty (TLS off); every other one needs a value (KAFKA_BROKERS gets
# one from the addresses when empty).
OPTIONAL = frozenset(key for key in DEFAULTS if "_TLS_" in key)
# Where the certificates are in the containers when SECURE=1 (scripts/make-certs.py's names).
SECURE_TLS = {
    "CENTRAL_TLS_CERT": "/keys/central.crt",
    "CENTRAL_TLS_KEY": "/keys/central.key",
    "CENTRAL_TLS_CA": "/keys/ca.crt",
    "DRIVER_TLS_CERT": "/keys/driver-dashboard.crt",
    "DRIVER_TLS_KEY": "/keys/driver-dashboard.key",
    "SITE_TLS_CERT": "/keys/site-dashboard.crt",
    "SITE_TLS_KEY": "/keys/site-dashboard.key",
}
# The shared Kafka logins (EV_Central/kafka_cli.py's SHARED_ROLES) and the broker's own
# super user; each CP's engine has one more, cp-ID.
KAFKA_LOGINS = ("admin", "central", "monitor", "driver", "site", "kafka-ui")
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

# What each PC serves to the others: its firewall opens these, preflight checks them. Every
# PC runs a Kafka node (clients and the other nodes dial KAFKA_PORT, the other controllers
# KAFKA_CONTROLLER_PORT); PC2 the active Central and PC1 its standby.
KAFKA_NODE_PORTS = ("KAFKA_PORT", "KAFKA_CONTROLLER_PORT")
CENTRAL_PORTS = ("CENTRAL_PORT", "CENTRAL_HTTP_PORT")
PC_PORTS: dict[str, tuple[str, ...]] = {
    "pc1": ("DRIVER_HTTP_PORT", *CENTRAL_PORTS, *KAFKA_NODE_PORTS),
    "pc2": (
        "KAFKA_PORT",
        "KAFKA_UI_PORT",
        *CENTRAL_PORTS,
        "KAFKA_CONTROLLER_PORT",
        "REGISTRY_PORT",
    ),
    "pc3": ("MONITOR_HTTP_PORT", *KAFKA_NODE_PORTS),
}
PCS = tuple(PC_PORTS)
# The Kafka node id of each PC's node (docker-compose.pcN.yml), and the Centrals in the order
# monitors try them: the active one's PC first, then the standby's.
KAFKA_NODE_IDS = {"pc1": 1, "pc2": 2, "pc3": 3}
CENTRAL_PCS = ("pc2", "pc1")

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


def check_host_list(key: str, value: str) -> str:
    """HOST:PORT,HOST:PORT,... (at least one; spaces around the commas dropped)."""
    entries = [part.strip() for part in value.split(",") if part.strip()]
    if not entries:
        raise ValueError(f"{key} is empty: give HOST:PORT,HOST:PORT,...")
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if not sep:
            raise ValueError(f"{key}: {entry!r} is not HOST:PORT")
        check_host(key, host)
        check_port(key, port)
    return ",".join(entries)


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
    if config["SECURE"] not in ("0", "1"):
        raise ValueError(
            f"SECURE={config['SECURE']!r}: 1 turns TLS and Kafka's logins on, 0 off (on purpose)"
        )
    secure = config["SECURE"] == "1"
    for key, path in SECURE_TLS.items():
        if key not in env and secure:
            config[key] = path
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
    # The three-PC deployment: a Kafka node on every PC, Centrals on PC2 and PC1.
    nodes = {pc: config[f"{pc.upper()}_IP"] for pc in KAFKA_NODE_IDS}
    nodes_list = ",".join(f"{ip}:{config['KAFKA_PORT']}" for ip in nodes.values())
    config["KAFKA_BROKERS"] = check_host_list(
        "KAFKA_BROKERS", config["KAFKA_BROKERS"] or nodes_list
    )
    config["KAFKA_VOTERS"] = ",".join(
        f"{KAFKA_NODE_IDS[pc]}@{ip}:{config['KAFKA_CONTROLLER_PORT']}" for pc, ip in nodes.items()
    )
    config["CENTRAL_ADDRESSES"] = ",".join(
        f"{config[f'{pc.upper()}_IP']}:{config['CENTRAL_PORT']}" for pc in CENTRAL_PCS
    )
    # Kafka secured or not: the compose files read these (an empty KAFKA_SECURE leaves every
    # service's Kafka login empty: `${KAFKA_SECURE:+...}`).
    config["KAFKA_SECURE"] = "1" if secure else ""
    config["KAFKA_CLIENT_PROTOCOL"] = "SASL_SSL" if secure else "PLAINTEXT"
    config["KAFKA_CONTROLLER_PROTOCOL"] = "SSL" if secure else "PLAINTEXT"
    config["KAFKA_AUTHORIZER"] = (
        "org.apache.kafka.metadata.authorizer.StandardAuthorizer" if secure else ""
    )
    # Each service's Kafka login, empty (plain) with SECURE=0; its password file is
    # /keys/kafka-LOGIN.password (docker/install-keys.sh). Plain variables, not
    # `${KAFKA_SECURE:+...}`: docker-compose 1.x does not know that form.
    config["KAFKA_CA"] = "/keys/ca.crt" if secure else ""
    for name in ("central", "monitor", "driver", "site"):
        config[f"KAFKA_USER_{name.upper()}"] = name if secure else ""
    for n, cp in enumerate(ids, start=1):
        config[f"CP{n}_KAFKA_USER"] = f"cp-{cp}" if secure else ""
    return config


def kafka_logins(config: Mapping[str, str]) -> list[str]:
    """Every Kafka login of the deployment: the shared ones and each of PC3's engines'."""
    return [*KAFKA_LOGINS, *(f"cp-{cp}" for cp in config["PC3_CPS"].split(","))]


def pc_files(config: Mapping[str, str], pc: str) -> list[str]:
    """The certificates and secrets PC `pc` needs, relative to the repository; PC2's deploy
    makes them all (PC2 keeps the CA's key), and the operator copies these to PC1 and PC3."""
    secure = config["SECURE"] == "1"
    files = ["secrets/central.audit-key"] if pc in CENTRAL_PCS else []
    if not secure:
        return files
    files += ["certs/ca.crt", "certs/kafka.crt", "certs/kafka.key", "secrets/kafka-admin.password"]
    servers = {
        "pc1": ["central", "driver-dashboard"],
        "pc2": ["central", "registry"],
        "pc3": ["site-dashboard"],
    }[pc]
    # kafka-ui: the read-only login Kafka UI and scripts/preflight.py use, on every PC.
    logins = {
        "pc1": ["central", "driver", "kafka-ui"],
        "pc2": [name for name in kafka_logins(config) if name != "admin"],
        "pc3": [
            "monitor",
            "site",
            "kafka-ui",
            *(f"cp-{cp}" for cp in config["PC3_CPS"].split(",")),
        ],
    }[pc]
    files += [f"certs/{name}.{ext}" for name in servers for ext in ("crt", "key")]
    files += [f"secrets/kafka-{name}.password" for name in logins]
    return files


def ensure_kafka_passwords(directory: str, config: Mapping[str, str]) -> list[str]:
    """Create DIR/kafka-NAME.password (mode 0600) for each login that has none; the names of
    those created now. A password is URL-safe base64 (what kafka.sh's JAAS line accepts)."""
    os.makedirs(directory, exist_ok=True)
    created = []
    for name in kafka_logins(config):
        path = os.path.join(directory, f"kafka-{name}.password")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secrets.token_urlsafe(24) + "\n")
        created.append(name)
    return created


def three_pc_problem(config: Mapping[str, str]) -> str | None:
    """Why these settings cannot run the three-PC deployment (None when they can).

    Every PC's Kafka node is dialled by the others at its PCn_IP, on the same ports as the
    other nodes: each address must be reachable from elsewhere and belong to one PC only.
    """
    owners: dict[str, str] = {}
    for pc in PCS:
        key = f"{pc.upper()}_IP"
        address = config[key]
        if address.startswith("127.") or address == "localhost":
            return (
                f"{key} is {address}: the other PCs cannot reach that. Set PC1_IP, PC2_IP and "
                f"PC3_IP to the PCs' LAN addresses (edit network_config.py or export {key}=...)"
            )
        if not re.fullmatch(r"[0-9.]+", address):
            # The compose files map pc1..pc3 to these in the containers' /etc/hosts, which
            # takes addresses only (Kafka's Java programs need the reverse lookup).
            return f"{key} is {address}: give each PC's IPv4 address, not a host name"
        if address in owners:
            return (
                f"{key} and {owners[address]} are both {address}: each PC runs a Kafka node on "
                "the same ports, so each needs its own address"
            )
        owners[address] = key
    return None


def pc_ports(config: Mapping[str, str], pc: str) -> list[int]:
    """The TCP ports `pc` (pc1, pc2, pc3 or all) serves to the other PCs, each once."""
    pcs = PCS if pc == "all" else (pc,)
    keys = dict.fromkeys(key for name in pcs for key in PC_PORTS[name])
    return [int(config[key]) for key in keys]


def ensure_audit_key(path: str) -> bool:
    """Create the audit key both Centrals share (32 random bytes in hex, mode 0600) unless
    `path` exists already; True when it was created now."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(secrets.token_hex(32) + "\n")
    return True


def env_file(config: Mapping[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in config.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", metavar="FILE", help="write the settings as a .env file")
    parser.add_argument(
        "--three-pcs",
        action="store_true",
        help="refuse settings the three-PC deployment cannot run on (loopback or shared addresses)",
    )
    parser.add_argument(
        "--audit-key",
        metavar="FILE",
        help="create the audit key the two Centrals share in FILE unless it exists",
    )
    parser.add_argument(
        "--kafka-passwords",
        metavar="DIR",
        help="create the Kafka logins' passwords missing in DIR (kafka-NAME.password)",
    )
    parser.add_argument(
        "--needs",
        metavar="PC",
        choices=PCS,
        help="print the certificates and secrets PC needs (made on PC2), one per line",
    )
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
    problem = three_pc_problem(config) if args.three_pcs else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.audit_key:
        created = ensure_audit_key(args.audit_key)
        print(f"{'created' if created else 'kept'} {args.audit_key}")
    if args.kafka_passwords:
        made = ensure_kafka_passwords(args.kafka_passwords, config)
        print(f"created {', '.join(made)}" if made else "kept every Kafka password")
    if args.needs:
        print("\n".join(pc_files(config, args.needs)))
    elif args.ports:
        print(" ".join(str(port) for port in pc_ports(config, args.ports)))
    elif args.env:
        with open(args.env, "w", encoding="utf-8") as out:
            out.write(env_file(config))
        print(f"wrote {args.env}")
    elif not (args.audit_key or args.kafka_passwords):
        sys.stdout.write(env_file(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
