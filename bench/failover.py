"""The failover section of the benchmark (`make bench-failover`, `python -m bench.run --failover`).

Two parts, each on a fresh three-node Kafka cluster (scripts/kafka.sh cluster, private run dir)
with a pair of Centrals started with --ha (docs/high-availability.md):

- Failover: a fleet whose monitors know both Centrals; the active Central is killed (-9) again
  and again. Measured each time: kill -> the other Central's /healthz says "active"; kill ->
  every CP connected again (the fleet says when); the supply requests in flight during that
  window (sent before its end, answered after its start). The killed Central is started again,
  becomes the standby, and the next kill waits until it is.
- The cost of high availability: the same fleet size against one broker and one Central, then
  against the cluster and the HA pair, in the same run; request -> authorisation and heartbeats
  per CPU-second side by side. Before the fleet starts, the idle cluster's floor: one Kafka
  transaction from its begin until a read_committed consumer has it, and one plain send
  (bench/transactions.py, `hop_floor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from bench.run import KAFKA_SH, REPO, seed_fleet, stop_process
from bench.transactions import hop_floor
from tools.fleet.failover import (
    in_flight,
    reconnection_times,
    summarise_seconds,
    time_until_all_back,
)
from tools.fleet.sim import central_key_from_db
from tools.fleet.stats import summarise
from tools.ports import free_port, free_port_run

NODES = 3
ALL_BACK_WITHIN = 120.0  # seconds after a kill to wait for every CP to be connected again


class Cluster:
    """Three Kafka nodes on free ports, in a run directory of their own."""

    def __init__(self, root: Path) -> None:
        self.base = free_port_run(NODES)
        self.env = {**os.environ, "EV_KAFKA_RUN_DIR": str(root / f"cluster-{self.base}")}
        self.bootstrap = ",".join(f"127.0.0.1:{self.base + i}" for i in range(NODES))

    def __enter__(self) -> Cluster:
        subprocess.run(
            [str(KAFKA_SH), "cluster", "start", str(NODES), str(self.base)],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(
            [str(KAFKA_SH), "cluster", "stop", str(self.base)],
            env=self.env,
            check=False,
            stdout=subprocess.DEVNULL,
        )


def role(http_port: int) -> str | None:
    """The role a Central's /healthz says, None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return None
    return body.get("role") if isinstance(body, dict) else None


