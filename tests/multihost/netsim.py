"""Simulated PCs (network namespaces) and the services the deployment runs on each of them.

PC1 runs the driver, PC2 Kafka and Central, PC3 two charging points (engine + monitor each),
with the same command lines as the per-PC compose files. Everything runs as a real process,
`ip netns exec PCn python -m ...`, from the repository root, with its output in a file.

Secured by default, as the compose files run it: TLS on Central's :5000 and admin web, and
Kafka over TLS with a SCRAM login per role and the broker's ACLs (docs/security.md, "Kafka").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from secured import Keys

import network_config
from helpers import scaled, wait_for
from procs import REPO_ROOT, ServiceProcess

NETNS_SH = REPO_ROOT / "scripts" / "netns.sh"
KAFKA_SH = REPO_ROOT / "scripts" / "kafka.sh"
PROBE = Path(__file__).resolve().parent / "probe.py"
PCS = ("pc1", "pc2", "pc3")
CP_IDS = ("CP001", "CP002")
# The compose files' engines plug 1 s after authorisation and unplug 3 s after plugging.
AUTO_PLUG, AUTO_UNPLUG = "1", "3"
# The demo seed's admin account, for Central's API (docs/web-auth.md).
ADMIN = ("admin", "admin")
# (what was measured, seconds, the bound it must stay under), printed at the end of the run.
TIMINGS: list[tuple[str, float, float]] = []


def _run(args: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def netns_names() -> list[str]:
    return [line.split()[0] for line in _run(["ip", "netns", "list"], 10).splitlines() if line]


class SimulatedNetwork:
    """PC1..PC3 as namespaces PREFIX-pc1..3 on a bridge in PREFIX-br (scripts/netns.sh)."""

    STALE = re.compile(r"^evt\d+-(pc[123]|br)$")

    def __init__(self, prefix: str, subnet: str) -> None:
        self.prefix = prefix
        self.subnet = subnet
        self.env = {**os.environ, "EV_NETNS_SUBNET": subnet}

    def ns(self, pc: str) -> str:
        return f"{self.prefix}-{pc}"

    def ip(self, pc: str) -> str:
        return f"{self.subnet}.{PCS.index(pc) + 1}"

    def _netns_sh(self, *args: str) -> str:
        return _run([str(NETNS_SH), *args], scaled(60), self.env)

    @classmethod
    def clean_stale(cls) -> str:
        """Remove the namespaces of an earlier run that crashed (its pid is gone)."""
        return _run([str(NETNS_SH), "clean-stale"], scaled(60))

    def up(self) -> None:
        self._netns_sh("up", self.prefix)

    def down(self) -> None:
        self._netns_sh("down", self.prefix)

    def cut(self, pc: str) -> None:
        """Take a PC off the network: its port on the bridge goes down (like a pulled cable)."""
        self._netns_sh("cut", pc, self.prefix)

    def mend(self, pc: str) -> None:
        self._netns_sh("mend", pc, self.prefix)

    def mend_all(self) -> None:
        for pc in PCS:
            self.mend(pc)

    def namespaces(self) -> list[str]:
        """Our namespaces that exist now."""
        return [name for name in netns_names() if name.startswith(self.prefix + "-")]

    def pids(self) -> dict[str, list[int]]:
        """Processes still running in each of our namespaces."""
        found = {}
        for name in self.namespaces():
            pids = [int(p) for p in _run(["ip", "netns", "pids", name], 10).split()]
            if pids:
                found[name] = pids
        return found


class HostProcess(ServiceProcess):
    """A ServiceProcess run inside one simulated PC (`ip netns exec` keeps the same pid)."""

    def __init__(self, netns: str, name: str, args: list[str], workdir: Path) -> None:
        super().__init__(name, args, workdir)
        self.netns = netns

    @property
    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, sys.executable, *self.args]

    def start(self) -> HostProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self


class Probe:
    """Reads Central's HTTP API from inside one PC, through probe.py living in that PC.

    With `ca`, it verifies https:// and wss:// servers against that CA certificate.
    """

    def __init__(self, netns: str, ca: Path | None = None) -> None:
        self.netns = netns
        self.ca = ca
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> Probe:
        self.proc = await asyncio.create_subprocess_exec(
            *("ip", "netns", "exec", self.netns, sys.executable, str(PROBE), "2"),
            *([str(self.ca)] if self.ca else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=8 * 1024 * 1024,
        )
        return self

    async def _ask(self, request: dict[str, str]) -> tuple[int | None, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        async with self._lock:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            await self.proc.stdin.drain()
            async with asyncio.timeout(scaled(10)):
                line = await self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the probe in {self.netns} exited")
        answer = json.loads(line)
        if "error" in answer:
            return None, answer["error"]
        return answer["status"], answer["body"]

    async def get(self, url: str) -> tuple[int | None, Any]:
        """(status, body) of a GET, or (None, error text) when nothing answered.

        The GET carries the session cookie of the last login to that server, if any.
        """
        return await self._ask({"get": url})

    async def login(self, base_url: str, user: str, password: str) -> tuple[int | None, Any]:
        """Log in at Central's admin web at `base_url`: later GETs there carry its cookie.

        (204, Central's login answer) on success, else (None, why not).
        """
        return await self._ask({"login": base_url, "user": user, "password": password})

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(5):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None


class CentralView:
    """Central's web interface (/api/cps, /api/sessions, /healthz) as seen from one PC.

    The API needs an admin session: the view logs in at its first call, and again when
    Central answers 401 (a restarted Central has forgotten its sessions).
    """

    def __init__(self, probe: Probe, base_url: str, admin: tuple[str, str] = ADMIN) -> None:
        self.probe = probe
        self.base_url = base_url
        self.admin = admin
        self.logged_in = False

    async def login(self) -> None:
        status, body = await self.probe.login(self.base_url, *self.admin)
        assert status == 204, (self.probe.netns, self.base_url, self.admin[0], body)
        self.logged_in = True

    async def api(self, path: str) -> Any:
        if not self.logged_in:
            await self.login()
        status, body = await self.probe.get(self.base_url + path)
        if status == 401:
            await self.login()
            status, body = await self.probe.get(self.base_url + path)
        assert status == 200, (self.probe.netns, path, status, body)
        return body

    async def healthy(self) -> bool:
        status, _ = await self.probe.get(self.base_url + "/healthz")
        return status == 200

    async def cp_states(self) -> dict[str, str]:
        return {cp["id"]: cp["state"] for cp in await self.api("/api/cps")}

    async def session(self, session_id: str) -> dict[str, Any] | None:
        for row in await self.api("/api/sessions?limit=50"):
            if row["id"] == session_id:
                return dict(row)
        return None

    async def wait_states(
        self, cp_ids: tuple[str, ...], state: str, timeout: float, interval: float = 0.1
    ) -> float:
        """Wait until every CP in `cp_ids` shows `state`; return the seconds it took."""
        started = time.monotonic()
        last: dict[str, str] = {}

        async def reached() -> bool:
            last.update(await self.cp_states())
            return all(last.get(cp_id) == state for cp_id in cp_ids)

        try:
            await wait_for(reached, timeout, interval=interval)
        except AssertionError:
            raise AssertionError(f"{cp_ids} never all {state} within {timeout}s: {last}") from None
        return time.monotonic() - started


class MultiHostDeployment:
    """The deployment across PC1-PC3: the same commands as the compose files, on our hosts.

    `secure` (the default, as network_config.py's SECURE=1): certificates, the secured Kafka
    and its logins are made under `workdir`/keys, and every command line uses them.
    """

    def __init__(self, net: SimulatedNetwork, workdir: Path, secure: bool = True) -> None:
        self.net = net
        self.workdir = workdir
        self.secure = secure
        self.config = network_config.load(
            {
                **{"PC1_IP": net.ip("pc1"), "PC2_IP": net.ip("pc2"), "PC3_IP": net.ip("pc3")},
                "SECURE": "1" if secure else "0",
            }
        )
        self.db_path = workdir / "central.db"
        self.keys = Keys(workdir / "keys")
        self.kafka_env = {
            **os.environ,
            "EV_KAFKA_LISTEN_HOST": self.config["PC2_IP"],
            "EV_KAFKA_ADVERTISED_HOST": self.config["PC2_IP"],
            "EV_KAFKA_RUN_DIR": str(workdir / "kafka"),
            "PYTHON": sys.executable,
            **({"EV_KAFKA_SECURE_DIR": str(self.keys.dir)} if secure else {}),
        }
        self.processes: list[HostProcess] = []
        self.central: HostProcess | None = None
        self.engines: dict[str, HostProcess] = {}
        self.monitors: dict[str, HostProcess] = {}
        self._names: dict[str, int] = {}

    # --- the command lines (also compared with the compose files) ------------------------------

    @property
    def broker(self) -> str:
        return self.config["KAFKA_BOOTSTRAP"]

    def engine_port(self, cp_id: str) -> int:
        return int(self.config["ENGINE_BASE_PORT"]) + CP_IDS.index(cp_id)

    def kafka_login(self, login: str) -> list[str]:
        """The flags that log a service in to the secured Kafka as `login` (none if plain)."""
        return self.keys.kafka_flags(login) if self.secure else []

    def central_args(self) -> list[str]:
        tls = ["--tls-cert", str(self.keys.cert("central"))]
        tls += ["--tls-key", str(self.keys.key("central"))]
        return [
            *("-m", "EV_Central", "--port", self.config["CENTRAL_PORT"]),
            *("--broker", self.broker, "--db", str(self.db_path)),
            *("--http-port", self.config["CENTRAL_HTTP_PORT"], "--listen-host", "0.0.0.0"),
            *("--console", "log", "--demo"),
            *(tls if self.secure else []),
            *self.kafka_login("central"),
        ]

    def engine_args(self, cp_id: str) -> list[str]:
        listen = f"{self.config['PC3_IP']}:{self.engine_port(cp_id)}"
        return [
            *("-m", "EV_CP_E", "--broker", self.broker, "--listen", listen),
            *("--auto-plug", AUTO_PLUG, "--auto-unplug", AUTO_UNPLUG),
            *("--secret", f"demo-secret-{cp_id}"),
            *self.kafka_login(f"cp-{cp_id}"),
        ]

    def monitor_args(self, cp_id: str) -> list[str]:
        engine = f"{self.config['PC3_IP']}:{self.engine_port(cp_id)}"
        return [
            *("-m", "EV_CP_M", "--engine", engine, "--central", self.config["CENTRAL_ADDRESS"]),
            *("--cp-id", cp_id, "--broker", self.broker),
            *("--secret", f"demo-secret-{cp_id}"),
            *(["--tls-ca", str(self.keys.ca)] if self.secure else []),
            *self.kafka_login("monitor"),
        ]

    def driver_args(self, driver_id: str, *flags: str) -> list[str]:
        password = ("--password", "pass" + driver_id.removeprefix("user"))
        return [
            *("-m", "EV_Driver", "--broker", self.broker, "--driver-id", driver_id),
            *password,
            *self.kafka_login("driver"),
            *flags,
        ]

    # --- processes ------------------------------------------------------------------------------

    def _start(self, pc: str, name: str, args: list[str]) -> HostProcess:
        count = self._names[name] = self._names.get(name, 0) + 1
        label = name if count == 1 else f"{name}-{count}"
        proc = HostProcess(self.net.ns(pc), label, args, self.workdir)
        self.processes.append(proc)
        return proc.start()

    def make_keys(self) -> None:
        """Each server's certificate, valid for the address its clients dial, and Kafka's admin
        password. The dashboards' are made as for a deployment, though no test here serves one."""
        self.keys.make(
            {
                "kafka": [self.config["PC2_IP"]],
                "central": ["central", self.config["PC2_IP"]],
                "driver-dashboard": [self.config["PC1_IP"]],
                "site-dashboard": [self.config["PC3_IP"]],
            }
        )

    def start_kafka(self) -> None:
        """Kafka on PC2; secured, the keys are made first and the logins once it runs."""
        if self.secure and not self.keys.ca.exists():
            self.make_keys()
        _run(
            ["ip", "netns", "exec", self.net.ns("pc2"), str(KAFKA_SH), "start"]
            + [self.config["KAFKA_PORT"]],
            scaled(300),
            self.kafka_env,
        )
        if self.secure:
            self.keys.make_logins(self.net.ns("pc2"), self.broker, CP_IDS)

    def stop_kafka(self) -> None:
        _run(
            ["ip", "netns", "exec", self.net.ns("pc2"), str(KAFKA_SH), "stop"]
            + [self.config["KAFKA_PORT"]],
            scaled(60),
            self.kafka_env,
        )

    def start_central(self) -> HostProcess:
        self.central = self._start("pc2", "central", self.central_args())
        return self.central

    def start_cp(self, cp_id: str) -> None:
        self.engines[cp_id] = self._start("pc3", f"engine-{cp_id}", self.engine_args(cp_id))
        self.monitors[cp_id] = self._start("pc3", f"monitor-{cp_id}", self.monitor_args(cp_id))

    def start_driver(self, driver_id: str, *flags: str) -> HostProcess:
        args = self.driver_args(driver_id, *flags, "--json")
        return self._start("pc1", f"driver-{driver_id}", args)

    def stop_drivers(self) -> None:
        for proc in self.processes:
            if proc.name.startswith("driver-"):
                proc.stop()

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    @property
    def ca(self) -> Path | None:
        """The CA that clients verify Central with (None without TLS)."""
        return self.keys.ca if self.secure else None

    def central_url(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.config['PC2_IP']}:{self.config['CENTRAL_HTTP_PORT']}"

    # --- Central's database, read from the shared filesystem -------------------------------------

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=10)) as db:
            return db.execute(sql, params).fetchall()

    def balance(self, driver_id: str) -> int:
        return int(self.query("SELECT balance_cents FROM users WHERE id = ?", driver_id)[0][0])
