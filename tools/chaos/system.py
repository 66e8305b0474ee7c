"""The network under test: Kafka, Central (or an HA pair), real CPs and drivers, the fleet.

Every part is a real process started the way an operator starts it, its output in a log file of
its own (a restarted process appends to the same file, so a driver app's tickets and an
engine's screen survive its deaths). `System` starts them, kills, pauses and restarts them for
the faults, and keeps the drivers asking for supplies.

With `Hosts` (--net) they run on three simulated PCs, as deployed: Kafka, Central and the fleet
simulator on PC2, where the tool itself runs, the driver apps on PC1 and the real CPs on PC3,
each started through `ip netns exec` (the same pid: a kill or a pause reaches it) and reaching
the others at the PCs' addresses, so that the network between the PCs can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.faketime import shifted_clock
from tools.ports import free_port, free_port_run

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "scripts" / "kafka.sh"
NETNS_SH = REPO / "scripts" / "netns.sh"
DEMO_ADMIN_PASSWORD = "admin"  # the demo seed's (README: demo only)
STOP_WAIT = 20.0
# A broker that exits while starting on its data (it happened to 8 of 53 restarts of a long
# run) is started again: it then came up.
BROKER_START_TRIES = 4
BROKER_RETRY_PAUSE = 2.0
PCS = ("pc1", "pc2", "pc3")
NO_SUCH_CP = "CP000"  # no CP of the run has this id (CP001.., SIM0001..)

log = logging.getLogger(__name__)


class SystemError_(RuntimeError):
    """A part could not be started (the run cannot go on)."""


@dataclass(frozen=True)
class Hosts:
    """The simulated PCs of a --net run (scripts/netns.sh): PREFIX-pc1..3 on 10.X.Y.1..3."""

    prefix: str
    subnet: str  # the first three numbers of the PCs' addresses

    @classmethod
    def for_this_run(cls) -> Hosts:
        """Names of this process's own (evc<pid>: `netns.sh clean-stale` removes them once the
        pid is gone), on a subnet apart from the multi-host tests' 10.231.x."""
        pid = os.getpid()
        return cls(f"evc{pid}", f"10.232.{pid % 250 + 1}")

    @classmethod
    def parse(cls, text: str) -> Hosts:
        """From `as_arg`'s form, PREFIX,SUBNET."""
        prefix, _, subnet = text.partition(",")
        return cls(prefix, subnet)

    def as_arg(self) -> str:
        return f"{self.prefix},{self.subnet}"

    def ns(self, pc: str) -> str:
        return f"{self.prefix}-{pc}"

    def ip(self, pc: str) -> str:
        return f"{self.subnet}.{PCS.index(pc) + 1}"

    def netns_sh(self, *args: str) -> str:
        """scripts/netns.sh ARGS for these PCs; SystemError_ with its last words if it fails."""
        env = {**os.environ, "EV_NETNS_SUBNET": self.subnet, "PYTHON": sys.executable}
        done = subprocess.run(
            [str(NETNS_SH), *args], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemError_(f"netns.sh {' '.join(args)}: {done.stderr.strip()[-300:]}")
        return done.stdout.strip()

    def up(self) -> None:
        self.netns_sh("up", self.prefix)

    def down(self) -> None:
        self.netns_sh("down", self.prefix)

    def cut(self, pc: str) -> None:
        self.netns_sh("cut", pc, self.prefix)

    def mend(self, pc: str) -> None:
        self.netns_sh("mend", pc, self.prefix)

    def netem(self, pc: str, spec: str) -> None:
        self.netns_sh("netem", pc, spec, self.prefix)

    def clear(self, pc: str) -> str:
        """End a netem on `pc`; what it did ("812 packets: 160 dropped, ...")."""
        out = self.netns_sh("clear", pc, self.prefix)
        done = [line for line in out.splitlines() if line.startswith("netem: done: ")]
        return done[-1].removeprefix("netem: done: ") if done else ""


@dataclass
class Proc:
    """One service process: started, killed, paused, restarted (maybe with a shifted clock)."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    shift: str | None = None  # libfaketime's offset ("+60s"), None for the real clock
    netns: str | None = None  # the simulated PC it runs on, None for this process's
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    paused: bool = False

    def start(self, shift: str | None = None) -> None:
        self.shift = shift
        self.starts += 1
        shifted = shifted_clock(shift) if shift else {}
        on_pc = ["ip", "netns", "exec", self.netns] if self.netns else []
        with self.log.open("ab") as out:
            out.write(f"\n--- chaos: start {self.starts} {shift or ''}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [*on_pc, sys.executable, *self.argv],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **shifted},
            )
        self.paused = False

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def kill(self) -> None:
        """kill -9, and reap it."""
        if self.popen is not None and self.popen.poll() is None:
            if self.paused:
                self.popen.send_signal(signal.SIGCONT)
            self.popen.kill()
            self.popen.wait()
        self.paused = False

    def pause(self) -> bool:
        if not self.alive or self.paused:
            return False
        assert self.popen is not None
        self.popen.send_signal(signal.SIGSTOP)
        self.paused = True
        return True

    def resume(self) -> None:
        if self.paused and self.alive:
            assert self.popen is not None
            self.popen.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """SIGTERM, then kill -9 if it does not end in time."""
        self.resume()
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Broker:
    """One Kafka node (or one node of the HA run's cluster), restarted on its data."""

    index: int  # 0 for a single broker; 1..3 in a cluster
    port: int
    env: dict[str, str]
    base: int | None = None  # the cluster's base port
    up: bool = False
    paused: bool = False
    restarting: bool = False  # a restart-broker fault has it, from its stop to its start's end

    @property
    def name(self) -> str:
        return "broker" if self.base is None else f"broker-{self.index}"

    @property
    def run_dir(self) -> Path:
        """kafka.sh's directory for this node (its pid file, its broker.log)."""
        top = Path(self.env["EV_KAFKA_RUN_DIR"])
        return top if self.base is None else top / f"node{self.index}"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [str(KAFKA_SH), *args], env=self.env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemError_(f"kafka.sh {' '.join(args)} failed: {done.stderr.strip()[-500:]}")

    def start(self) -> list[str]:
        """Start the node (on its data), tried again after a pause if it exits while starting;
        the reasons of the tries that failed (none when the first did). SystemError_ when the
        last try fails too."""
        failures: list[str] = []
        while True:
            try:
                if self.base is None:
                    self._run("start", str(self.port))
                else:
                    self._run("cluster", "start-node", str(self.index), str(self.base))
            except SystemError_ as exc:
                # kafka.sh empties broker.log at each start: keep the failed one's.
                kept = self.run_dir / f"broker.log.failed-start-{len(failures) + 1}"
                with contextlib.suppress(OSError):
                    (self.run_dir / "broker.log").replace(kept)
                reason = (str(exc).splitlines() or ["?"])[-1].removeprefix("kafka.sh: ")
                failures.append(reason)
                if len(failures) >= BROKER_START_TRIES:
                    raise
                log.warning(
                    "%s did not start (try %d of %d: %s; its log: %s); again in %g s",
                    self.name,
                    len(failures),
                    BROKER_START_TRIES,
                    reason,
                    kept,
                    BROKER_RETRY_PAUSE,
                )
                time.sleep(BROKER_RETRY_PAUSE)
            else:
                self.up = True
                return failures

    def stop(self) -> None:
        self.resume()
        if self.base is None:
            self._run("stop", str(self.port))
        else:
            self._run("cluster", "stop-node", str(self.index), str(self.base))
        self.up = False

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.run_dir / "kafka.pid").read_text().split()[0])
        return None

    def pause(self) -> bool:
        pid = self.pid()
        if pid is None or not self.up or self.paused:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            self.paused = True
        return self.paused

    def resume(self) -> None:
        pid = self.pid()
        if self.paused and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.paused = False


