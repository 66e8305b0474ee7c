"""scripts/preflight.py against a real network, and the containers' health checks on real sockets.

The preflight runs as operators run it (a separate `python scripts/preflight.py` process, its
settings from a .env written by network_config.py) against a real broker, a real Central and
the two dashboards: all green while they run, a FAIL line with a fix and exit 1 once Central
is down; then, with a Central that has TLS on (certificates from scripts/make-certs.py), green
over https with the CA, and a FAIL that names the cause without it. On a three-node cluster with
two Centrals (--ha) it counts the brokers that answer, reads every partition's copies and says
which Central is active, before and after a node and the active Central are killed.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import network_config
from cluster import Cluster
from helpers import free_port, scaled, wait_for
from procs import Deployment, ServiceProcess, http_get

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFLIGHT = REPO_ROOT / "scripts" / "preflight.py"


def run_preflight(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Only the .env speaks: none of network_config's variables leak in from the caller.
    env = {
        k: v for k, v in os.environ.items() if k not in network_config.DEFAULTS and k != "EV_TLS_CA"
    }
    return subprocess.run(
        [sys.executable, str(PREFLIGHT), "--env-file", str(env_file), "--timeout", "3", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )


def lines_of(proc: subprocess.CompletedProcess[str], name: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if f"] {name} " in line]


def make_certs(out: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/make-certs.py", "--out", str(out)]
        + ["--server", "central=localhost,127.0.0.1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert proc.returncode == 0, proc.stderr


class Network:
    def __init__(self, deployment: Deployment, env_file: Path, config: dict[str, str]) -> None:
        self.deployment = deployment
        self.env_file = env_file
        self.config = config


@pytest.fixture
async def network(broker: Any, tmp_path: Path) -> AsyncIterator[Network]:
    """Central and both dashboards on a broker of their own, and the .env that describes them."""
    deployment = Deployment(broker.bootstrap, tmp_path)
    driver_port, site_port = free_port(), free_port()
    try:
        await deployment.start_central()
        for name, module, port in (
            ("driver-dashboard", "EV_Driver", driver_port),
            ("site-dashboard", "EV_CP_M", site_port),
        ):
            proc = ServiceProcess(
                name,
                ["-m", module, "dashboard", "--broker", broker.bootstrap],
                tmp_path,
                env={"EV_HTTP_PORT": str(port), "EV_LISTEN_HOST": "127.0.0.1"},
            )
            deployment.processes.append(proc.start())
        for port in (driver_port, site_port):
            url = f"http://127.0.0.1:{port}/healthz"

            async def healthy(url: str = url) -> bool:
                try:
                    status, _ = await asyncio.to_thread(http_get, url, 2)
                except OSError:
                    return False
                return bool(status == 200)

            await wait_for(healthy, 60, interval=0.3, message=f"{url} never answered 200")
        config = network_config.load(
            {
                # A plain network on loopback, as `make run` starts it (the secured Kafka's
                # login: tests/e2e/test_kafka_security.py).
                "SECURE": "0",
                "PC1_IP": "127.0.0.1",
                "PC2_IP": "127.0.0.1",
                "PC3_IP": "127.0.0.1",
                "KAFKA_PORT": str(broker.port),
                "CENTRAL_PORT": str(deployment.central_port),
                "CENTRAL_HTTP_PORT": str(deployment.http_port),
                "DRIVER_HTTP_PORT": str(driver_port),
                "MONITOR_HTTP_PORT": str(site_port),
                "KAFKA_UI_PORT": str(free_port()),  # no Kafka UI outside Docker
            }
        )
        env_file = tmp_path / "preflight.env"
        env_file.write_text(network_config.env_file(config))
        yield Network(deployment, env_file, config)
    finally:
        deployment.stop_all()


@pytest.mark.kafka
@pytest.mark.e2e
@pytest.mark.slow
async def test_preflight_green_while_everything_runs_then_fails_without_central_then_tls(
    network: Network, tmp_path: Path
) -> None:
    proc = await asyncio.to_thread(run_preflight, network.env_file, "--pc", "pc2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[FAIL]" not in proc.stdout, proc.stdout
    kafka_port = network.config["KAFKA_PORT"]
    for name in (
        "this PC's address",
        "kafka bootstrap",
        "kafka advertised",
        "central monitors",
        "central /healthz",
        "clock",
        "driver dashboard",
        "site dashboard",
    ):
        found = lines_of(proc, name)
        assert found and found[0].startswith("[OK  ]"), (name, proc.stdout)
    # The metadata really was read: the broker advertises what kafka.sh configured.
    assert f"127.0.0.1:{kafka_port}" in lines_of(proc, "kafka advertised")[0]
    # One machine and no Kafka UI: said, but only as warnings.
    assert lines_of(proc, "addresses")[0].startswith("[WARN]")
    assert lines_of(proc, "kafka ui")[0].startswith("[WARN]")
    assert proc.stdout.rstrip().endswith("all checks passed")

    assert network.deployment.central is not None
    network.deployment.central.stop()
    proc = await asyncio.to_thread(run_preflight, network.env_file)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for name in ("central monitors", "central /healthz"):
        (line,) = lines_of(proc, name)
        assert line.startswith("[FAIL]"), proc.stdout
        assert "-- fix: start PC2 (scripts/deploy.sh pc2 up)" in line
    # What still runs is still reported as fine: the failure is pinned on Central.
    assert lines_of(proc, "kafka advertised")[0].startswith("[OK  ]"), proc.stdout
    assert proc.stdout.rstrip().endswith("preflight: 2 check(s) failed")

    # Central again, now with TLS on both ports; the dashboards stay on plain http.
    certs = tmp_path / "certs"
    make_certs(certs)
    workdir = tmp_path / "tls"
    workdir.mkdir()
    tls = Deployment(
        network.deployment.broker,
        workdir,
        tls_ca=certs / "ca.crt",
        tls_cert=certs / "central.crt",
        tls_key=certs / "central.key",
    )
    try:
        await tls.start_central()
        config = {
            **network.config,
            "CENTRAL_PORT": str(tls.central_port),
            "CENTRAL_HTTP_PORT": str(tls.http_port),
        }
        plain_env = tmp_path / "plain.env"
        plain_env.write_text(network_config.env_file(network_config.load(config)))
        tls_env = tmp_path / "tls.env"
        tls_env.write_text(
            network_config.env_file(
                network_config.load(
                    {
                        **config,
                        "CENTRAL_TLS_CERT": "/certs/c.crt",
                        "CENTRAL_TLS_KEY": "/certs/c.key",
                    }
                )
            )
        )
        url = f"https://127.0.0.1:{tls.http_port}/healthz"

        proc = await asyncio.to_thread(run_preflight, tls_env, "--tls-ca", str(certs / "ca.crt"))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert lines_of(proc, "tls")[0].startswith("[OK  ] tls"), proc.stdout
        assert "https for central (CENTRAL_TLS_CERT)" in lines_of(proc, "tls")[0]
        (line,) = lines_of(proc, "central /healthz")
        assert line == f"[OK  ] central /healthz   {url} answered 200", proc.stdout
        assert lines_of(proc, "clock")[0].startswith("[OK  ]"), proc.stdout
        for name in ("driver dashboard", "site dashboard"):  # still checked over http
            assert lines_of(proc, name)[0].startswith("[OK  ] "), proc.stdout
            assert "http://127.0.0.1:" in lines_of(proc, name)[0], proc.stdout

        # Without the CA the certificate cannot be verified: said, with the fix.
        proc = await asyncio.to_thread(run_preflight, tls_env)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        (line,) = lines_of(proc, "central /healthz")
        assert line.startswith(f"[FAIL] central /healthz   {url} did not answer"), proc.stdout
        assert "certificate verify failed" in line and "give --tls-ca certs/ca.crt" in line

        # A .env that does not say Central has TLS: plain http is refused, and the fix says why.
        proc = await asyncio.to_thread(run_preflight, plain_env)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        (line,) = lines_of(proc, "central /healthz")
        assert line.startswith("[FAIL]") and "set CENTRAL_TLS_CERT" in line, proc.stdout
        # A CA given while no server has TLS in the settings is worth a warning, not a failure.
        proc = await asyncio.to_thread(
            run_preflight, network.env_file, "--tls-ca", str(certs / "ca.crt")
        )
        assert lines_of(proc, "tls")[0].startswith("[WARN] tls"), proc.stdout
    finally:
        tls.stop_all()


async def central_role(url: str) -> str | None:
    try:
        status, body = await asyncio.to_thread(http_get, url, 2)
    except OSError:
        return None
    return body.get("role") if status == 200 and isinstance(body, dict) else None


@pytest.mark.kafka
@pytest.mark.e2e
@pytest.mark.slow
async def test_preflight_reports_quorum_replication_and_the_active_central_of_a_cluster(
    kafka_cluster: Cluster, tmp_path: Path
) -> None:
    # As on three PCs: PC2's Central and PC1's standby on the same ports, each on an address
    # of its own (127.0.0.1 and 127.0.0.2), both with --ha on the three-node cluster.
    central_port, http_port = free_port(), free_port()
    key = secrets.token_hex(32) + "\n"  # the audit key both Centrals share
    centrals: dict[str, ServiceProcess] = {}
    urls = {}
    try:
        for pc, host, role in (("pc2", "127.0.0.1", "active"), ("pc1", "127.0.0.2", "standby")):
            workdir = tmp_path / pc
            workdir.mkdir()
            (workdir / "central.db.audit-key").write_text(key)
            (workdir / "central.db.audit-key").chmod(0o600)
            args = ["-m", "EV_Central", "--ha", "--demo", "--broker", kafka_cluster.bootstrap]
            args += ["--db", str(workdir / "central.db"), "--console", "log"]
            args += ["--port", str(central_port), "--http-port", str(http_port)]
            args += ["--listen-host", host, "--advertise", host]
            centrals[pc] = ServiceProcess(f"central-{pc}", args, workdir).start()
            urls[pc] = f"http://{host}:{http_port}/healthz"

            async def has_role(url: str = urls[pc], role: str = role) -> bool:
                return await central_role(url) == role

            await wait_for(has_role, 60, interval=0.3, message=f"{pc}'s Central never {role}")

        config = network_config.load(
            {
                "SECURE": "0",
                "PC1_IP": "127.0.0.2",
                "PC2_IP": "127.0.0.1",
                "PC3_IP": "127.0.0.3",
                "KAFKA_BROKERS": kafka_cluster.bootstrap,
                "CENTRAL_PORT": str(central_port),
                "CENTRAL_HTTP_PORT": str(http_port),
                "DRIVER_HTTP_PORT": str(free_port()),
                "MONITOR_HTTP_PORT": str(free_port()),
                "KAFKA_UI_PORT": str(free_port()),
            }
        )
        env_file = tmp_path / "cluster.env"
        env_file.write_text(network_config.env_file(config))

        proc = await asyncio.to_thread(run_preflight, env_file)
        (quorum,) = lines_of(proc, "kafka quorum")
        assert quorum == (
            "[OK  ] kafka quorum       3 of 3 brokers answer (registered nodes: 1, 2, 3)"
        ), proc.stdout
        # The Centrals created the topics on three brokers: three copies, two in sync needed.
        (replication,) = lines_of(proc, "kafka replication")
        assert replication.startswith("[OK  ]") and "3 copies each, all in sync" in replication
        assert "ev.central.changelog" not in replication, proc.stdout
        (active,) = lines_of(proc, "central active")
        assert active == "[OK  ] central active     PC2 active; PC1 standby", proc.stdout
        for name in ("kafka bootstrap", "kafka advertised", "central monitors", "central /healthz"):
            assert lines_of(proc, name)[0].startswith("[OK  ]"), proc.stdout

        # PC3 switched off: its node is gone. Two of three keep the quorum; every partition
        # that had a copy there is under-replicated once the controller fences the node.
        kafka_cluster.kill_node(3)
        seen: dict[str, subprocess.CompletedProcess[str]] = {}

        async def under_replicated() -> bool:
            seen["last"] = await asyncio.to_thread(run_preflight, env_file)
            line = lines_of(seen["last"], "kafka replication")[0]
            return line.startswith("[WARN]") and "under-replicated" in line

        await wait_for(under_replicated, scaled(60), interval=1, message="never under-replicated")
        proc = seen["last"]
        (quorum,) = lines_of(proc, "kafka quorum")
        assert quorum.startswith("[WARN] kafka quorum       2 of 3 brokers answer"), proc.stdout
        assert f"no answer from {kafka_cluster.bootstrap.split(',')[2]}" in quorum
        assert "a majority still holds the quorum" in quorum
        assert (
            "under-replicated (fewer in sync than copies): "
            in lines_of(proc, "kafka replication")[0]
        )

        # PC2 switched off: its Central is gone; the standby takes over and says so.
        centrals["pc2"].kill()

        async def taken_over() -> bool:
            return await central_role(urls["pc1"]) == "active"

        await wait_for(taken_over, scaled(30), interval=0.2, message="the standby never took over")
        proc = await asyncio.to_thread(run_preflight, env_file)
        (active,) = lines_of(proc, "central active")
        assert active.startswith("[WARN] central active     PC2 does not answer"), proc.stdout
        assert "PC1 active: no standby to take over" in active
        assert lines_of(proc, "central /healthz")[0].startswith("[FAIL]"), proc.stdout
        assert proc.returncode == 1
    finally:
        for central in centrals.values():
            central.stop()


def test_preflight_rejects_bad_configuration_and_foreign_address(tmp_path: Path) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("PC2_IP=192.168.1.300\n")
    proc = run_preflight(env_file)
    assert proc.returncode == 1
    assert proc.stdout.startswith("[FAIL] configuration")
    assert "'192.168.1.300' is not a valid IPv4 address" in proc.stdout

    # 192.0.2.0/24 is reserved for documentation: never an address of this machine.
    env_file.write_text(
        "SECURE=0\nPC3_IP=192.0.2.33\nPC2_IP=127.0.0.1\n"
        f"KAFKA_PORT={free_port()}\nCENTRAL_PORT={free_port()}\n"
    )
    proc = run_preflight(env_file, "--pc", "pc3")
    assert proc.returncode == 1
    (line,) = lines_of(proc, "this PC's address")
    assert (
        line.startswith("[FAIL]") and "PC3_IP=192.0.2.33 is not an address of this machine" in line
    )
    assert lines_of(proc, "kafka bootstrap")[0].startswith("[FAIL]")

    # Secure by default: without the Kafka login's password, one line saying where it is.
    secure = tmp_path / "secure.env"
    secure.write_text("PC2_IP=127.0.0.1\n")
    proc = run_preflight(secure, "--kafka-password-file", str(tmp_path / "none.password"))
    assert proc.returncode == 1
    (line,) = proc.stdout.splitlines()
    assert line.startswith("[FAIL] kafka login        no password in "), line
    assert "secrets/kafka-kafka-ui.password" in line and "SECURE=0" in line

    # A CA file that is not one: one line, exit 1, nothing checked.
    not_a_ca = tmp_path / "ca.crt"
    not_a_ca.write_text("not a certificate\n")
    for ca in (not_a_ca, tmp_path / "missing.crt"):
        proc = run_preflight(env_file, "--tls-ca", str(ca))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        (line,) = proc.stdout.splitlines()
        assert line.startswith(f"[FAIL] tls ca             cannot use {ca} as a CA: "), line
        assert "-- fix: give the ca.crt that scripts/make-certs.py wrote" in line


# --- shared.healthcheck, as the images' HEALTHCHECKs run it --------------------------------------


def healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.healthcheck", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(30),
    )


@pytest.fixture
def http_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_http_answers_by_status(http_server: int) -> None:
    ok = healthcheck("http", f"http://127.0.0.1:{http_server}/healthz")
    assert ok.returncode == 0 and ok.stdout.startswith("healthy"), ok.stdout
    degraded = healthcheck("http", f"http://127.0.0.1:{http_server}/degraded")
    assert degraded.returncode == 1 and "answered 503" in degraded.stdout
    gone = healthcheck("http", f"http://127.0.0.1:{free_port()}/healthz")
    assert gone.returncode == 1 and "did not answer" in gone.stdout
    assert healthcheck("http").returncode == 2


def test_healthcheck_listening_and_connected_read_the_socket_tables() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        # The engine's check: its listening socket, seen without connecting to it.
        assert healthcheck("listening", f"0.0.0.0:{port}").returncode == 0
        assert healthcheck("connected", f"localhost:{port}").returncode == 1
        # The monitor's check: an established connection to Central's address and port.
        client = socket.create_connection(("127.0.0.1", port))
        peer, _ = server.accept()
        try:
            ok = healthcheck("connected", f"127.0.0.1:{port}")
            assert ok.returncode == 0, ok.stdout
            assert healthcheck("connected", f"192.0.2.1:{port}").returncode == 1
        finally:
            client.close()
            peer.close()
    finally:
        server.close()
    assert healthcheck("listening", f"0.0.0.0:{port}").returncode == 1
    assert healthcheck("tcp", f"127.0.0.1:{port}").returncode == 1
    assert healthcheck("listening", "no-port").returncode == 2
