"""The Docker deployment, checked without a Docker engine (none runs on our machines).

Every compose file is parsed and held against network_config.py (every address and port),
the services' real argument parsers (the settings each container gets are accepted, and mean
what the file says), shared/bus.py's topics, the Kafka version of development and the
Dockerfile's targets (health check, non-root user). Then a real Compose implementation
(`docker compose` or Debian's `docker-compose`) validates each file with a generated .env.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

import network_config
from EV_Central import config as central_config
from EV_CP_E import config as engine_config
from EV_CP_M import config as monitor_config
from EV_CP_M import dashboard as site_config
from EV_Driver import dashboard_config as driver_config
from EV_Registry import config as registry_config
from EV_W import config as weather_config
from helpers import missing_tool, scaled
from shared.bus import HA_TOPICS, TOPICS
from shared.settings import env_name

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
COMPOSE_FILES = {
    "pc1": REPO_ROOT / "docker-compose.pc1.yml",
    "pc2": REPO_ROOT / "docker-compose.pc2.yml",
    "pc3": REPO_ROOT / "docker-compose.pc3.yml",
    "all": REPO_ROOT / "docker-compose.yml",
}
CONFIG = network_config.load({})
VARIABLE = re.compile(r"\$\{([^}]*)\}")
ONE_SHOT = {"keys", "kafka-format", "kafka-init", "kafka-access"}
# A secret the deploy scripts pass in their environment rather than write into .env (Kafka UI
# takes its password only inside its configuration); empty when compose runs without them.
FROM_DEPLOY_ENVIRONMENT = {"KAFKA_UI_PASSWORD:-"}
INTERNAL_BROKER = "kafka:${KAFKA_INTERNAL_PORT}"
# The three-PC files: a Kafka node on every PC, two Centrals (PC2's and its standby on PC1).
PC_FILES = ("pc1", "pc2", "pc3")
CENTRAL_PCS = ("pc1", "pc2")

# Which host port variable each service publishes (the firewall and preflight use the same).
PUBLISHED = {
    "kafka": {"KAFKA_PORT"},
    "kafka-ui": {"KAFKA_UI_PORT"},
    "central": {"CENTRAL_PORT", "CENTRAL_HTTP_PORT"},
    "driver-dashboard": {"DRIVER_HTTP_PORT"},
    "site-dashboard": {"MONITOR_HTTP_PORT"},
    "registry": {"REGISTRY_PORT"},
}


def published_by(name: str, svc_name: str) -> set[str]:
    """The port variables `svc_name` of compose file `name` publishes: on three PCs each Kafka
    node's controller is dialled by the other nodes too."""
    if name in PC_FILES and svc_name == "kafka":
        return {"KAFKA_PORT", "KAFKA_CONTROLLER_PORT"}
    return PUBLISHED.get(svc_name, set())


# Dockerfile target -> the module it runs and the settings parser of that command line.
Parse = Callable[[Mapping[str, str]], Any]


def _parse_central(environ: Mapping[str, str]) -> Any:
    with pytest.MonkeyPatch.context() as patch:  # Central's parser reads os.environ
        for key in [k for k in os.environ if k.startswith("EV_")]:
            patch.delenv(key)
        for key, value in environ.items():
            patch.setenv(key, value)
        return central_config.parse([])


def _target(
    argv: list[str], config: Any, **extra: str
) -> tuple[list[str], Parse, Callable[[], Any]]:
    """A target whose config module has parse_settings(argv, environ=) and build_parser(environ);
    `extra` stands in for what only the deployment has."""
    return (
        argv,
        lambda env: config.parse_settings([], environ={**env, **extra}),
        lambda: config.build_parser({}),
    )


