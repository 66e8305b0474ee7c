"""The simulated hosts run what the per-PC compose files run.

For each of our services the compose file has one that starts the same module with the same
settings (after substituting the .env that network_config.py writes, with the simulated PCs'
addresses). Every difference must be one listed in RULES, with its reason. Both ways the .env
can be written are compared: secure (the default: TLS, Kafka's logins) and SECURE=0 (plain).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from compose_spec import (
    ComposeService,
    compose_services,
    flags_of,
    load_dockerfile,
    port_of,
)
from netsim import CP_IDS, MultiHostDeployment, SimulatedNetwork

from procs import REPO_ROOT

pytestmark = [pytest.mark.multihost]

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"

EQUAL = "equal"  # the same value
SAME_PORT = "same port"  # host:port with the same port; the host is the container's view
SET = "set"  # both set; the value is where the container keeps or finds it
ANY = "any"  # presentation only
# The simulated hosts run one Kafka node and one Central, on PC2; the compose files run a node
# on every PC and a standby Central on PC1 (high availability, tested on a three-node cluster
# by tests/e2e/test_high_availability.py).
IN_LIST = "in list"  # compose gives a list (HOST:PORT,...) that holds our one value
FIRST_IN_LIST = "first in list"  # ... as its first entry (the order is the order tried)
COMPOSE_ONLY = "compose only"  # set there, not here
# Whatever the rule, a flag compose passes empty (the services read "" as not given) and we
# omit is unset on both sides: how the plain deployment (SECURE=0) leaves TLS and logins off.

# A secured Kafka's login (docs/security.md, "Kafka"): the same user; its password file and
# the CA where the container finds them (/keys) and where the test made them. Without a user
# on either side the other two are not read (shared/settings.py), whatever compose passes.
KAFKA_LOGIN: dict[str, str | tuple[str, str]] = {
    "--kafka-user": EQUAL,
    "--kafka-password-file": SET,
    "--kafka-ca": SET,
}
READ_WITH_USER = ("--kafka-password-file", "--kafka-ca")

RULES: dict[str, dict[str, str | tuple[str, str]]] = {
    "EV_Central": {
        "--demo": ANY,  # the demo deployment seeds its demo data (DEMO=1 in .env)
        "--port": EQUAL,
        "--http-port": EQUAL,
        # In its container Central dials Kafka's internal listener (kafka:29092); the other
        # PCs dial PC2_IP:KAFKA_PORT, as the simulated Central does.
        "--broker": SET,
        "--db": SET,  # a volume in the container, the test's directory here
        "--ha": COMPOSE_ONLY,
        "--advertise": COMPOSE_ONLY,  # with --ha: PC2_IP, which a standby names
        "--listen-host": ("default", "0.0.0.0"),  # compose relies on the default we pass
        "--console": ANY,
        "--log-json": ANY,
        # TLS on :5000 and the admin web (CENTRAL_TLS_CERT, CENTRAL_TLS_KEY: /keys/central.*).
        "--tls-cert": SET,
        "--tls-key": SET,
        **KAFKA_LOGIN,  # central
    },
    "EV_CP_E": {
        "--broker": IN_LIST,
        "--listen": SAME_PORT,  # 0.0.0.0 in its container, PC3's address here
        # Compose engines are driven by hand (docker attach); the tests add automatic plugging.
        "--auto-plug": ANY,
        "--auto-unplug": ANY,
        # The demo's time scale (CP_SPEED) makes supplies bigger for people to watch; the tests
        # keep real time, so that their energy bounds (kW x seconds) hold.
        "--speed": ANY,
        "--secret": EQUAL,  # the demo seed's, from CPn_SECRET
        "--log-json": ANY,
        **KAFKA_LOGIN,  # cp-CPnnn, the engine's own
    },
    "EV_CP_M": {
        "--engine": SAME_PORT,  # the engine's container name on PC3's Docker network
        "--central": FIRST_IN_LIST,  # PC2's Central, then its standby's on PC1
        "--cp-id": EQUAL,
        "--broker": IN_LIST,
        "--secret": EQUAL,  # the demo seed's, from CPn_SECRET
        "--tls-ca": SET,  # CENTRAL_TLS_CA, which verifies Central
        "--log-json": ANY,
        **KAFKA_LOGIN,  # monitor
    },
    # Only the Kafka flags: compose runs the drivers' dashboard, which shares the image (and
    # the login) of the command-line app we run.
    "EV_Driver": {
        "--broker": IN_LIST,
        **KAFKA_LOGIN,  # driver
    },
}


SECURE_MODES = pytest.mark.parametrize("secure", [True, False], ids=["secure", "plain"])


def ours(secure: bool = True) -> MultiHostDeployment:
    """The simulated deployment's command lines (nothing is started), and its .env."""
    net = SimulatedNetwork("evtcheck", "10.231.0")
    return MultiHostDeployment(net, Path("/nonexistent"), secure=secure)


def compare(module: str, our_args: list[str], theirs: ComposeService) -> list[str]:
    our_module, our_words, our_flags = flags_of(our_args)
    where = f"{theirs.file} {theirs.name}"
    problems = []
    if (our_module, our_words) != (theirs.module, theirs.words):
        problems.append(f"{where}: runs {theirs.module} {theirs.words}, we run {our_module}")
    if theirs.missing:
        problems.append(f"{where}: .env lacks {sorted(theirs.missing)}")
    return problems + compare_flags(where, RULES[module], our_flags, theirs.flags)