@dataclass
class Settings:
    out: Path
    real_cps: int = 4
    drivers: int = 4
    fleet_cps: int = 200
    fleet_supplying: float = 0.3
    ha: bool = False
    auto_unplug: tuple[float, float] = (3.0, 8.0)
    hosts: Hosts | None = None  # --net: the simulated PCs, up already; None: all on loopback


class System:
    """Every part of the network, as processes, and what the faults do to them."""

    def __init__(self, settings: Settings, seed: int) -> None:
        self.settings = settings
        self.hosts = settings.hosts
        self.rng = random.Random(seed ^ 0x5EED)
        self.work = settings.out / "work"
        # A run starts afresh: an earlier run's ledgers and journals would be taken for this one.
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        # What the services keep between runs (an engine's journal, a driver app's login key)
        # is this run's own.
        os.environ["XDG_STATE_HOME"] = str(self.work / "state")
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.brokers: list[Broker] = []
        self.centrals: list[Proc] = []
        self.http_ports: list[int] = []
        self.monitor_ports: list[int] = []
        self.engines: dict[str, Proc] = {}
        self.monitors: dict[str, Proc] = {}
        self.engine_ports: dict[str, int] = {}
        self.driver_apps: dict[str, Proc] = {}
        self.fleet: Proc | None = None
        self.dbs: list[Path] = []  # each Central's database
        self.cookie = ""  # an admin session at Central's web (for /api/cps)
        self.cp_ids = [f"CP{i:03d}" for i in range(1, settings.real_cps + 1)]
        self.driver_ids = [f"user{i}" for i in range(1, settings.drivers + 1)]
        self.db = self.work / "central.db"
        self.credentials = self.work / "credentials.json"
        self.fleet_ledger = self.work / "fleet-ledger.jsonl"
        self.fleet_stop = self.work / "fleet.stop"
        self.bootstrap = ""
        self.driving = True  # drivers ask for new supplies while this holds
        self._driver_tasks: list[asyncio.Task[None]] = []
        self.requests_started = 0

    # --- paths ---------------------------------------------------------------------------

    def ledger(self, cp_id: str) -> Path:
        return self.work / f"ledger-{cp_id}.jsonl"

    def driver_log(self, driver_id: str) -> Path:
        return self.logs / f"driver-{driver_id}.log"

    def host(self, pc: str) -> str:
        """The address the parts on `pc` are reached at (the loopback without --net)."""
        return self.hosts.ip(pc) if self.hosts else "127.0.0.1"

    def netns(self, pc: str) -> str | None:
        """The namespace a part of `pc` is started in; None for PC2, the tool's own."""
        return self.hosts.ns(pc) if self.hosts and pc != "pc2" else None

    @property
    def admin(self) -> str:
        """Central's admin web, for the tool and the fleet, both beside it on PC2."""
        return f"127.0.0.1:{self.active_http()}"

    @property
    def central_addresses(self) -> str:
        return ",".join(f"{self.host('pc2')}:{p}" for p in self.monitor_ports)

    # --- start ---------------------------------------------------------------------------

    def start(self, progress: Any = print) -> None:
        if self.hosts:
            progress(
                f"on simulated PCs: drivers on {self.host('pc1')}, Kafka, Central and the fleet"
                f" on {self.host('pc2')}, real CPs on {self.host('pc3')}"
            )
        self._start_kafka()
        progress(f"kafka at {self.bootstrap}")
        self._seed()
        self._start_centrals()
        progress(f"Central at {self.central_addresses}, admin on :{self.active_http()}")
        for cp_id in self.cp_ids:
            self._start_cp(cp_id)
        self.login()
        self._wait(self._cp_states_ok, 60, "the real CPs never became ACTIVADO")
        progress(f"{len(self.cp_ids)} real CPs ACTIVADO")
        if self.settings.fleet_cps:
            self._start_fleet()
            progress(f"fleet simulator: {self.settings.fleet_cps} CPs")

    def _start_kafka(self) -> None:
        env = {
            **os.environ,
            "EV_KAFKA_RUN_DIR": str(self.work / "kafka"),
            "EV_KAFKA_KEEP_DATA": "1",
            "EV_KAFKA_LISTEN_HOST": self.host("pc2"),
        }
        if self.settings.ha:
            base = free_port_run(3)
            done = subprocess.run(
                [str(KAFKA_SH), "cluster", "start", "3", str(base)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemError_(f"the Kafka cluster did not start: {done.stderr.strip()}")
            self.brokers = [Broker(i, base + i - 1, env, base, up=True) for i in (1, 2, 3)]
        else:
            broker = Broker(0, free_port(), env)
            broker.start()
            self.brokers = [broker]
        self.bootstrap = ",".join(f"{self.host('pc2')}:{b.port}" for b in self.brokers)

    def _seed(self) -> None:
        for argv in (
            ["init_db.py", "--db", str(self.db)],
            ["-m", "tools.fleet", "seed", "--db", str(self.db), "--prefix", "SIM"]
            + ["--cps", str(max(1, self.settings.fleet_cps))]
            + ["--supplying", str(self.settings.fleet_supplying)]
            + ["--credentials", str(self.credentials)],
        ):
            done = subprocess.run(
                [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise SystemError_(f"seeding failed: {done.stderr.strip()[-500:]}")

    def _start_centrals(self) -> None:
        names = ("central-a", "central-b") if self.settings.ha else ("central",)
        audit_key = secrets.token_bytes(32).hex() + "\n"
        for index, name in enumerate(names):
            port, http = free_port(), free_port()
            directory = self.work / name
            directory.mkdir(exist_ok=True)
            db = directory / "central.db"
            key = Path(f"{db}.audit-key")
            key.write_text(audit_key)
            key.chmod(0o600)
            if index == 0:
                self.db.replace(db)
            self.dbs.append(db)
            ha = ["--ha", "--advertise", self.host("pc2")] if self.settings.ha else []
            # On PC2, every address: the other PCs at PC2's, the tool at the loopback.
            listen = "0.0.0.0" if self.hosts else "127.0.0.1"
            proc = Proc(
                name,
                ["-m", "EV_Central", *ha, "--broker", self.bootstrap, "--db", str(db)]
                + ["--port", str(port), "--http-port", str(http)]
                + ["--listen-host", listen, "--console", "off"],
                self.logs / f"{name}.log",
            )
            self.centrals.append(proc)
            self.monitor_ports.append(port)
            self.http_ports.append(http)
            proc.start()
            want = "active" if index == 0 else "standby"
            self._wait(lambda h=http, w=want: _role(h) in _roles(w), 180, f"{name} not {want}")

    def active_http(self) -> int:
        for http in self.http_ports:
            if _role(http) in ("single", "active"):
                return http
        return self.http_ports[0]

    def roles(self) -> list[str | None]:
        return [_role(http) for http in self.http_ports]

    def _start_cp(self, cp_id: str) -> None:
        port = self.engine_ports.setdefault(cp_id, free_port())
        secret = f"demo-secret-{cp_id}"
        low, high = self.settings.auto_unplug
        engine = Proc(
            f"engine-{cp_id}",
            ["-m", "EV_CP_E", "--broker", self.bootstrap, "--listen", f"{self.host('pc3')}:{port}"]
            + ["--secret", secret, "--auto-plug", "1"]
            + ["--auto-unplug", f"{self.rng.uniform(low, high):.1f}"]
            + ["--ledger", str(self.ledger(cp_id))]
            + ["--journal", str(self.work / f"engine-{cp_id}.journal")],
            self.logs / f"engine-{cp_id}.log",
            netns=self.netns("pc3"),
        )
        monitor = Proc(
            f"monitor-{cp_id}",
            ["-m", "EV_CP_M", "--engine", f"{self.host('pc3')}:{port}"]
            + ["--central", self.central_addresses, "--cp-id", cp_id, "--secret", secret]
            + ["--broker", self.bootstrap],
            self.logs / f"monitor-{cp_id}.log",
            netns=self.netns("pc3"),
        )
        self.engines[cp_id], self.monitors[cp_id] = engine, monitor
        engine.start()
        monitor.start()

    def _start_fleet(self) -> None:
        key = _central_key(self.active_db())
        if key is None:
            raise SystemError_("Central has no identity key in its database")
        self.fleet = Proc(
            "fleet",
            ["-m", "tools.fleet", "--central", self.central_addresses]
            + ["--broker", self.bootstrap, "--admin", self.admin]
            + ["--cps", str(self.settings.fleet_cps)]
            + ["--supplying", str(self.settings.fleet_supplying)]
            + ["--duration", "86400", "--warmup", "2", "--lose", "0"]
            + ["--supply-seconds", "5,15", "--request-rate", "20"]
            + ["--credentials", str(self.credentials), "--central-key", key]
            + ["--stop-file", str(self.fleet_stop), "--ledger", str(self.fleet_ledger)]
            + ["--out", str(self.work / "fleet.json")],
            self.logs / "fleet.log",
            env={"EV_ADMIN_PASSWORD": DEMO_ADMIN_PASSWORD},
        )
        self.fleet.start()

    # --- drivers ---------------------------------------------------------------------------

    def start_drivers(self) -> None:
        for driver_id in self.driver_ids:
            self._driver_tasks.append(
                asyncio.create_task(self._drive(driver_id), name=f"drive-{driver_id}")
            )

    async def _drive(self, driver_id: str) -> None:
        """One driver: a supply at a random real CP, again and again, while `driving`."""
        password = "pass" + driver_id.removeprefix("user")
        app = Proc(
            f"driver-{driver_id}",
            [],
            self.driver_log(driver_id),
            env={"EV_PASSWORD": password},
            netns=self.netns("pc1"),
        )
        self.driver_apps[driver_id] = app
        while self.driving:
            cp_id = self.rng.choice(self.cp_ids)
            app.argv = ["-m", "EV_Driver", "--broker", self.bootstrap, "--driver-id", driver_id]
            app.argv += ["--json", "--cp", cp_id, "--reply-timeout", "10"]
            app.start(app.shift)
            self.requests_started += 1
            await wait_until(lambda: not (app.alive or app.paused), None)
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))

    async def stop_drivers(self, within: float) -> None:
        """No new requests; the driver apps at work finish theirs (or are stopped)."""
        self.driving = False
        await wait_until(lambda: not any(a.alive for a in self.driver_apps.values()), within)
        for app in self.driver_apps.values():
            app.stop()
        for task in self._driver_tasks:
            task.cancel()
        for task in self._driver_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def collect_unseen_tickets(self) -> None:
        """Each real driver's app once more: at login it shows the tickets it had not seen (a
        supply that ended while its app was dead, a ticket corrected after its app ended)."""
        for driver_id, app in self.driver_apps.items():
            # The app needs a request to run (--cp or --file): one for a CP Central does not
            # know is denied, after the tickets, and starts nothing.
            app.argv = ["-m", "EV_Driver", "--broker", self.bootstrap, "--driver-id", driver_id]
            app.argv += ["--json", "--reply-timeout", "10", "--cp", NO_SUCH_CP]
            app.start(None)
            await wait_until(lambda a=app: not a.alive, 60)
            app.stop()

    # --- the processes by name -------------------------------------------------------------

    def process(self, name: str) -> Proc | None:
        if name.startswith("engine-"):
            return self.engines.get(name.removeprefix("engine-"))
        if name.startswith("monitor-"):
            return self.monitors.get(name.removeprefix("monitor-"))
        if name.startswith("driver-"):
            return self.driver_apps.get(name.removeprefix("driver-"))
        if name == "fleet":
            return self.fleet
        for proc in self.centrals:
            if proc.name == name:
                return proc
        return None

    def active_central(self) -> Proc:
        for proc, http in zip(self.centrals, self.http_ports, strict=True):
            if _role(http) in ("single", "active"):
                return proc
        return self.centrals[0]

    def broker(self, name: str) -> Broker:
        index = int(name.removeprefix("broker-") or 0) if name != "broker" else 0
        for broker in self.brokers:
            if broker.index == index:
                return broker
        return self.brokers[0]

    # --- state, read from outside -----------------------------------------------------------

    def login(self) -> None:
        """An admin session at the active Central's web (sessions are replicated with --ha)."""
        from EV_Central.ctl import admin_login

        host, port = self.admin.split(":")
        self.cookie = asyncio.run(admin_login(host, int(port), "admin", DEMO_ADMIN_PASSWORD, 10))

    def cp_states(self) -> dict[str, str]:
        """Each CP's state as the active Central shows it ({} when it does not answer)."""
        request = urllib.request.Request(
            f"http://{self.admin}/api/cps", headers={"Cookie": self.cookie}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as answer:
                cps = json.loads(answer.read())
        except (OSError, ValueError):
            return {}
        return {str(cp["id"]): str(cp["state"]) for cp in cps if isinstance(cp, dict)}

    def active_db(self) -> Path:
        for db, http in zip(self.dbs, self.http_ports, strict=True):
            if _role(http) in ("single", "active"):
                return db
        return self.dbs[0]

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """A read of the active Central's database (read-only: Central stays its writer)."""
        db = sqlite3.connect(f"file:{self.active_db()}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def _cp_states_ok(self) -> bool:
        states = self.cp_states()
        return all(states.get(cp_id) == "ACTIVADO" for cp_id in self.cp_ids)

    def _wait(self, ok: Any, within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.3)
        raise SystemError_(what)

    # --- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
        for proc in [*self.monitors.values(), *self.engines.values(), *self.driver_apps.values()]:
            proc.stop()
        for proc in self.centrals:
            proc.stop()
        env = self.brokers[0].env if self.brokers else dict(os.environ)
        env = {k: v for k, v in env.items() if k != "EV_KAFKA_KEEP_DATA"}
        if self.brokers and self.brokers[0].base is not None:
            args = ["cluster", "stop", str(self.brokers[0].base)]
        elif self.brokers:
            args = ["stop", str(self.brokers[0].port)]
        else:
            return
        for broker in self.brokers:
            broker.resume()
        subprocess.run([str(KAFKA_SH), *args], env=env, capture_output=True, check=False)


async def wait_until(done: Any, within: float | None, step: float = 0.2) -> bool:
    """Poll `done()` until it is true (True) or `within` seconds pass (False; None: forever)."""
    deadline = None if within is None else time.monotonic() + within
    while True:
        if done():
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step)


def _roles(wanted: str) -> tuple[str, ...]:
    return ("single", "active") if wanted == "active" else (wanted,)


def _role(http_port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return None
    return body.get("role") if isinstance(body, dict) else None


def _central_key(db: Path) -> str | None:
    from tools.fleet.sim import central_key_from_db

    return central_key_from_db(str(db))