TARGETS: dict[str, tuple[list[str], Parse, Callable[[], Any]]] = {
    "central": (["EV_Central"], _parse_central, central_config.build_parser),
    "engine": _target(["EV_CP_E"], engine_config),
    "monitor": _target(["EV_CP_M"], monitor_config),
    "site": _target(["EV_CP_M", "dashboard"], site_config),
    "driver": _target(["EV_Driver", "dashboard"], driver_config),
    "registry": _target(["EV_Registry"], registry_config),
    # The weather account's password file is the deployment's (secrets/): a stand-in here.
    "weather": _target(
        ["EV_W"], weather_config, EV_WEATHER_PASSWORD_FILE="", EV_WEATHER_PASSWORD="x"
    ),
}


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the compose files' keys service puts in /keys, made by the deploy scripts' tools
    (scripts/make-certs.py, network_config.py --kafka-passwords) at CONFIG's addresses."""
    keys = tmp_path_factory.mktemp("keys")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PC")}
    for args in (
        [str(REPO_ROOT / "scripts" / "make-certs.py"), "--out", str(keys)],
        [str(REPO_ROOT / "network_config.py"), "--kafka-passwords", str(keys)],
    ):
        subprocess.run([sys.executable, *args], check=True, capture_output=True, env=env)
    return keys


def load_compose(name: str) -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILES[name].read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), name
    return data


def services(name: str) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = load_compose(name)["services"]
    return result


def substitute(value: Any, config: Mapping[str, str] = CONFIG) -> str:
    """Compose's interpolation of ${VAR} ($$ is a literal $), from network_config's values."""
    text = str(value)
    parts = text.split("$$")
    return "$".join(
        VARIABLE.sub(lambda m: config.get(m.group(1).removesuffix(":-"), ""), part)
        for part in parts
    )


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def every_file_and_service() -> list[tuple[str, str]]:
    return [(name, svc) for name in COMPOSE_FILES for svc in services(name)]


# --- the Dockerfile -----------------------------------------------------------------------------


class Stage:
    def __init__(self, name: str, base: str) -> None:
        self.name = name
        self.base = base
        self.instructions: list[tuple[str, str]] = []

    def last(self, keyword: str) -> str | None:
        found = [arg for key, arg in self.instructions if key == keyword]
        return found[-1] if found else None

    def all(self, keyword: str) -> list[str]:
        return [arg for key, arg in self.instructions if key == keyword]


def dockerfile_stages() -> dict[str, Stage]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, argument = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", argument.strip(), re.IGNORECASE)
            assert match, f"every stage is named: {line}"
            current = stages[match.group(2)] = Stage(match.group(2), match.group(1))
        elif current is not None:
            current.instructions.append((keyword, argument.strip()))
    return stages