def compare_flags(
    where: str,
    rules: Mapping[str, str | tuple[str, str]],
    our_flags: Mapping[str, str],
    their_flags: Mapping[str, str],
) -> list[str]:
    problems = []
    if not our_flags.get("--kafka-user") and not their_flags.get("--kafka-user"):
        our_flags = {k: v for k, v in our_flags.items() if k not in READ_WITH_USER}
        their_flags = {k: v for k, v in their_flags.items() if k not in READ_WITH_USER}
    for flag in sorted(set(our_flags) | set(their_flags)):
        mine, other = our_flags.get(flag), their_flags.get(flag)
        rule = rules.get(flag)
        if mine is None and other == "":
            continue  # unset on both sides
        if rule is None:
            problems.append(f"{where}: {flag} differs (ours {mine!r}, compose {other!r})")
        elif rule == ANY:
            continue
        elif rule == COMPOSE_ONLY:
            if mine is not None or not other:
                problems.append(f"{where}: {flag} is {other!r} there, {mine!r} here")
        elif mine is None or (other is None and not isinstance(rule, tuple)):
            problems.append(f"{where}: {flag} only in {'compose' if mine is None else 'ours'}")
        elif isinstance(rule, tuple):
            if (other if other is not None else rule[1]) != mine:
                problems.append(f"{where}: {flag} is {other!r} there, {mine!r} here")
        elif rule == EQUAL and mine != other:
            problems.append(f"{where}: {flag} is {other!r} there, {mine!r} here")
        elif rule == SET and not other:
            problems.append(f"{where}: {flag} is empty there, {mine!r} here")
        elif rule == SAME_PORT and port_of(mine) != port_of(other or ""):
            problems.append(f"{where}: {flag} port {other!r} there, {mine!r} here")
        elif rule in (IN_LIST, FIRST_IN_LIST):
            entries = (other or "").split(",")
            found = entries[:1] if rule == FIRST_IN_LIST else entries
            if mine not in found:
                problems.append(f"{where}: {flag} is {other!r} there, {mine!r} not {rule} here")
    return problems


def services_of(pc: str, system: MultiHostDeployment) -> list[ComposeService]:
    """The compose file's services, with the .env network_config.py writes for `system`."""
    compose_file = REPO_ROOT / f"docker-compose.{pc}.yml"
    if not compose_file.exists() or not DOCKERFILE.exists():
        pytest.skip(f"{compose_file.name} or docker/Dockerfile not present")
    return compose_services(compose_file, load_dockerfile(DOCKERFILE.read_text()), system.config)


def one(services: list[ComposeService], module: str, what: str) -> ComposeService:
    found = [s for s in services if s.module == module and not s.words]
    assert len(found) == 1, f"expected one {what} ({module}) in the compose file, found {found}"
    return found[0]


@SECURE_MODES
def test_pc2_central_matches_compose(secure: bool) -> None:
    system = ours(secure)
    central = one(services_of("pc2", system), "EV_Central", "Central")
    problems = compare("EV_Central", system.central_args(), central)
    assert not problems, "\n".join(problems)


@SECURE_MODES
def test_pc3_charging_points_match_compose(secure: bool) -> None:
    system = ours(secure)
    services = services_of("pc3", system)
    by_name = {s.name: s for s in services}
    monitors = {
        s.flags.get("--cp-id"): s for s in services if s.module == "EV_CP_M" and not s.words
    }
    problems = []
    for cp_id in CP_IDS:
        monitor = monitors.get(cp_id)
        assert monitor is not None, f"no monitor for {cp_id} in docker-compose.pc3.yml"
        problems += compare("EV_CP_M", system.monitor_args(cp_id), monitor)
        # The monitor names its engine by container name (or by address: then by port).
        engine_host, _, engine_port = monitor.flags["--engine"].rpartition(":")
        engine = by_name.get(engine_host) or next(
            (
                s
                for s in services
                if s.module == "EV_CP_E" and port_of(s.flags.get("--listen", "")) == engine_port
            ),
            None,
        )
        assert engine is not None and engine.module == "EV_CP_E", monitor
        problems += compare("EV_CP_E", system.engine_args(cp_id), engine)
    assert not problems, "\n".join(problems)


@SECURE_MODES
def test_pc1_driver_uses_the_same_broker_and_login(secure: bool) -> None:
    """PC1's compose runs the drivers' dashboard; the command-line app shares its image."""
    system = ours(secure)
    drivers = [s for s in services_of("pc1", system) if s.module == "EV_Driver"]
    assert drivers, "no EV_Driver service in docker-compose.pc1.yml"
    _, _, flags = flags_of(system.driver_args("user1", "--cp", "CP001"))
    rules = RULES["EV_Driver"]
    problems = []
    for driver in drivers:
        assert not driver.missing, driver.missing
        problems += compare_flags(
            f"{driver.file} {driver.name}",
            rules,
            {flag: value for flag, value in flags.items() if flag in rules},
            {flag: value for flag, value in driver.flags.items() if flag in rules},
        )
    assert not problems, "\n".join(problems)


def test_pc1_standby_central_runs_pc2_s_command() -> None:
    """The two Centrals of high availability start the same way; each advertises its own PC."""
    system = ours()
    active = one(services_of("pc2", system), "EV_Central", "Central")
    standby = one(services_of("pc1", system), "EV_Central", "standby Central")
    assert not standby.missing, standby.missing
    assert (standby.module, standby.words) == (active.module, active.words)
    assert standby.flags.pop("--advertise") == system.config["PC1_IP"]
    assert active.flags.pop("--advertise") == system.config["PC2_IP"]
    assert standby.flags == active.flags
    assert active.flags["--ha"] == "1"
