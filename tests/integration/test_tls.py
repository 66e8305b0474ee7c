"""TLS on Central's :5000 and admin web and on the two dashboards, with real processes.

One CA and its certificates come from scripts/make-certs.py (a real run), a second CA plays
a stranger's. One Central with TLS serves every check of the module: monitors that trust the
CA, that speak plain TCP, or that trust the other CA; /healthz over https and not over http;
ctl over wss. The dashboards get their own certificates.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import subprocess
import sys
import urllib.error
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from helpers import free_port, scaled, wait_for
from procs import REPO_ROOT, Deployment, ServiceProcess, http_get
from shared.tls import client_context

# The async tests share the module's event loop, as the module-scoped Central does.
in_module_loop = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True)
class Certs:
    dir: Path
    other_ca: Path  # a CA that signed none of these

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


def make_certs(out: Path, *servers: str) -> None:
    flags = [arg for server in servers for arg in ("--server", server)]
    proc = subprocess.run(
        [sys.executable, "scripts/make-certs.py", "--out", str(out), *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    out = tmp_path_factory.mktemp("certs")
    make_certs(
        out,
        "central=central,localhost,127.0.0.1",
        "driver-dashboard=localhost,127.0.0.1",
        "site-dashboard=localhost,127.0.0.1",
    )
    other = tmp_path_factory.mktemp("other-ca")
    make_certs(other, "stranger=localhost,127.0.0.1")
    return Certs(out, other / "ca.crt")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def central(
    kafka_bootstrap: str, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    """Central with TLS on both ports, shared by the module's tests."""
    deployment = Deployment(
        kafka_bootstrap,
        tmp_path_factory.mktemp("central"),
        tls_ca=certs.dir / "ca.crt",
        tls_cert=certs["central.crt"],
        tls_key=certs["central.key"],
    )
    try:
        await deployment.start_central()
        yield deployment
    finally:
        deployment.stop_all()


