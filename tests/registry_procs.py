"""EV_Registry for tests: certificates, the registry as a real process, and a REST client."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from helpers import free_port, scaled, wait_for
from procs import REPO_ROOT, Deployment, ServiceProcess


def make_certs(out: Path) -> Path:
    """A local CA and certificates for Central and the registry on 127.0.0.1 (a real run of
    scripts/make-certs.py); returns the directory."""
    servers = ["central=localhost,127.0.0.1", "registry=localhost,127.0.0.1"]
    proc = subprocess.run(
        [sys.executable, "scripts/make-certs.py", "--out", str(out)]
        + [arg for server in servers for arg in ("--server", server)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert proc.returncode == 0, proc.stderr
    return out


class Registry:
    """`python -m EV_Registry` over HTTPS in front of a Deployment's Central, and its client."""

    def __init__(self, central: Deployment, certs: Path) -> None:
        self.central = central
        self.certs = certs
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        self.proc: ServiceProcess | None = None

    async def start(self) -> Registry:
        central_ca = ("--central-ca", str(self.central.tls_ca)) if self.central.tls else ()
        self.proc = self.central._add(
            ServiceProcess(
                "registry",
                [
                    "-m",
                    "EV_Registry",
                    "--central",
                    f"127.0.0.1:{self.central.http_port}",
                    *central_ca,
                    "--http-port",
                    str(self.port),
                    "--listen-host",
                    "127.0.0.1",
                    "--tls-cert",
                    str(self.certs / "registry.crt"),
                    "--tls-key",
                    str(self.certs / "registry.key"),
                ],
                self.central.workdir,
            )
        )
        proc = self.proc

        async def healthy() -> bool:
            if not proc.running:
                raise AssertionError(f"the registry exited:\n{proc.output[-3000:]}")
            try:
                status, _ = await self.call("GET", "/healthz")
            except OSError:
                return False
            return status == 200

        await wait_for(healthy, 30, interval=0.2, message="the registry never answered")
        return self

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        """One HTTPS request; the status and the JSON answer (None when there is none)."""
        return await asyncio.to_thread(self._call, method, path, body, token, raw)

    def _call(
        self, method: str, path: str, body: Any, token: str | None, raw: bytes | None
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, timeout=scaled(20), context=self.context
        )
        try:
            conn.request(method, path, body=data, headers=headers)
            reply = conn.getresponse()
            text = reply.read()
        finally:
            conn.close()
        return reply.status, json.loads(text) if text else None

    async def login(self, user: str = "admin", password: str = "admin") -> str:
        status, answer = await self.call(
            "POST", "/auth/login", {"username": user, "password": password}
        )
        assert status == 200, answer
        return str(answer["access_token"])


@asynccontextmanager
async def central_with_registry(
    bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Registry]:
    """A Central with TLS and a registry in front of it, stopped at the end."""
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    central = Deployment(
        bootstrap,
        tmp_path_factory.mktemp("central"),
        tls_ca=certs / "ca.crt",
        tls_cert=str(certs / "central.crt"),
        tls_key=str(certs / "central.key"),
    )
    try:
        await central.start_central()
        yield await Registry(central, certs).start()
    finally:
        central.stop_all()
