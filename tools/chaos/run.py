"""One chaos run: start the network, inject the schedule, let it settle, audit, report."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from tools.chaos.auditor import ACTIVE, Evidence, Invariant, audit
from tools.chaos.faults import FaultLog, inject
from tools.chaos.schedule import Fault, summary
from tools.chaos.system import REPO, Settings, System, wait_until

SAMPLE_EVERY = 0.5  # CP states and Central roles, for the timeline and the HA check
SETTLE_WITHIN = 120.0  # the quiet phase: every session settled, every CP back
# The PCs whose link the network faults hit: the drivers', Kafka and Central's (every driver and
# CP cut from them at once; the fleet and the tool, beside them, are not), the real CPs'.
NET_TARGETS = ("pc1", "pc2", "pc3")


@dataclass
class Run:
    seed: int
    duration: float
    kinds: tuple[str, ...]
    schedule: list[Fault]
    settings: Settings
    command: str
    progress: TextIO = sys.stderr
    log: FaultLog = field(default_factory=FaultLog)
    transitions: list[dict[str, Any]] = field(default_factory=list)
    roles: list[tuple[float, list[str | None]]] = field(default_factory=list)
    started_wall: float = 0.0
    started: float = 0.0

    def say(self, text: str) -> None:
        print(f"chaos: {text}", file=self.progress, flush=True)


def targets(settings: Settings, cp_ids: list[str], driver_ids: list[str]) -> dict[str, list[str]]:
    brokers = ["broker-1", "broker-2", "broker-3"] if settings.ha else ["broker"]
    engines = [f"engine-{c}" for c in cp_ids]
    monitors = [f"monitor-{c}" for c in cp_ids]
    drivers = [f"driver-{d}" for d in driver_ids]
    fleet = ["fleet"] if settings.fleet_cps else []
    pcs = list(NET_TARGETS) if settings.hosts else []
    return {
        "kill-central": ["central"],
        "kill-engine": list(cp_ids),
        "kill-monitor": list(cp_ids),
        "kill-driver": list(driver_ids),
        "restart-broker": brokers,
        "pause": ["central", *brokers, *engines, *monitors, *drivers, *fleet],
        "clock": [*engines, *monitors, *drivers],
        "stop-cp": list(cp_ids),
        "net-cut": pcs,
        "net-loss": pcs,
        "net-delay": pcs,
    }


def execute(run: Run) -> dict[str, Any]:
    """The whole run; returns the results (see tools/chaos/report.py for their shape)."""
    system = System(run.settings, run.seed)
    try:
        run.say(f"seed {run.seed}: {len(run.schedule)} faults {summary(run.schedule)}")
        system.start(progress=run.say)
        balances = dict(system.query("SELECT id, balance_cents FROM users WHERE role='driver'"))
        asyncio.run(_soak(run, system))
        evidence = gather(run, system, {str(k): int(v) for k, v in balances.items()})
        invariants = audit(evidence)
        return results(run, system, evidence, invariants)
    finally:
        system.stop()


async def _soak(run: Run, system: System) -> None:
    run.started, run.started_wall = time.monotonic(), time.time()
    system.start_drivers()
    sampler = asyncio.create_task(_sample(run, system), name="sampler")
    progress = asyncio.create_task(_progress(run, system), name="progress")
    faults = [asyncio.create_task(_at(run, system, f), name=f.kind) for f in run.schedule]
    await asyncio.sleep(max(0.0, run.duration - (time.monotonic() - run.started)))
    await asyncio.gather(*faults)
    progress.cancel()
    run.say("faults over: letting every supply end and settle")
    await _settle(run, system)
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler


async def _at(run: Run, system: System, fault: Fault) -> None:
    await asyncio.sleep(max(0.0, fault.at - (time.monotonic() - run.started)))
    await inject(system, fault, run.log, run.started)


async def _sample(run: Run, system: System) -> None:
    last: dict[str, str] = {}
    while True:
        at = time.monotonic() - run.started
        states = await asyncio.to_thread(system.cp_states)
        if not states and system.cookie:
            with contextlib.suppress(Exception):  # a restarted Central forgot the session
                await asyncio.to_thread(system.login)
        for cp_id in system.cp_ids:
            state = states.get(cp_id, "unknown" if not states else "DESCONECTADO")
            if states and last.get(cp_id) != state:
                last[cp_id] = state
                run.transitions.append({"cp_id": cp_id, "at": round(at, 2), "state": state})
        if run.settings.ha:
            run.roles.append((at, await asyncio.to_thread(system.roles)))
        await asyncio.sleep(SAMPLE_EVERY)


async def _progress(run: Run, system: System) -> None:
    while True:
        await asyncio.sleep(10)
        at = time.monotonic() - run.started
        started = sum(1 for d in run.log.done if d.started <= at)
        failed = sum(1 for d in run.log.done if d.failed)
        settled = await asyncio.to_thread(
            system.query, "SELECT COUNT(*) FROM sessions WHERE status='COMPLETED'"
        )
        run.say(
            f"{at:5.0f}/{run.duration:.0f} s: {started}/{len(run.schedule)} faults"
            f"{f' ({failed} not done)' if failed else ''}, {system.requests_started} real"
            f" requests, {settled[0][0]} supplies completed"
        )


async def _settle(run: Run, system: System) -> None:
    """Drivers stop asking, the fleet drains, every app shows its last tickets, every session
    settles and every real CP is ACTIVADO again."""
    for proc in [*system.engines.values(), *system.monitors.values(), *system.centrals]:
        if not proc.alive:
            proc.start(None)
    await system.stop_drivers(within=60)
    if system.fleet is not None:
        system.fleet_stop.touch()
        fleet = system.fleet
        await wait_until(lambda: not fleet.alive, 120, step=0.5)
        fleet.stop()
    await system.collect_unseen_tickets()
    deadline = time.monotonic() + SETTLE_WITHIN
    marks = ",".join(f"'{s}'" for s in sorted(ACTIVE))
    while time.monotonic() < deadline:
        open_ = await asyncio.to_thread(
            system.query, f"SELECT COUNT(*) FROM sessions WHERE status IN ({marks})"
        )
        states = await asyncio.to_thread(system.cp_states)
        real_ok = all(states.get(c) == "ACTIVADO" for c in system.cp_ids)
        sim_off = all(v == "DESCONECTADO" for k, v in states.items() if k.startswith("SIM"))
        if open_[0][0] == 0 and real_ok and sim_off and states:
            return
        await asyncio.sleep(1.0)
    run.say("the system did not settle in time: auditing it as it is")


def gather(run: Run, system: System, balances_start: dict[str, int]) -> Evidence:
    ledger: list[dict[str, Any]] = []
    for path in [*(system.ledger(c) for c in system.cp_ids), system.fleet_ledger]:
        ledger += _json_lines(path)
    driver_events: list[dict[str, Any]] = []
    for driver_id in system.driver_ids:
        driver_events += _json_lines(system.driver_log(driver_id))
    columns = [
        "id", "cp_id", "driver_id", "request_id", "status", "price_eur_kwh", "kwh",
        "amount_cents", "authorized_at", "started_at", "ended_at", "reason",
    ]  # fmt: skip
    rows = system.query(f"SELECT {', '.join(columns)} FROM sessions")
    sessions = [dict(zip(columns, row, strict=True)) for row in rows]
    balances_end = {
        str(k): int(v)
        for k, v in system.query("SELECT id, balance_cents FROM users WHERE role='driver'")
    }
    max_kw = {str(k): float(v) for k, v in system.query("SELECT id, max_kw FROM charging_points")}
    final = system.cp_states()
    expected = {c: "ACTIVADO" for c in system.cp_ids}
    expected.update({c: "DESCONECTADO" for c in final if c.startswith("SIM")})
    verify = subprocess.run(
        [sys.executable, "-m", "EV_Central", "audit", "verify", "--db", str(system.active_db())],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    stopped = [(s.cp_id, s.since, s.until or time.time()) for s in run.log.stopped]
    shifts: dict[str, list[tuple[float, float, float]]] = {}
    for done in run.log.done:
        fault = done.fault
        if fault.kind == "clock" and fault.target.startswith("engine-") and done.ended:
            seconds = float(fault.detail.rstrip("s"))
            window = (run.started_wall + done.started, run.started_wall + done.ended, seconds)
            shifts.setdefault(fault.target.removeprefix("engine-"), []).append(window)
    return Evidence(
        ledger=ledger,
        driver_events=driver_events,
        sessions=sessions,
        balances_start=balances_start,
        balances_end=balances_end,
        max_kw=max_kw,
        final_states=final,
        expected_states=expected,
        stopped=stopped,
        audit_ok=verify.returncode == 0,
        audit_output=verify.stdout + verify.stderr,
        roles=run.roles,
        engine_shifts=shifts,
    )


def results(
    run: Run, system: System, evidence: Evidence, invariants: list[Invariant]
) -> dict[str, Any]:
    t0 = run.started_wall
    real = set(system.cp_ids)
    supplies = []
    for row in evidence.sessions:
        if row["started_at"] is None:
            continue
        supplies.append(
            {
                "cp_id": row["cp_id"],
                "driver_id": row["driver_id"],
                "session_id": row["id"],
                "start": round(row["started_at"] - t0, 2),
                "end": None if row["ended_at"] is None else round(row["ended_at"] - t0, 2),
                "kwh": row["kwh"],
                "source": "real" if row["cp_id"] in real else "sim",
            }
        )
    settled = [r for r in evidence.sessions if r["status"] in ("COMPLETED", "ABORTED", "EXPIRED")]
    violations = sum(len(i.violations) for i in invariants)
    faults = [
        {
            "at": round(d.started, 2),
            "kind": d.fault.kind,
            "target": d.fault.target,
            "duration": round((d.ended or d.started) - d.started, 2),
            "detail": d.failed or d.what,
        }
        for d in sorted(run.log.done, key=lambda d: d.started)
    ]
    return {
        "seed": run.seed,
        "duration_s": run.duration,
        "started_at": datetime.fromtimestamp(t0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": run.command,
        "kinds": list(run.kinds),
        "faults": faults,
        "supplies": supplies,
        "cp_states": run.transitions,
        "invariants": [i.as_json() for i in invariants],
        "totals": {
            "supplies": len(supplies),
            "supplies_real": sum(1 for s in supplies if s["source"] == "real"),
            "supplies_sim": sum(1 for s in supplies if s["source"] == "sim"),
            "kwh": round(sum(float(r["kwh"]) for r in settled), 4),
            "tickets": len(settled),
            "faults": len(faults),
            "faults_by_kind": summary(run.schedule),
            "violations": violations,
            "euros": round(sum(int(r["amount_cents"]) for r in settled) / 100, 2),
        },
    }


def _json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        if not text.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            value = json.loads(text)
            if isinstance(value, dict):
                lines.append(value)
    return lines
