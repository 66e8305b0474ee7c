"""Real service processes for end-to-end tests: start, feed stdin, read output, kill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from EV_Central.ctl import admin_login
from helpers import free_port, scaled, wait_for
from shared.tls import client_context
from tools.faketime import shifted_clock

REPO_ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    """One service started as `python -m PACKAGE ...`, its output captured to a file."""

    def __init__(
        self,
        name: str,
        args: list[str],
        workdir: Path,
        env: dict[str, str] | None = None,
        *,
        clock: str | None = None,
    ) -> None:
        """`clock` runs the process with its clock shifted by libfaketime ("+60s", "-60s")."""
        self.name = name
        self.args = args
        self.clock = clock
        self.log_path = workdir / f"{name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        log = self.log_path.open("ab")
        # The process itself runs with the shifted clock (not as a child of `faketime`, which
        # a kill would leave running).
        shifted = shifted_clock(self.clock) if self.clock else {}
        self.proc = subprocess.Popen(
            [sys.executable, *self.args],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **shifted},
        )
        log.close()
        return self

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    async def wait_output(self, pattern: str, timeout: float = 10, start: int = 0) -> re.Match[str]:
        """Wait until `pattern` (a regex) appears in the output after offset `start`."""
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return regex.search(self.output, start)

        try:
            return await wait_for(found, timeout)
        except AssertionError:
            raise AssertionError(
                f"{self.name}: {pattern!r} not seen; output:\n{self.output[-3000:]}"
            ) from None

    def json_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.output.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return events

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)
            self.proc.wait(timeout=scaled(15))

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop; return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=scaled(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        return self.proc.returncode

    async def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            await wait_for(lambda: self.proc.poll() is not None, timeout)
        except AssertionError:
            raise AssertionError(
                f"{self.name} did not exit; output:\n{self.output[-3000:]}"
            ) from None
        return self.proc.returncode


def http_get(
    url: str,
    timeout: float = 5,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """GET `url` (https verified with `context`): the status and the JSON body."""
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def wait_healthy(proc: ServiceProcess, port: int) -> None:
    """Wait until the dashboard `proc` answers 200 on /healthz (at most 60 s, scaled)."""

    async def healthy() -> bool:
        try:
            status, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/healthz", 2)
        except OSError:
            return False
        return bool(status == 200)

    await wait_for(healthy, 60, interval=0.3, message=f"dashboard not healthy:\n{proc.output}")


# A driver started with any of these flags logs in by itself.
LOGIN_FLAGS = ("--password", "--token-file")


class Deployment:
    """A Central with its own database plus any number of CPs and drivers, all real processes."""

    def __init__(
        self, broker: str, workdir: Path, *, tls_ca: Path | None = None, **central_flags: Any
    ) -> None:
        """`central_flags` become Central's flags (tls_cert=PATH -> --tls-cert PATH). With
        tls_cert, url/api/ctl and start_cp's monitors use TLS and verify with `tls_ca`."""
        self.broker = broker
        self.workdir = workdir
        self.tls = "tls_cert" in central_flags
        self.tls_ca = tls_ca
        self.tls_context = client_context(str(tls_ca) if tls_ca else None) if self.tls else None
        self.db_path = workdir / "central.db"
        # Every port this deployment hands out is its own: free_port() only finds a port free
        # now, and a later call could find the same one again before anything listens on it.
        self._ports: set[int] = set()
        self.central_port = self._port()
        self.http_port = self._port()
        self.central_flags = central_flags
        self.processes: list[ServiceProcess] = []
        self.central: ServiceProcess | None = None
        self.engines: dict[str, ServiceProcess] = {}
        self.monitors: dict[str, ServiceProcess] = {}
        self.engine_ports: dict[str, int] = {}
        self.cp_secrets: dict[str, str] = {}
        self.passwords: dict[str, str] = {}
        self.admin_password = "admin"  # the demo seed's admin (README: demo only)
        self._admin_cookie: str | None = None
        self.dashboard: ServiceProcess | None = None
        self.dashboard_port = self._port()
        # Clocks shifted with libfaketime, by process name ("central", "engine-CP001",
        # "monitor-CP001", "driver-user3", "driver-dashboard"): {"engine-CP001": "+60s"}.
        self.clocks: dict[str, str] = {}

    def _port(self) -> int:
        """A free port that no other part of this deployment was given."""
        while (port := free_port()) in self._ports:
            pass
        self._ports.add(port)
        return port

    def _add(self, proc: ServiceProcess) -> ServiceProcess:
        proc.clock = proc.clock or self.clocks.get(proc.name)
        self.processes.append(proc)
        return proc.start()

    async def start_central(self) -> ServiceProcess:
        flags = []
        for key, value in self.central_flags.items():
            flag = f"--{key.replace('_', '-')}"
            flags += [flag] if value is True else [flag, str(value)]
        self.central = self._add(
            ServiceProcess(
                "central",
                [
                    "-m",
                    "EV_Central",
                    "--port",
                    str(self.central_port),
                    "--broker",
                    self.broker,
                    "--db",
                    str(self.db_path),
                    "--http-port",
                    str(self.http_port),
                    "--listen-host",
                    "127.0.0.1",
                    "--console",
                    "log",
                    "--demo",
                    *flags,
                ],
                self.workdir,
            )
        )
        await wait_for(
            self._healthy,
            60,
            interval=0.3,
            message="Central not healthy:\n" + self.central.output[-3000:],
        )
        return self.central

    async def _healthy(self) -> bool:
        try:
            status, _ = await asyncio.to_thread(
                http_get, self.url("/healthz"), 2, None, self.tls_context
            )
        except OSError:
            return False
        return status == 200

    def prepare_db(self, *statements: str) -> None:
        """Create the seeded database now and change it before Central starts."""
        subprocess.run(
            [sys.executable, "init_db.py", "--db", str(self.db_path)],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
        with sqlite3.connect(self.db_path) as db:
            for statement in statements:
                db.execute(statement)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read Central's database directly (SQLite allows a reader beside the writer)."""
        with contextlib.closing(sqlite3.connect(self.db_path)) as db:
            return db.execute(sql, params).fetchall()

    def balance(self, driver_id: str) -> int:
        return int(self.query("SELECT balance_cents FROM users WHERE id = ?", driver_id)[0][0])

    async def ctl(self, *args: str, password: str | None = None, check: bool = True) -> str:
        """Run `python -m EV_Central ctl ARGS` as the admin (its password in the environment)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EV_ADMIN_")}
        env["EV_ADMIN_PASSWORD"] = self.admin_password if password is None else password
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "EV_Central",
            "ctl",
            "--central",
            f"127.0.0.1:{self.http_port}",
            *self.tls_flags(),
            *args,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        out, _ = await proc.communicate()
        if check:
            assert proc.returncode == 0, out.decode()
        return out.decode()

    async def admin_cookie(self, user: str = "admin", password: str | None = None) -> str:
        """A session cookie ("name=token") of `user` at Central's admin web, logged in now."""
        secret = self.admin_password if password is None else password
        return await admin_login(
            "127.0.0.1", self.http_port, user, secret, scaled(10), self.tls_context
        )

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}{path}"

    def tls_flags(self) -> tuple[str, ...]:
        """What a client of this Central (monitor, ctl) needs to verify it: --tls-ca PATH."""
        return ("--tls-ca", str(self.tls_ca)) if self.tls and self.tls_ca else ()

    async def api(self, path: str) -> Any:
        """GET Central's JSON API as the demo admin (logged in again after a restart)."""
        for _ in range(2):
            if self._admin_cookie is None:
                self._admin_cookie = await self.admin_cookie()
            headers = {"Cookie": self._admin_cookie}
            status, body = await asyncio.to_thread(
                http_get, self.url(path), 5, headers, self.tls_context
            )
            if status != 401:
                break
            self._admin_cookie = None  # Central restarted: its sessions are gone
        assert status == 200, (path, status, body)
        return body

    async def cp_states(self) -> dict[str, str]:
        return {cp["id"]: cp["state"] for cp in await self.api("/api/cps")}

    async def wait_state(self, cp_id: str, state: str, timeout: float = 10) -> None:
        async def reached() -> bool:
            return (await self.cp_states()).get(cp_id) == state

        await wait_for(reached, timeout, interval=0.2, message=f"{cp_id} never became {state}")

    def start_engine(self, cp_id: str, *flags: str) -> ServiceProcess:
        if cp_id not in self.engine_ports:  # a restarted engine keeps its port
            self.engine_ports[cp_id] = self._port()
        port = self.engine_ports[cp_id]
        proc = self._add(
            ServiceProcess(
                f"engine-{cp_id}",
                [
                    "-m",
                    "EV_CP_E",
                    "--broker",
                    self.broker,
                    "--listen",
                    f"127.0.0.1:{port}",
                    *(
                        ()
                        if any(f.startswith("--secret") for f in flags)
                        else ("--secret", self.secret(cp_id))
                    ),
                    *flags,
                ],
                self.workdir,
            )
        )
        self.engines[cp_id] = proc
        return proc

    def secret(self, cp_id: str) -> str:
        """The CP's secret: the demo seed's, or the one given when a test registered it."""
        return self.cp_secrets.get(cp_id, f"demo-secret-{cp_id}")

    def start_monitor(self, cp_id: str, *flags: str) -> ServiceProcess:
        port = self.engine_ports[cp_id]
        proc = self._add(
            ServiceProcess(
                f"monitor-{cp_id}",
                [
                    "-m",
                    "EV_CP_M",
                    "--engine",
                    f"127.0.0.1:{port}",
                    "--central",
                    f"127.0.0.1:{self.central_port}",
                    "--cp-id",
                    cp_id,
                    *(
                        ()
                        if any(f.startswith("--secret") for f in flags)
                        else ("--secret", self.secret(cp_id))
                    ),
                    *flags,
                ],
                self.workdir,
            )
        )
        self.monitors[cp_id] = proc
        return proc

    async def start_cp(self, cp_id: str, *engine_flags: str) -> None:
        self.start_engine(cp_id, *engine_flags)
        self.start_monitor(cp_id, *self.tls_flags())
        await self.wait_state(cp_id, "ACTIVADO", timeout=30)

    def login(self, driver_id: str) -> tuple[str, ...]:
        """Flags that log a driver in: its demo password (user3 -> pass3), or one a test set."""
        password = self.passwords.get(driver_id, "pass" + driver_id.removeprefix("user"))
        return ("--password", password)

    def start_driver(
        self, driver_id: str, *flags: str, name: str | None = None, command: str | None = None
    ) -> ServiceProcess:
        """The driver app (or `command`, e.g. "login"), logged in with its demo password."""
        return self._add(
            ServiceProcess(
                name or f"driver-{driver_id}",
                [
                    "-m",
                    "EV_Driver",
                    *((command,) if command else ()),
                    "--broker",
                    self.broker,
                    "--driver-id",
                    driver_id,
                    "--json",
                    *(
                        ()
                        if any(f.startswith(LOGIN_FLAGS) for f in flags)
                        else self.login(driver_id)
                    ),
                    *flags,
                ],
                self.workdir,
            )
        )

    async def start_dashboard(self, *flags: str) -> ServiceProcess:
        """The driver dashboard (`EV_Driver dashboard`) on dashboard_port, once healthy."""
        self.dashboard = self._add(
            ServiceProcess(
                "driver-dashboard",
                [
                    "-m",
                    "EV_Driver",
                    "dashboard",
                    "--broker",
                    self.broker,
                    "--http-port",
                    str(self.dashboard_port),
                    "--listen-host",
                    "127.0.0.1",
                    *flags,
                ],
                self.workdir,
            )
        )
        dashboard = self.dashboard

        async def healthy() -> bool:
            if not dashboard.running:
                raise AssertionError(f"dashboard exited:\n{dashboard.output[-3000:]}")
            try:
                url = f"http://127.0.0.1:{self.dashboard_port}/healthz"
                status, _ = await asyncio.to_thread(http_get, url, 2)
            except OSError:
                return False
            return status == 200

        await wait_for(healthy, 60, interval=0.3, message="the driver dashboard never got healthy")
        return dashboard

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
