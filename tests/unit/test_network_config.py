"""network_config.py: defaults, environment overrides, validation, and the .env it writes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import network_config

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = sorted(REPO_ROOT.glob("docker-compose*.yml"))


def test_defaults_run_everything_on_this_machine() -> None:
    config = network_config.load({})
    assert config["PC2_IP"] == "127.0.0.1"
    assert config["KAFKA_BOOTSTRAP"] == "127.0.0.1:9092"
    assert config["CENTRAL_ADDRESS"] == "127.0.0.1:5000"
    # The engine ports of `make run` (scripts/run-local.sh: 6100 + n).
    assert [config[f"CP{n}_ENGINE_PORT"] for n in (1, 2, 3)] == ["6101", "6102", "6103"]
    assert [config[f"CP{n}_ID"] for n in (1, 2, 3)] == ["CP001", "CP002", "CP003"]


def test_environment_overrides_every_value_and_what_derives_from_it() -> None:
    config = network_config.load(
        {
            "PC2_IP": "192.168.1.20",
            "KAFKA_PORT": "19092",
            "CENTRAL_PORT": "15000",
            "ENGINE_BASE_PORT": "7001",
            "PC3_CPS": " CP007, CP008 ,CP009",
            "PC1_IP": "pc1.lan",
        }
    )
    assert config["KAFKA_BOOTSTRAP"] == "192.168.1.20:19092"
    assert config["CENTRAL_ADDRESS"] == "192.168.1.20:15000"
    assert config["PC1_IP"] == "pc1.lan"
    assert config["PC3_CPS"] == "CP007,CP008,CP009"
    assert (config["CP3_ID"], config["CP3_ENGINE_PORT"]) == ("CP009", "7003")


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PC3_IP", "10.0.0.3")
    assert network_config.load()["PC3_IP"] == "10.0.0.3"


@pytest.mark.parametrize("value", ["0", "65536", "80a", "", "-1", "8 0"])
def test_bad_ports_are_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="KAFKA_PORT=.* is not a port number"):
        network_config.load({"KAFKA_PORT": value})


@pytest.mark.parametrize(
    "value",
    [
        "192.168.1.300",
        "192.168.1",
        "0.0.0.0",
        "224.0.0.1",
        "",
        "http://192.168.1.20",
        "pc_2",
        "a..b",
    ],
)
def test_bad_addresses_are_rejected(value: str) -> None:
    with pytest.raises(ValueError, match=r"PC2_IP="):
        network_config.load({"PC2_IP": value})


@pytest.mark.parametrize("value", ["192.168.1.20", "10.0.0.1", "pc2", "pc2.example.lan"])
def test_good_addresses_are_accepted(value: str) -> None:
    assert network_config.load({"PC2_IP": value})["PC2_IP"] == value


def test_two_parts_on_one_port_are_rejected() -> None:
    with pytest.raises(ValueError, match="both 8002"):
        network_config.load({"DRIVER_HTTP_PORT": "8002"})
    # An engine port counts too (CP2's engine would take 6102).
    with pytest.raises(ValueError, match="CP2_ENGINE_PORT and MONITOR_HTTP_PORT|both 6102"):
        network_config.load({"MONITOR_HTTP_PORT": "6102"})
    with pytest.raises(ValueError, match="CP3_ENGINE_PORT"):
        network_config.load({"ENGINE_BASE_PORT": "65534"})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("CP001,CP002", "names 2 CPs"),
        ("CP001,CP002,CP003,CP004", "names 4 CPs"),
        ("CP001,CP001,CP002", "names a CP twice"),
        ("CP001,CP 2,CP003", "is not a CP id"),
    ],
)
def test_bad_cp_lists_are_rejected(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        network_config.load({"PC3_CPS": value})


def test_bad_cluster_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="KAFKA_CLUSTER_ID"):
        network_config.load({"KAFKA_CLUSTER_ID": "not-an-id"})


def test_the_engines_time_scale_follows_the_demo_unless_set() -> None:
    assert network_config.load({})["CP_SPEED"] == "60"  # the demo: kWh in a 10 s supply
    assert network_config.load({"DEMO": "0"})["CP_SPEED"] == "1"  # real time for real CPs
    assert network_config.load({"DEMO": "0", "CP_SPEED": "10"})["CP_SPEED"] == "10"
    for bad in ("0", "-1", "3601", "fast", "nan"):
        with pytest.raises(ValueError, match="CP_SPEED=.* is not a time scale"):
            network_config.load({"CP_SPEED": bad})


def test_each_pc_serves_its_own_ports() -> None:
    config = network_config.load({"KAFKA_PORT": "19092"})
    # Every PC: its Kafka node (clients, and the other nodes' controllers). PC1 and PC2: a
    # Central (PC1's is the standby).
    assert network_config.pc_ports(config, "pc1") == [8001, 5000, 8002, 19092, 29093]
    assert network_config.pc_ports(config, "pc2") == [19092, 8080, 5000, 8002, 29093, 8004]
    assert network_config.pc_ports(config, "pc3") == [8003, 19092, 29093]
    assert sorted(network_config.pc_ports(config, "all")) == [
        5000,
        8001,
        8002,
        8003,
        8004,
        8080,
        19092,
        29093,
    ]


def test_the_three_pc_cluster_is_derived_from_the_addresses() -> None:
    config = network_config.load(
        {
            "PC1_IP": "192.168.1.10",
            "PC2_IP": "192.168.1.20",
            "PC3_IP": "192.168.1.30",
            "KAFKA_PORT": "19092",
            "KAFKA_CONTROLLER_PORT": "19093",
            "CENTRAL_PORT": "15000",
        }
    )
    # Every service's broker list: the three nodes, one on each PC.
    assert config["KAFKA_BROKERS"] == "192.168.1.10:19092,192.168.1.20:19092,192.168.1.30:19092"
    # The KRaft quorum: node n on PCn.
    assert config["KAFKA_VOTERS"] == (
        "1@192.168.1.10:19093,2@192.168.1.20:19093,3@192.168.1.30:19093"
    )
    # Monitors try the active Central's PC first, then the standby's.
    assert config["CENTRAL_ADDRESSES"] == "192.168.1.20:15000,192.168.1.10:15000"
    assert network_config.three_pc_problem(config) is None


def test_the_broker_list_may_be_given_and_is_checked() -> None:
    given = " 127.0.0.1:19092, 127.0.0.1:19093 ,127.0.0.1:19094"
    config = network_config.load({"KAFKA_BROKERS": given})
    assert config["KAFKA_BROKERS"] == "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094"
    for bad, message in (
        ("127.0.0.1", "'127.0.0.1' is not HOST:PORT"),
        ("127.0.0.1:0", "is not a port number"),
        ("192.168.1.300:9092", "not a valid IPv4 address"),
        (" , ", "KAFKA_BROKERS is empty"),
    ):
        with pytest.raises(ValueError, match=message):
            network_config.load({"KAFKA_BROKERS": bad})


@pytest.mark.parametrize(
    ("addresses", "message"),
    [
        ({}, "PC1_IP is 127.0.0.1: the other PCs cannot reach that"),
        (
            {"PC1_IP": "10.0.0.1", "PC2_IP": "127.0.1.1", "PC3_IP": "10.0.0.3"},
            "PC2_IP is 127.0.1.1",
        ),
        (
            {"PC1_IP": "10.0.0.1", "PC2_IP": "10.0.0.2", "PC3_IP": "localhost"},
            "PC3_IP is localhost",
        ),
        (
            {"PC1_IP": "10.0.0.1", "PC2_IP": "10.0.0.2", "PC3_IP": "10.0.0.2"},
            "PC3_IP and PC2_IP are both 10.0.0.2: each PC runs a Kafka node",
        ),
        (
            {"PC1_IP": "10.0.0.1", "PC2_IP": "pc2.lan", "PC3_IP": "10.0.0.3"},
            "PC2_IP is pc2.lan: give each PC's IPv4 address, not a host name",
        ),
    ],
)
def test_three_pcs_need_three_reachable_addresses(addresses: dict[str, str], message: str) -> None:
    problem = network_config.three_pc_problem(network_config.load(addresses))
    assert problem is not None and message in problem


def test_the_audit_key_is_created_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "central.audit-key"
    assert network_config.ensure_audit_key(str(path)) is True
    key = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", key), key
    assert path.stat().st_mode & 0o777 == 0o600, "a secret: its owner's only"
    # A second call (the next `up`) keeps it: both Centrals must keep the same key.
    assert network_config.ensure_audit_key(str(path)) is False
    assert path.read_text() == key


def test_env_file_has_every_variable_the_compose_files_use() -> None:
    assert len(COMPOSE_FILES) == 4, COMPOSE_FILES
    written = network_config.env_file(network_config.load({}))
    defined = dict(line.split("=", 1) for line in written.splitlines())
    for path in COMPOSE_FILES:
        # ${VAR}, ${VAR:+word} and ${VAR:-word}: the variable's name.
        used = set(re.findall(r"\$\{([A-Za-z0-9_]+)", path.read_text().replace("$$", "")))
        # Kafka UI's password comes from the deploy scripts' environment, not from .env.
        used -= {"KAFKA_UI_PASSWORD"}
        missing = used - set(defined)
        assert not missing, f"{path.name} uses {sorted(missing)}, which .env lacks"
        # Only the TLS paths may be empty (TLS off when the operator clears them).
        assert all(defined[var] for var in used - network_config.OPTIONAL)


def test_secure_by_default_and_off_only_on_purpose() -> None:
    config = network_config.load({})
    assert config["SECURE"] == "1" and config["KAFKA_SECURE"] == "1"
    assert config["KAFKA_CLIENT_PROTOCOL"] == "SASL_SSL"
    assert config["KAFKA_AUTHORIZER"].endswith("StandardAuthorizer")
    assert {key: config[key] for key in network_config.OPTIONAL} == network_config.SECURE_TLS
    plain = network_config.load({"SECURE": "0"})
    assert all(plain[key] == "" for key in network_config.OPTIONAL)
    assert plain["KAFKA_SECURE"] == "" and plain["KAFKA_AUTHORIZER"] == ""
    assert plain["KAFKA_CLIENT_PROTOCOL"] == plain["KAFKA_CONTROLLER_PROTOCOL"] == "PLAINTEXT"
    # One part's TLS off on purpose; a bad switch refused.
    mixed = network_config.load({"SITE_TLS_CERT": "", "SITE_TLS_KEY": ""})
    assert mixed["SITE_TLS_CERT"] == "" and mixed["CENTRAL_TLS_CERT"] == "/keys/central.crt"
    with pytest.raises(ValueError, match="SECURE='yes': 1 turns TLS"):
        network_config.load({"SECURE": "yes"})


def test_each_pc_needs_its_own_keys_only() -> None:
    config = network_config.load({})
    pc3 = network_config.pc_files(config, "pc3")
    assert "secrets/kafka-cp-CP001.password" in pc3 and "certs/site-dashboard.key" in pc3
    assert not any("central" in name or "driver" in name for name in pc3)
    pc1 = network_config.pc_files(config, "pc1")
    assert "secrets/central.audit-key" in pc1 and "certs/central.key" in pc1
    assert not any(name.startswith("certs/ca.key") for name in pc1 + pc3)
    # PC2 makes all of it: every login but the admin's (which every node has) is PC2's.
    logins = network_config.kafka_logins(config)
    pc2 = network_config.pc_files(config, "pc2")
    assert all(f"secrets/kafka-{name}.password" in pc2 for name in logins)
    plain = network_config.load({"SECURE": "0"})
    assert network_config.pc_files(plain, "pc1") == ["secrets/central.audit-key"]
    assert network_config.pc_files(plain, "pc3") == []


def test_the_kafka_logins_are_the_roles_kafka_access_makes() -> None:
    from EV_Central.kafka_cli import SHARED_ROLES

    assert set(network_config.KAFKA_LOGINS) == {"admin", *SHARED_ROLES}


def test_tls_paths_are_checked_when_set() -> None:
    assert "CENTRAL_TLS_CA" in network_config.OPTIONAL
    on = {"CENTRAL_TLS_CERT": "/certs/central.crt", "CENTRAL_TLS_KEY": "/certs/central.key"}
    assert network_config.load(on)["CENTRAL_TLS_KEY"] == "/certs/central.key"
    with pytest.raises(ValueError, match="SITE_TLS_CERT is set but SITE_TLS_KEY is not"):
        network_config.load({"SITE_TLS_CERT": "/certs/site-dashboard.crt", "SITE_TLS_KEY": ""})
    with pytest.raises(ValueError, match="DRIVER_TLS_KEY=.* is not a path inside the container"):
        network_config.load({"DRIVER_TLS_CERT": "/certs/d.crt", "DRIVER_TLS_KEY": "certs/d.key"})
    with pytest.raises(ValueError, match="CENTRAL_TLS_CA="):
        network_config.load({"CENTRAL_TLS_CA": "/certs/my ca.crt"})


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "network_config.py", *args],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_writes_the_env_file_with_overrides(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    proc = run_cli("--env", str(target), env={"PC2_IP": "192.168.1.20"})
    assert proc.returncode == 0, proc.stderr
    lines = target.read_text().splitlines()
    assert "PC2_IP=192.168.1.20" in lines
    assert "KAFKA_BOOTSTRAP=192.168.1.20:9092" in lines
    assert "CP1_ENGINE_PORT=6101" in lines


def test_cli_prints_ports_and_refuses_bad_settings_in_one_line() -> None:
    proc = run_cli("--ports", "pc2", env={"CENTRAL_HTTP_PORT": "18002"})
    assert (proc.returncode, proc.stdout) == (0, "9092 8080 5000 18002 29093 8004\n")
    proc = run_cli(env={"PC2_IP": "192.168.1.300"})
    assert proc.returncode == 2
    assert proc.stderr == "error: PC2_IP='192.168.1.300' is not a valid IPv4 address\n"


def test_cli_refuses_loopback_addresses_for_three_pcs_and_makes_the_audit_key(
    tmp_path: Path,
) -> None:
    target = tmp_path / ".env"
    proc = run_cli("--env", str(target), "--three-pcs", env={"PC1_IP": "192.168.1.10"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: PC2_IP is 127.0.0.1: the other PCs cannot reach that")
    assert not target.exists(), "nothing written from settings that cannot work"
    three = {"PC1_IP": "192.168.1.10", "PC2_IP": "192.168.1.20", "PC3_IP": "192.168.1.30"}
    proc = run_cli("--env", str(target), "--three-pcs", env=three)
    assert proc.returncode == 0, proc.stderr
    lines = target.read_text().splitlines()
    assert "KAFKA_BROKERS=192.168.1.10:9092,192.168.1.20:9092,192.168.1.30:9092" in lines
    assert "CENTRAL_ADDRESSES=192.168.1.20:5000,192.168.1.10:5000" in lines
    key = tmp_path / "secrets" / "central.audit-key"
    proc = run_cli("--audit-key", str(key))
    assert (proc.returncode, proc.stdout) == (0, f"created {key}\n")
    proc = run_cli("--audit-key", str(key))
    assert (proc.returncode, proc.stdout) == (0, f"kept {key}\n")