class HACentral:
    """One Central of the pair: its own ports and database, started and killed at will."""

    def __init__(self, name: str, work: Path, bootstrap: str, audit_key: str) -> None:
        self.name = name
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = self.dir / "central.db"
        key_file = Path(f"{self.db}.audit-key")
        key_file.write_text(audit_key)
        key_file.chmod(0o600)
        self.bootstrap = bootstrap
        self.port, self.http = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = (self.dir / f"central-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "EV_Central", "--ha", "--advertise", "127.0.0.1"]
            + ["--broker", self.bootstrap, "--db", str(self.db)]
            + ["--port", str(self.port), "--http-port", str(self.http)]
            + ["--listen-host", "127.0.0.1", "--console", "off", "--log-level", "WARNING"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def wait_role(self, wanted: str, within: float) -> float:
        """Seconds until this Central says `wanted`; RuntimeError if it exits or takes longer."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"Central {self.name} exited (see {self.dir}/central-*.log)")
            if role(self.http) == wanted:
                return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(f"Central {self.name} not {wanted} within {within:g} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def start_pair(work: Path, cluster: Cluster, seeded: Path) -> tuple[HACentral, HACentral]:
    """Central A on the seeded database (the first active adopts it), then B as the standby."""
    audit_key = secrets.token_bytes(32).hex() + "\n"
    a = HACentral("a", work, cluster.bootstrap, audit_key)
    b = HACentral("b", work, cluster.bootstrap, audit_key)
    seeded.replace(a.db)
    a.start()
    a.wait_role("active", 180)
    b.start()
    b.wait_role("standby", 180)
    return a, b


class FleetProcess:
    """`python -m tools.fleet` in a process of its own; its JSON events read as they come."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.fleet", *args, "--events"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self.reader.start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            if line.startswith('{"event"'):
                with contextlib.suppress(ValueError):
                    self.events.put(json.loads(line))

    def wait_event(self, name: str, after: float, within: float) -> dict[str, Any]:
        """The first event `name` at or after wall time `after`; RuntimeError past `within` s."""
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            if self.proc.poll() is not None and self.events.empty():
                raise RuntimeError(f"the fleet exited (see {self.log.name})")
            try:
                event = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if event.get("event") == name and event.get("t", 0.0) >= after:
                return event
        raise RuntimeError(f"no fleet event {name!r} within {within:g} s")

    def finish(self, within: float = 300) -> int:
        try:
            code = self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.reader.join(5)
        self.log.close()
        return code


def outage_list(fleet: dict[str, Any]) -> list[tuple[float, float | None]]:
    """The fleet's (link lost at, connected again at or None) pairs."""
    return [(float(a), None if b is None else float(b)) for a, b in fleet["outages"]]


def authorised_list(fleet: dict[str, Any]) -> list[tuple[float, float]]:
    """The fleet's (sent at, latency) of the requests that were authorised."""
    return [(float(s), float(lat)) for s, lat, how in fleet["requests"] if how == "authorised"]


def window_figures(
    fleet: dict[str, Any], start: float, end: float, margin: float
) -> dict[str, Any]:
    """One failover window's figures from the fleet's raw timelines (wall clock)."""
    outages = outage_list(fleet)
    requests = fleet["requests"]
    authorised = authorised_list(fleet)
    late = end + margin
    return {
        "all_connected_s": time_until_all_back(outages, start, late),
        "cps_reconnected": len(reconnection_times(outages, start, late)),
        "reconnection_s": summarise_seconds(reconnection_times(outages, start, late)),
        "request_to_authorisation_ms": summarise(in_flight(authorised, start, end)),
        "denied": sum(1 for s, lat, how in requests if how == "denied" and start <= s <= end),
        "timeouts": sum(1 for s, lat, how in requests if how == "timeout" and start <= s <= end),
    }


def run_failover(
    root: Path,
    size: int,
    kills: int,
    warmup: float,
    supplying: float,
    supply_seconds: str,
    settle: float,
) -> dict[str, Any]:
    """Kill the active Central `kills` times under a fleet of `size` CPs; the figures."""
    work = Path(tempfile.mkdtemp(prefix=f"failover-{size}-", dir=root))
    seeded, credentials = seed_fleet(work / "seed.db", size, supplying)
    with Cluster(root) as cluster:
        a, b = start_pair(work, cluster, seeded)
        fleet: FleetProcess | None = None
        try:
            central_key = central_key_from_db(str(a.db))
            if central_key is None:
                raise RuntimeError("Central has no identity key in its database")
            out = work / "fleet.json"
            stop = work / "stop"
            fleet = FleetProcess(
                ["--central", f"{a.address},{b.address}", "--broker", cluster.bootstrap]
                + ["--cps", str(size), "--supplying", str(supplying)]
                + ["--duration", "3600", "--warmup", str(warmup)]
                + ["--supply-seconds", supply_seconds, "--lose", "0"]
                + ["--credentials", str(credentials), "--central-key", central_key]
                + ["--out", str(out), "--stop-file", str(stop)],
                work / "fleet.log",
            )
            fleet.wait_event("measuring", 0.0, 600)
            time.sleep(settle)
            active, standby = a, b
            windows: list[dict[str, Any]] = []
            for i in range(kills):
                if role(active.http) != "active":
                    active, standby = standby, active
                killed_at = time.time()
                active.kill()
                standby.wait_role("active", 60)
                took_over = time.time() - killed_at
                try:
                    back_at: float | None = float(
                        fleet.wait_event("all_connected", killed_at, ALL_BACK_WITHIN)["t"]
                    )
                except RuntimeError:
                    back_at = None  # reported as such; the window is then ALL_BACK_WITHIN long
                print(
                    f"failover {i + 1}/{kills}: {active.name} killed, {standby.name} active in"
                    f" {took_over:.2f} s, every CP connected again "
                    + (
                        f"in {back_at - killed_at:.2f} s"
                        if back_at is not None
                        else f"NOT within {ALL_BACK_WITHIN:g} s"
                    ),
                    flush=True,
                )
                windows.append(
                    {
                        "killed": active.name,
                        "killed_at": killed_at,
                        "to_new_active_s": round(took_over, 3),
                        "all_connected_at": back_at,
                    }
                )
                active.start()
                active.wait_role("standby", 180)
                active, standby = standby, active
                time.sleep(settle)
            stop.touch()
            code = fleet.finish()
            fleet = None
            if code != 0 or not out.exists():
                raise RuntimeError(f"the fleet failed ({code}); see {work / 'fleet.log'}")
            result: dict[str, Any] = json.loads(out.read_text())
        finally:
            if fleet is not None:
                stop_fleet(fleet)
            a.stop()
            b.stop()
    return summarise_failover(result, windows, settle)


def stop_fleet(fleet: FleetProcess) -> None:
    if fleet.proc.poll() is None:
        fleet.proc.terminate()
    fleet.finish(30)


def summarise_failover(
    fleet: dict[str, Any], windows: list[dict[str, Any]], margin: float
) -> dict[str, Any]:
    """The per-kill figures and their p50 / p99 / max over the kills."""
    per_kill = []
    pooled: list[float] = []
    reconnections: list[float] = []
    outages = outage_list(fleet)
    authorised = authorised_list(fleet)
    for w in windows:
        start, back = w["killed_at"], w["all_connected_at"]
        end = back if back is not None else start + ALL_BACK_WITHIN
        figures = window_figures(fleet, start, end, margin)
        pooled += in_flight(authorised, start, end)
        reconnections += reconnection_times(outages, start, end + margin)
        per_kill.append(
            {
                "killed": w["killed"],
                "to_new_active_s": w["to_new_active_s"],
                **figures,
                "all_connected_s": None if back is None else round(back - start, 3),
            }
        )
    return {
        "cps": fleet["cps"],
        "kills": len(per_kill),
        "monitors_authenticated": fleet["monitors_authenticated"],
        "to_new_active_s": summarise_seconds([k["to_new_active_s"] for k in per_kill]),
        "all_connected_s": summarise_seconds(
            [k["all_connected_s"] for k in per_kill if k["all_connected_s"] is not None]
        ),
        "kills_not_all_back": sum(1 for k in per_kill if k["all_connected_s"] is None),
        "refusals_retried": fleet.get("refusals_retried", {}),
        "auth_timeouts": fleet.get("auth_timeouts", 0),
        "reconnection_per_cp_s": summarise_seconds(reconnections),
        "request_to_authorisation_in_windows_ms": summarise(pooled),
        "request_to_authorisation_whole_run_ms": fleet["request_to_authorisation_ms"],
        "denied": fleet["denied"],
        "request_timeouts": fleet["request_timeouts"],
        "standby_refusals": fleet["standby_refusals"],
        "monitors_refused": fleet["monitors_refused"],
        "monitors_down_at_end": fleet["monitors_down_at_end"],
        "unopened_sealed": fleet["unopened_sealed"],
        "per_kill": per_kill,
    }


def run_ha_fleet(
    root: Path,
    size: int,
    duration: float,
    warmup: float,
    supplying: float,
    supply_seconds: str,
    admin_password: str,
) -> dict[str, Any]:
    """The fleet of `size` CPs against the HA pair on the cluster, nothing killed."""
    work = Path(tempfile.mkdtemp(prefix=f"ha-{size}-", dir=root))
    seeded, credentials = seed_fleet(work / "seed.db", size, supplying)
    with Cluster(root) as cluster:
        # What a hop costs on this cluster with nothing else running: the floor under the
        # fleet's figures (a request crosses Central twice, each time out in a transaction).
        floor = asyncio.run(hop_floor(cluster.bootstrap))
        a, b = start_pair(work, cluster, seeded)
        try:
            assert a.proc is not None
            central_key = central_key_from_db(str(a.db))
            if central_key is None:
                raise RuntimeError("Central has no identity key in its database")
            out = work / "fleet.json"
            with (work / "fleet.log").open("wb") as log:
                fleet = subprocess.run(
                    [sys.executable, "-m", "tools.fleet"]
                    + ["--central", f"{a.address},{b.address}", "--broker", cluster.bootstrap]
                    + ["--admin", f"127.0.0.1:{a.http}", "--central-pid", str(a.proc.pid)]
                    + ["--cps", str(size), "--supplying", str(supplying)]
                    + ["--duration", str(duration), "--warmup", str(warmup)]
                    + ["--supply-seconds", supply_seconds]
                    + ["--credentials", str(credentials), "--central-key", central_key]
                    + ["--out", str(out)],
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    env={**os.environ, "EV_ADMIN_PASSWORD": admin_password},
                )
            if fleet.returncode != 0 or not out.exists():
                raise RuntimeError(f"the HA fleet of {size} failed; see {work / 'fleet.log'}")
            result: dict[str, Any] = json.loads(out.read_text())
            result["central_alive"] = a.proc.poll() is None
            result["kafka_hop_floor"] = floor
            # A take-over during the run (A lost its lease) restarts A's counters: the
            # Central-side figures of such a run do not hold, and the report says so.
            result["active_role_at_end"] = role(a.http)
            result["standby_role_at_end"] = role(b.http)
            result["lease_kept"] = (
                result["active_role_at_end"] == "active"
                and result["standby_role_at_end"] == "standby"
                and result.get("central_heartbeats_handled", 0) >= 0
            )
            if not result["lease_kept"]:
                result["central_heartbeats_per_cpu_s"] = None
        finally:
            a.stop()
            b.stop()
    # The raw timelines are for failover windows only.
    for key in ("outages", "requests"):
        result.pop(key, None)
    return result