def lineage(stages: Mapping[str, Stage], target: str) -> list[Stage]:
    """The target's stage and the stages it is built FROM, nearest first."""
    chain = [stages[target]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def effective(stages: Mapping[str, Stage], target: str, keyword: str) -> str | None:
    for stage in lineage(stages, target):
        value = stage.last(keyword)
        if value is not None:
            return value
    return None


def build_target(service: Mapping[str, Any]) -> str | None:
    build = service.get("build")
    if build is None:
        return None
    assert build["dockerfile"] == "docker/Dockerfile" and build["context"] == ".", build
    target: str = build["target"]
    return target


# --- network_config: every address and port -------------------------------------------------------


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_variable_is_one_of_network_config(name: str) -> None:
    text = COMPOSE_FILES[name].read_text()
    used = set(VARIABLE.findall(text.replace("$$", ""))) - FROM_DEPLOY_ENVIRONMENT
    assert used, name
    # Plain ${VAR} only: a ${VAR:-default} would hide a missing .env behind a silent default.
    assert all(re.fullmatch(r"[A-Z0-9_]+", var) for var in used), used
    assert used <= set(CONFIG), used - set(CONFIG)
    # No bare $VAR either: compose would interpolate it too.
    assert not re.search(r"(?<!\$)\$(?![{$])", text.replace("$$", "")), name


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_published_ports_are_network_config_ports(name: str) -> None:
    published: set[str] = set()
    for svc_name, svc in services(name).items():
        wanted = published_by(name, svc_name)
        ports = svc.get("ports", [])
        got = set()
        for entry in ports:
            assert isinstance(entry, str), (svc_name, entry)
            host, container = entry.split(":")
            match = re.fullmatch(r"\$\{([A-Z_]+_PORT)\}", host)
            assert match, f"{svc_name}: host port {host!r} must be a network_config variable"
            got.add(match.group(1))
            if build_target(svc) is not None:
                # Our services listen on the same port inside: one variable, one port.
                assert container == host, (svc_name, entry)
        assert got == wanted, (name, svc_name, got)
        published |= got
    pcs = network_config.PCS if name == "all" else (name,)
    expected = {key for pc in pcs for key in network_config.PC_PORTS[pc]}
    if name == "all":
        expected.discard("KAFKA_CONTROLLER_PORT")  # one node: its quorum is itself
    assert published == expected, "what compose publishes is what the firewall script opens"


# --- health, restarts, dependencies ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "svc_name"), every_file_and_service())
def test_every_service_is_health_checked_and_restarts(name: str, svc_name: str) -> None:
    svc = services(name)[svc_name]
    if svc_name in ONE_SHOT:
        # Runs once per `up`; `unless-stopped` would rerun it forever.
        assert svc.get("restart") == "no"
        return
    assert svc.get("restart") == "unless-stopped", svc_name
    target = build_target(svc)
    if target is None:
        test = svc["healthcheck"]["test"]
        assert test and test[0] in ("CMD", "CMD-SHELL"), test
    else:
        assert "healthcheck" not in svc, "our images carry their own HEALTHCHECK"
        check = dockerfile_stages()[target].last("HEALTHCHECK")
        assert check, f"target {target} has no HEALTHCHECK"
        # The check probes the port the service listens on: the env var compose sets.
        for var in re.findall(r"\$\{(EV_[A-Z_]+)\}", check):
            assert var in environment(svc), f"{svc_name}: HEALTHCHECK reads unset {var}"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_dependency_has_a_condition(name: str) -> None:
    all_services = services(name)
    for svc_name, svc in all_services.items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{svc_name}: depends_on needs conditions"
        for other, spec in depends.items():
            assert other in all_services, (svc_name, other)
            condition = spec["condition"]
            if other in ONE_SHOT:
                assert condition == "service_completed_successfully", (svc_name, other)
            else:
                assert condition == "service_healthy", (svc_name, other)


def test_the_right_services_wait_for_each_other() -> None:
    pc2 = services("pc2")
    assert set(pc2["kafka-ui"]["depends_on"]) == {"kafka"}
    every = {"kafka", "kafka-init", "kafka-access", "keys"}
    assert set(services("all")["central"]["depends_on"]) == every
    for name in COMPOSE_FILES:
        svcs = services(name)
        # The keys first; the node formatted (with the admin's login) before its first start.
        assert "depends_on" not in svcs["keys"], name
        assert set(svcs["kafka-format"]["depends_on"]) == {"keys"}, name
        assert set(svcs["kafka"]["depends_on"]) == {"kafka-format"}, name
        assert set(svcs["kafka-init"]["depends_on"]) == {"kafka"}, name
        if "kafka-access" in svcs:  # the logins once the topics exist (PC2, one host)
            assert set(svcs["kafka-access"]["depends_on"]) == {"kafka-init"}, name
    assert "kafka-access" not in services("pc1") and "kafka-access" not in services("pc3")
    for name in PC_FILES:
        svcs = services(name)
        # Nothing of ours that reads Kafka starts before the topics exist with three copies:
        # every service creates the ones it misses, with one copy while a node is missing.
        for svc_name, svc in svcs.items():
            reads_kafka = "EV_BROKER" in environment(svc)
            if build_target(svc) and reads_kafka and not svc_name.startswith("monitor-"):
                waits = set(svc.get("depends_on", {}))
                assert waits & {"kafka-init", "kafka-access"}, (name, svc_name)
    for name in CENTRAL_PCS:
        central = services(name)["central"]
        wanted = {"kafka", "kafka-init", "keys"} | ({"kafka-access"} if name == "pc2" else set())
        assert set(central["depends_on"]) == wanted, name
    for n in range(1, network_config.PC3_SLOTS + 1):
        assert set(services("pc3")[f"monitor-cp{n}"]["depends_on"]) == {f"engine-cp{n}"}
        assert set(services("all")[f"monitor-cp{n}"]["depends_on"]) == {f"engine-cp{n}", "central"}


# --- the settings each container gets, through the real parsers -----------------------------------


@pytest.mark.parametrize(("name", "svc_name"), every_file_and_service())
def test_container_settings_are_accepted_by_the_service(
    name: str, svc_name: str, keys_dir: Path
) -> None:
    svc = services(name)[svc_name]
    target = build_target(svc)
    if target is None or svc_name in ONE_SHOT:  # kafka-access: a command of Central's image
        return
    module, parse, build_parser = TARGETS[target]
    entrypoint = dockerfile_stages()[target].last("ENTRYPOINT")
    assert entrypoint is not None
    assert json.loads(entrypoint) == ["python", "-m", *module]
    assert "command" not in svc, "configured by EV_ variables, like the HEALTHCHECK"
    env = {key: substitute(value) for key, value in environment(svc).items()}
    parser = build_parser()
    flags = {
        getattr(parser, "env_names", {}).get(action.dest, env_name(option))
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    unknown = set(env) - flags
    assert not unknown, f"{svc_name}: {sorted(unknown)} are no flags of {' '.join(module)}"
    assert env.get("EV_LOG_JSON") == "1"
    # Secure by default: the certificates and passwords the keys service puts in /keys,
    # here the same files made by the same tools in a directory of the test's.
    keys = {key: value.replace("/keys/", f"{keys_dir}/") for key, value in env.items()}
    for value in keys.values():
        if value.startswith(f"{keys_dir}/"):
            assert Path(value).is_file(), f"{svc_name}: {value} is not one of the keys made"
    try:
        settings = parse(keys)
    except SystemExit as exc:
        pytest.fail(f"{svc_name}: {' '.join(module)} refused its settings (exit {exc.code})")
    assert settings.log_json is True

    # One host: the broker's internal listener. Three PCs: the three nodes, from every PC.
    broker = substitute(INTERNAL_BROKER) if name == "all" else CONFIG["KAFKA_BROKERS"]
    if target == "registry":  # no broker: it reaches Central's admin web
        assert settings.central == ("central", int(CONFIG["CENTRAL_HTTP_PORT"]))
        assert settings.http_port == int(CONFIG["REGISTRY_PORT"])
        assert settings.scheme == "https" and settings.tls_cert == f"{keys_dir}/registry.crt"
        return
    if target == "weather":  # no broker either: a client of Central's admin web
        port = int(CONFIG["CENTRAL_HTTP_PORT"])
        standby = () if name == "all" else ((CONFIG["PC1_IP"], port),)
        assert settings.central == (("central", port), *standby)
        assert settings.provider == "file" and str(settings.file) == "/weather/weather.json"
        assert "./weather:/weather:ro" in svc["volumes"], "a directory: `set` renames the file"
        return
    assert settings.broker == broker, svc_name
    # Its own Kafka login, over TLS verified with the deployment's CA.
    login = settings.kafka
    assert login is not None, f"{svc_name}: Kafka is secured by default"
    assert login.ca_file == f"{keys_dir}/ca.crt"
    wanted_login = {
        "central": "central",
        "driver": "driver",
        "site": "site",
        "monitor": "monitor",
        "engine": f"cp-{CONFIG.get('CP' + svc_name.removeprefix('engine-cp') + '_ID')}",
    }[target]
    assert login.username == wanted_login, svc_name
    if target == "central":
        assert settings.port == int(CONFIG["CENTRAL_PORT"])
        assert settings.http_port == int(CONFIG["CENTRAL_HTTP_PORT"])
        assert settings.db.startswith("/data/")
        assert any(v.endswith(":/data") for v in svc["volumes"]), "the database is in a volume"
        if name == "all":
            assert settings.ha is False, "one Central, one broker: the simple default"
        else:
            assert settings.ha is True
            assert settings.advertise == CONFIG[f"{name.upper()}_IP"], "a standby names it so"
    elif target == "driver":
        assert settings.http_port == int(CONFIG["DRIVER_HTTP_PORT"])
    elif target == "site":
        assert settings.http_port == int(CONFIG["MONITOR_HTTP_PORT"])
    elif target == "engine":
        n = int(svc_name.removeprefix("engine-cp"))
        assert settings.listen == ("0.0.0.0", int(CONFIG[f"CP{n}_ENGINE_PORT"]))
        assert svc["stdin_open"] is True and svc["tty"] is True, "its menu needs a terminal"
        assert settings.speed == float(CONFIG["CP_SPEED"]), "the demo's time scale (CP_SPEED)"
    elif target == "monitor":
        n = int(svc_name.removeprefix("monitor-cp"))
        assert settings.cp_id == CONFIG[f"CP{n}_ID"]
        assert settings.engine == (f"engine-cp{n}", int(CONFIG[f"CP{n}_ENGINE_PORT"]))
        port = int(CONFIG["CENTRAL_PORT"])
        if name == "all":
            assert settings.central == (("central", port),)
        else:  # the active Central's PC first, then its standby's
            assert settings.central == ((CONFIG["PC2_IP"], port), (CONFIG["PC1_IP"], port))
        assert settings.broker == broker, "health samples for the site dashboard"


def test_only_central_has_a_database() -> None:
    for name in COMPOSE_FILES:
        for svc_name, svc in services(name).items():
            if svc_name != "central":
                assert "EV_DB" not in environment(svc), (name, svc_name)
                assert not any("/data" == v.split(":")[-1] for v in svc.get("volumes", []))


def test_pc3_runs_every_slot_of_network_config() -> None:
    pc3 = services("pc3")
    for n in range(1, network_config.PC3_SLOTS + 1):
        assert {f"engine-cp{n}", f"monitor-cp{n}"} <= set(pc3)
    assert not {s for s in pc3 if s.startswith("engine-")} - {
        f"engine-cp{n}" for n in range(1, network_config.PC3_SLOTS + 1)
    }


# --- Kafka ---------------------------------------------------------------------------------------


def kafka_version() -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    pom = ET.parse(REPO_ROOT / "scripts" / "kafka-pom.xml").getroot()
    version = pom.findtext("m:properties/m:kafka.version", namespaces=ns)
    assert version
    return version


def test_one_host_kafka_is_development_s_version_and_reachable_from_other_pcs() -> None:
    svcs = services("all")
    for svc_name in ("kafka", "kafka-init"):
        assert svcs[svc_name]["image"] == f"apache/kafka:{kafka_version()}"
    kafka = environment(svcs["kafka"])
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft: no ZooKeeper"
    advertised = dict(
        item.split("://") for item in substitute(kafka["KAFKA_ADVERTISED_LISTENERS"]).split(",")
    )
    assert advertised["EXTERNAL"] == CONFIG["KAFKA_BOOTSTRAP"], "other PCs dial PC2_IP"
    assert advertised["INTERNAL"] == substitute(INTERNAL_BROKER)
    listeners = dict(item.split("://") for item in substitute(kafka["KAFKA_LISTENERS"]).split(","))
    assert listeners["EXTERNAL"] == f":{CONFIG['KAFKA_PORT']}"
    assert listeners["INTERNAL"] == f":{CONFIG['KAFKA_INTERNAL_PORT']}"
    assert listeners["CONTROLLER"] == f":{CONFIG['KAFKA_CONTROLLER_PORT']}"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics come from kafka-init"
    assert kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1", "one broker, one copy"
    assert any(v.endswith(":" + kafka["KAFKA_LOG_DIRS"]) for v in svcs["kafka"]["volumes"]), (
        "the broker's data is in a volume"
    )
    assert INTERNAL_BROKER in " ".join(svcs["kafka"]["healthcheck"]["test"])
    ui = environment(svcs["kafka-ui"])
    assert ui["KAFKA_CLUSTERS_0_BOOTSTRAPSERVERS"] == INTERNAL_BROKER


def cluster_node_properties() -> dict[str, str]:
    """What `scripts/kafka.sh cluster` (the tests' three-node cluster) gives every node, as
    the apache/kafka image's KAFKA_ variables, for three nodes: the settings that do not
    depend on the machine (addresses, ports, directories)."""
    text = (REPO_ROOT / "scripts" / "kafka.sh").read_text()
    body = text[text.index('cat > "$dir/server.properties" <<EOF') :]
    body = body[body.index("\n") + 1 : body.index("\nEOF")]
    wanted = {}
    for line in body.splitlines():
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        value = value.replace("$replicas", "3").replace("$isr", "2")
        # Partition counts are the tests' own (one partition each, for speed); the listeners
        # are named otherwise here (checked above).
        if "$" in value or key.endswith("num.partitions") or "listener" in key:
            continue
        wanted["KAFKA_" + key.upper().replace(".", "_")] = value
    return wanted


@pytest.mark.parametrize("name", PC_FILES)
def test_each_pc_runs_one_node_of_a_three_voter_quorum(name: str) -> None:
    svcs = services(name)
    for svc_name in ("kafka", "kafka-init"):
        assert svcs[svc_name]["image"] == f"apache/kafka:{kafka_version()}"
    kafka = {key: substitute(value) for key, value in environment(svcs["kafka"]).items()}
    assert kafka["KAFKA_NODE_ID"] == str(network_config.KAFKA_NODE_IDS[name])
    voters = kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voters == CONFIG["KAFKA_VOTERS"]
    assert voters.split(",") == [
        f"{network_config.KAFKA_NODE_IDS[pc]}@{CONFIG[f'{pc.upper()}_IP']}:"
        f"{CONFIG['KAFKA_CONTROLLER_PORT']}"
        for pc in PC_FILES
    ]
    # Other PCs dial this node at this PC's address, clients and brokers alike, and the other
    # controllers this controller at the address it advertises (not its host name, `kafka`,
    # which on every PC is that PC's own node).
    assert kafka["KAFKA_ADVERTISED_LISTENERS"] == (
        f"EXTERNAL://{CONFIG[f'{name.upper()}_IP']}:{CONFIG['KAFKA_PORT']},"
        f"CONTROLLER://{CONFIG[f'{name.upper()}_IP']}:{CONFIG['KAFKA_CONTROLLER_PORT']}"
    )
    listeners = dict(item.split("://") for item in kafka["KAFKA_LISTENERS"].split(","))
    assert listeners == {
        "EXTERNAL": f":{CONFIG['KAFKA_PORT']}",
        "CONTROLLER": f":{CONFIG['KAFKA_CONTROLLER_PORT']}",
    }
    assert kafka["KAFKA_INTER_BROKER_LISTENER_NAME"] == "EXTERNAL"
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert kafka["CLUSTER_ID"] == CONFIG["KAFKA_CLUSTER_ID"], "one cluster id on every PC"
    # Replication 3 with two in sync, the lease's 1 s session floor, no rebalance delay, the
    # 4 s broker session: what the high-availability tests ran on.
    wanted = cluster_node_properties()
    assert wanted["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
    assert wanted["KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS"] == "1000"
    different = {key: (kafka.get(key), value) for key, value in wanted.items()}
    different = {key: pair for key, pair in different.items() if pair[0] != pair[1]}
    assert not different, f"{name}: differs from scripts/kafka.sh cluster: {different}"
    assert any(v.endswith(":" + kafka["KAFKA_LOG_DIRS"]) for v in svcs["kafka"]["volumes"])
    check = " ".join(svcs["kafka"]["healthcheck"]["test"])
    assert "localhost:${KAFKA_PORT}" in check
    if name == "pc2":
        ui = environment(svcs["kafka-ui"])
        assert ui["KAFKA_CLUSTERS_0_BOOTSTRAPSERVERS"] == "${KAFKA_BROKERS}"


def created_topics(script: str) -> dict[str, tuple[int, dict[str, str]]]:
    """The topics a kafka-init script creates: its `create --topic ...` lines."""
    created = {}
    for line in script.splitlines():
        words = shlex.split(line)
        if not words or words[0] != "create":
            continue
        opts: dict[str, Any] = {"config": {}}
        for flag, value in zip(words[1::2], words[2::2], strict=True):
            if flag == "--config":
                key, _, val = value.partition("=")
                opts["config"][key] = val
            else:
                opts[flag.lstrip("-")] = value
        created[opts["topic"]] = (int(opts["partitions"]), opts["config"])
    return created


def test_one_host_kafka_init_creates_exactly_the_bus_topics() -> None:
    script = services("all")["kafka-init"]["command"][0]
    assert created_topics(script) == {t.name: (t.partitions, t.config) for t in TOPICS}
    assert "--if-not-exists" in script, "a second `up` must not fail"
    assert "--replication-factor 1" in script
    assert INTERNAL_BROKER.replace("$", "") in script.replace("$", "")


@pytest.mark.parametrize("name", PC_FILES)
def test_every_pc_s_kafka_init_creates_the_bus_and_ha_topics_with_three_copies(
    name: str,
) -> None:
    script = services(name)["kafka-init"]["command"][0]
    assert created_topics(script) == {
        t.name: (t.partitions, t.config) for t in (*TOPICS, *HA_TOPICS)
    }
    assert script == services("pc2")["kafka-init"]["command"][0], "the same on every PC"
    create = script[script.index("create() {") : script.index("\n}\n")]
    assert "--if-not-exists" in create, "a second `up`, or a second PC's, must not fail"
    assert "--replication-factor 3 --config min.insync.replicas=2" in create
    # Retried until it succeeds: a topic needs three live brokers for its three copies.
    assert re.search(r"until topics --create", create), create
    # Every call as the admin, at the three nodes.
    topics = script[: script.index("\n")]
    assert re.search(r"topics\(\) \{ /opt/kafka/bin/kafka-topics\.sh ", topics), topics
    assert '--bootstrap-server "${KAFKA_BROKERS}"' in topics
    assert "--command-config /keys/client.properties" in topics


def test_the_centrals_share_one_audit_key_copied_into_their_volumes() -> None:
    script = (REPO_ROOT / "docker" / "install-keys.sh").read_text()
    for name in CENTRAL_PCS:
        svcs = services(name)
        key = svcs["keys"]
        central = svcs["central"]
        volume = next(v for v in central["volumes"] if v.endswith(":/data")).split(":")[0]
        assert f"{volume}:/central-data" in key["volumes"], "Central's own volume"
        assert "./secrets:/secrets:ro" in key["volumes"]
        assert key["entrypoint"] == ["/bin/sh", "/install-keys.sh"]
        db = environment(central)["EV_DB"].removeprefix("/data/")
        target = f"/central-data/{db}.audit-key"  # Central reads <db>.audit-key
        assert f"/secrets/central.audit-key {target}" in script
    # Readable by Central's user only (docker/Dockerfile: uid and gid 10001).
    assert 'install -o "$APP" -g "$APP" -m 0600 /secrets/central.audit-key' in script
    assert "APP=10001" in script and "10001" in DOCKERFILE.read_text()


def test_secure_by_default_every_kafka_node_and_client() -> None:
    for name in COMPOSE_FILES:
        svcs = services(name)
        kafka = {k: substitute(v) for k, v in environment(svcs["kafka"]).items()}
        protocols = dict(
            entry.split(":") for entry in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
        )
        assert protocols.pop("CONTROLLER") == "SSL", name
        assert set(protocols.values()) == {"SASL_SSL"}, name
        assert kafka["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
        assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
        assert kafka["KAFKA_LISTENER_NAME_CONTROLLER_SSL_CLIENT_AUTH"] == "required"
        assert "kafka-keys:/keys:ro" in svcs["kafka"]["volumes"]
        # Its health check and the topics' creation log in as the admin.
        assert "--command-config /keys/client.properties" in str(svcs["kafka"]["healthcheck"])
        assert "--command-config /keys/client.properties" in svcs["kafka-init"]["command"][0]
        # Every service of ours that reads Kafka has a login; every TLS path is set.
        for svc_name, svc in svcs.items():
            env = environment(svc)
            if build_target(svc) and "EV_BROKER" in env:
                assert substitute(env["EV_KAFKA_USER"]), (name, svc_name)
                assert "keys:/keys:ro" in svc["volumes"], (name, svc_name)
            for key in ("EV_TLS_CERT", "EV_TLS_KEY", "EV_TLS_CA"):
                if key in env:
                    assert substitute(env[key]).startswith("/keys/"), (name, svc_name, key)
    plain = network_config.load({"SECURE": "0"})
    kafka = environment(services("pc2")["kafka"])
    mapping = substitute(kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"], plain)
    assert mapping == "EXTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT", "SECURE=0: plain, on purpose"
    assert substitute(environment(services("pc2")["central"])["EV_KAFKA_USER"], plain) == ""


# --- the images ----------------------------------------------------------------------------------


def test_every_image_target_is_slim_python_non_root_with_json_logs() -> None:
    stages = dockerfile_stages()
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    used = {build_target(svc) for name in COMPOSE_FILES for svc in services(name).values()}
    used.discard(None)
    assert used == set(TARGETS)
    for target in used:
        assert target is not None
        chain = lineage(stages, target)
        assert chain[-1].base == "${PYTHON_IMAGE}", target
        user = effective(stages, target, "USER")
        assert user and user.split(":")[0] not in ("root", "0"), (target, user)
        assert stages[target].last("HEALTHCHECK"), target
        envs = " ".join(env for stage in chain for env in stage.all("ENV"))
        assert "EV_LOG_JSON=1" in envs, target
    # Dependencies from the project's own pyproject, then the project itself.
    build = " ".join(stages["build"].all("RUN"))
    assert "pyproject.toml" in build and "pip install --no-deps ." in build
    assert "COPY --from=build /opt/venv /opt/venv" in " ".join(
        f"COPY {arg}" for arg in stages["runtime"].all("COPY")
    )


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in lines, "everything out by default, then what the images need"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {".env", ".venv", ".git", "data", "tests", ".run"}.isdisjoint(allowed)
    copied = {
        arg.split()[0].rstrip("/")
        for arg in dockerfile_stages()["build"].all("COPY")
        if not arg.startswith("--")
    }
    copied |= {"init_db.py", "network_config.py"}
    assert copied <= allowed, copied - allowed


# --- a real Compose implementation ---------------------------------------------------------------


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    missing_tool(
        "docker-compose (or the docker compose plugin)", "compose file checks", "docker-compose"
    )


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_a_real_compose_accepts_the_file_with_network_config_s_env(
    name: str, tmp_path: Path
) -> None:
    overrides = {
        "PC1_IP": "10.20.0.11",
        "PC2_IP": "10.20.0.12",
        "PC3_IP": "10.20.0.13",
        "KAFKA_PORT": "19092",
        "CENTRAL_PORT": "15000",
        "PC3_CPS": "CP004,CP005,CP006",
    }
    config = network_config.load(overrides)
    env_file = tmp_path / ".env"
    env_file.write_text(network_config.env_file(config))
    # Every profile on, so that the services started on request are checked too.
    profiles = sorted({p for svc in services(name).values() for p in svc.get("profiles", [])})
    proc = subprocess.run(
        [
            *compose_command(),
            "--env-file",
            str(env_file),
            "-f",
            str(COMPOSE_FILES[name]),
            *[arg for profile in profiles for arg in ("--profile", profile)],
            "config",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert proc.returncode == 0, proc.stderr
    assert "is not set" not in proc.stderr, proc.stderr  # every variable came from the .env
    resolved = yaml.safe_load(proc.stdout)["services"]
    assert set(resolved) == set(services(name))
    for svc_name, svc in resolved.items():
        text = str(svc)
        assert "${" not in text, (svc_name, text)
        for port in svc.get("ports", []):
            published = port["published"] if isinstance(port, dict) else port.split(":")[0]
            wanted = {config[k] for k in published_by(name, svc_name)}
            assert str(published) in wanted, (svc_name, port)
    listeners = resolved["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    own = {"pc1": "10.20.0.11", "pc3": "10.20.0.13"}.get(name, "10.20.0.12")
    assert f"EXTERNAL://{own}:19092" in listeners
    brokers = "10.20.0.11:19092,10.20.0.12:19092,10.20.0.13:19092"
    if name in PC_FILES:
        voters = resolved["kafka"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"]
        assert voters == "1@10.20.0.11:29093,2@10.20.0.12:29093,3@10.20.0.13:29093"
    if name in CENTRAL_PCS:
        central = resolved["central"]["environment"]
        assert (central["EV_HA"], central["EV_ADVERTISE"]) == ("1", own)
        assert central["EV_BROKER"] == brokers
    if name == "pc3":
        monitor = resolved["monitor-cp1"]["environment"]
        assert monitor["EV_CENTRAL"] == "10.20.0.12:15000,10.20.0.11:15000"
        assert monitor["EV_CP_ID"] == "CP004"
        assert resolved["engine-cp1"]["environment"]["EV_BROKER"] == brokers