def plain_get(port: int, path: str = "/healthz") -> None:
    """A plain-HTTP GET to a TLS port: it must not get an HTTP answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=scaled(5))
    try:
        conn.request("GET", path)
        conn.getresponse()
    finally:
        conn.close()


@pytest.mark.kafka
@pytest.mark.e2e
@in_module_loop
async def test_only_monitors_that_verify_central_get_in(central: Deployment, certs: Certs) -> None:
    assert central.central is not None
    central_log = central.central.output
    assert re.search(r"listening for monitors on 127\.0\.0\.1:\d+ \(TLS\)", central_log)
    assert f"admin web on https://127.0.0.1:{central.http_port}/" in central_log

    for cp_id in ("CP001", "CP002", "CP003"):
        central.start_engine(cp_id)
    trusting = central.start_monitor("CP001", "--tls-ca", certs["ca.crt"])
    plain = central.start_monitor("CP002")
    stranger = central.start_monitor("CP003", "--tls-ca", str(certs.other_ca))

    await central.wait_state("CP001", "ACTIVADO", timeout=30)
    await trusting.wait_output("Central link up: authenticated")
    await stranger.wait_output(
        r"cannot reach Central at 127\.0\.0\.1:\d+ \(TLS: certificate verify failed: "
        r"unable to get local issuer certificate\); retrying"
    )
    # Plain TCP on the TLS port: the handshake fails, nothing is ever authenticated.
    await plain.wait_output(r"cannot reach Central at 127\.0\.0\.1:\d+; retrying")
    for monitor in (plain, stranger):
        assert monitor.running, monitor.output
        assert "Central link up" not in monitor.output
        assert "Traceback" not in monitor.output
    states = await central.cp_states()
    assert (states["CP002"], states["CP003"]) == ("DESCONECTADO", "DESCONECTADO")


@pytest.mark.kafka
@pytest.mark.e2e
@in_module_loop
async def test_admin_web_answers_https_with_the_ca_only(central: Deployment, certs: Certs) -> None:
    url = central.url("/healthz")
    assert url.startswith("https://")
    status, body = await asyncio.to_thread(http_get, url, 5, None, client_context(certs["ca.crt"]))
    assert (status, body["status"]) == (200, "ok")
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncio.to_thread(http_get, url, 5, None, client_context(str(certs.other_ca)))
    with pytest.raises((OSError, http.client.HTTPException)):
        await asyncio.to_thread(plain_get, central.http_port)

    # The images' health check: https trusting the CA, or the server's own certificate.
    async def healthcheck(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shared.healthcheck",
            "http",
            *args,
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    assert (await healthcheck(url, "--ca", certs["ca.crt"]))[0] == 0
    assert (await healthcheck(url, "--ca", certs["central.crt"]))[0] == 0
    code, out = await healthcheck(url, "--ca", str(certs.other_ca))
    assert code == 1 and "TLS: certificate verify failed" in out
    code, out = await healthcheck(url.replace("https:", "http:"))
    assert code == 1 and "did not answer" in out

    # ctl logs in and commands over wss, verified with the CA; without it, it cannot connect.
    assert "ok: stop CP001" in await central.ctl("stop", "CP001")
    await central.wait_state("CP001", "PARADO")
    assert "ok: resume CP001" in await central.ctl("resume", "CP001")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "EV_Central",
        "ctl",
        "--central",
        f"127.0.0.1:{central.http_port}",
        "--tls-ca",
        str(certs.other_ca),
        "stop",
        "CP001",
        cwd=REPO_ROOT,
        env={"EV_ADMIN_PASSWORD": central.admin_password, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out_bytes, _ = await proc.communicate()
    assert proc.returncode == 1
    assert out_bytes.decode().strip() == (
        f"error: cannot reach Central at 127.0.0.1:{central.http_port}: "
        "TLS: certificate verify failed: unable to get local issuer certificate"
    )


@pytest.mark.kafka
@pytest.mark.e2e
@in_module_loop
async def test_both_dashboards_serve_https(
    kafka_bootstrap: str, certs: Certs, tmp_path: Path
) -> None:
    ca = client_context(certs["ca.crt"])
    dashboards = []
    for package, name, log_name in (
        ("EV_Driver", "driver-dashboard", "driver dashboard"),
        ("EV_CP_M", "site-dashboard", "site dashboard"),
    ):
        port = free_port()
        proc = ServiceProcess(
            name,
            [
                "-m",
                package,
                "dashboard",
                "--broker",
                kafka_bootstrap,
                "--http-port",
                str(port),
                "--listen-host",
                "127.0.0.1",
                "--tls-cert",
                certs[f"{name}.crt"],
                "--tls-key",
                certs[f"{name}.key"],
            ],
            tmp_path,
        ).start()
        dashboards.append((proc, port, log_name))
    try:
        for proc, port, log_name in dashboards:
            url = f"https://127.0.0.1:{port}/healthz"

            async def healthy(url: str = url) -> bool:
                try:
                    status, _ = await asyncio.to_thread(http_get, url, 2, None, ca)
                except OSError:
                    return False
                return status == 200

            await wait_for(healthy, 30, interval=0.3, message=f"{url}:\n{proc.output[-2000:]}")
            assert f"{log_name} on https://127.0.0.1:{port}/" in proc.output
            with pytest.raises((OSError, http.client.HTTPException)):
                await asyncio.to_thread(plain_get, port)
    finally:
        for proc, _, _ in dashboards:
            proc.stop()


def test_half_or_bad_tls_settings_stop_a_service_with_one_line(
    certs: Certs, tmp_path: Path
) -> None:
    crt, key = certs["central.crt"], certs["central.key"]
    wrong_key = certs["site-dashboard.key"]
    central = ["EV_Central", "--broker", "127.0.0.1:9", "--db", str(tmp_path / "x.db")]
    monitor = ["EV_CP_M", "--engine", "127.0.0.1:9", "--central", "127.0.0.1:9"]
    monitor += ["--cp-id", "CP001", "--secret", "x"]
    driver = ["EV_Driver", "dashboard", "--broker", "127.0.0.1:9"]
    site = ["EV_CP_M", "dashboard", "--broker", "127.0.0.1:9"]
    cases = [
        ([*central, "--tls-cert", crt], "--tls-cert needs --tls-key too"),
        ([*central, "--tls-cert", crt, "--tls-key", wrong_key], "is not the key of certificate"),
        ([*monitor, "--tls-ca", str(tmp_path / "nope.crt")], "nope.crt: no such file"),
        ([*driver, "--tls-key", key], "--tls-key needs --tls-cert too"),
        ([*site, "--tls-cert", key, "--tls-key", key], "holds no certificate"),
    ]
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=scaled(30),
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr)
    assert not (tmp_path / "x.db").exists(), "Central stopped before opening its database"
