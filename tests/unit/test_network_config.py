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
    assert network_config.pc_ports(config, "pc1") == [8001]
    assert network_config.pc_ports(config, "pc2") == [19092, 8080, 5000, 8002]
    assert network_config.pc_ports(config, "pc3") == [8003]
    assert sorted(network_config.pc_ports(config, "all")) == [5000, 8001, 8002, 8003, 8080, 19092]


def test_env_file_has_every_variable_the_compose_files_use() -> None:
    assert len(COMPOSE_FILES) == 4, COMPOSE_FILES
    written = network_config.env_file(network_config.load({}))
    defined = dict(line.split("=", 1) for line in written.splitlines())
    for path in COMPOSE_FILES:
        used = set(re.findall(r"\$\{([^}]+)\}", path.read_text().replace("$$", "")))
        missing = used - set(defined)
        assert not missing, f"{path.name} uses {sorted(missing)}, which .env lacks"
        # Only the TLS paths may be empty (TLS off until the operator sets them).
        assert all(defined[var] for var in used - network_config.OPTIONAL)


def test_tls_paths_are_off_by_default_and_checked_when_set() -> None:
    config = network_config.load({})
    assert all(config[key] == "" for key in network_config.OPTIONAL)
    assert "CENTRAL_TLS_CA" in network_config.OPTIONAL
    on = {"CENTRAL_TLS_CERT": "/certs/central.crt", "CENTRAL_TLS_KEY": "/certs/central.key"}
    assert network_config.load(on)["CENTRAL_TLS_KEY"] == "/certs/central.key"
    with pytest.raises(ValueError, match="SITE_TLS_CERT is set but SITE_TLS_KEY is not"):
        network_config.load({"SITE_TLS_CERT": "/certs/site-dashboard.crt"})
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
    assert (proc.returncode, proc.stdout) == (0, "9092 8080 5000 18002\n")
    proc = run_cli(env={"PC2_IP": "192.168.1.300"})
    assert proc.returncode == 2
    assert proc.stderr == "error: PC2_IP='192.168.1.300' is not a valid IPv4 address\n"
