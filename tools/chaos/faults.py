"""Each fault of a schedule, done to the running system: kill, pause, restart, shift, stop, and
with --net cut, lose or delay a simulated PC's traffic.

`inject` runs one fault from its start to its end (the part back, or the CP in service again)
and returns what it did, in words, for the report. Faults run as tasks of their own, so they
overlap as the schedule says.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tools.chaos.schedule import NET_KINDS, Fault
from tools.chaos.system import DEMO_ADMIN_PASSWORD, REPO, System


@dataclass
class Done:
    """A fault as it happened: when it started and ended (seconds from the run's start)."""

    fault: Fault
    started: float
    ended: float | None = None
    what: str = ""
    failed: str = ""  # the fault could not be done as scheduled (the part was down already)


@dataclass
class StoppedCP:
    """A CP an admin put out of service: from when (the tool's clock) until when."""

    cp_id: str
    since: float  # time.time()
    until: float | None = None


@dataclass
class FaultLog:
    done: list[Done] = field(default_factory=list)
    stopped: list[StoppedCP] = field(default_factory=list)
    central_kills: list[float] = field(default_factory=list)  # time.time() of each


async def inject(system: System, fault: Fault, log: FaultLog, started_at: float) -> None:
    done = Done(fault, time.monotonic() - started_at)
    log.done.append(done)
    try:
        done.what = await _do(system, fault, log)
    except Exception as exc:  # a fault that fails is reported, it does not end the run
        done.failed = f"{type(exc).__name__}: {exc}"
    done.ended = time.monotonic() - started_at


async def _do(system: System, fault: Fault, log: FaultLog) -> str:
    kind, target, length = fault.kind, fault.target, fault.length
    if kind == "kill-central":
        proc = system.active_central()
        proc.kill()
        log.central_kills.append(time.time())
        await asyncio.sleep(length)
        proc.start()
        return f"kill -9 {proc.name}, started again after {length:.1f} s"
    if kind in ("kill-engine", "kill-monitor"):
        part = "engine" if kind == "kill-engine" else "monitor"
        found = system.process(f"{part}-{target}")
        assert found is not None
        found.kill()
        await asyncio.sleep(length)
        found.start(found.shift)
        return f"kill -9 {part} of {target}, started again after {length:.1f} s"
    if kind == "kill-driver":
        app = system.driver_apps.get(target)
        if app is None or not app.alive:
            return f"{target}'s app was between requests: nothing to kill"
        app.kill()  # its driver loop starts it again (following the supply in progress)
        return f"kill -9 {target}'s driver app (its loop starts a new one)"
    if kind == "restart-broker":
        broker = system.broker(target)
        # The schedule leaves a broker alone for its fault's length and 2 s; its start-up may
        # take longer (10 s and more under load). Stopped again then, it exited while starting
        # (kafka.sh: "broker exited during startup") and the first restart failed.
        if broker.restarting:
            return f"{target} still restarting from an earlier fault: not restarted again"
        broker.restarting = True
        try:
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(length)
            failures = await asyncio.to_thread(broker.start)
        finally:
            broker.restarting = False
        tries = f" (at try {len(failures) + 1}: {'; '.join(failures)})" if failures else ""
        return f"stopped Kafka {target}, started it again after {length:.1f} s{tries}"
    if kind == "pause":
        if target.startswith("broker"):
            broker = system.broker(target)
            if not broker.pause():
                return f"{target} not running: nothing to pause"
            await asyncio.sleep(length)
            broker.resume()
            return f"SIGSTOP {target} for {length:.1f} s"
        paused = system.active_central() if target == "central" else system.process(target)
        if paused is None or not paused.pause():
            return f"{target} not running: nothing to pause"
        await asyncio.sleep(length)
        paused.resume()
        return f"SIGSTOP {paused.name} for {length:.1f} s"
    if kind == "clock":
        shifted = system.process(target)
        assert shifted is not None
        shift = fault.detail
        if target.startswith("driver-"):
            shifted.shift = shift  # the driver loop starts its next app with it
            shifted.kill()
            await asyncio.sleep(length)
            shifted.shift = None
            return f"{target}'s apps ran with the clock {shift} for {length:.0f} s"
        shifted.kill()
        shifted.start(shift)
        await asyncio.sleep(length)
        shifted.kill()
        shifted.start(None)
        return f"restarted {target} with the clock {shift}, and back after {length:.0f} s"
    if kind == "stop-cp":
        stopped = StoppedCP(target, time.time())
        await _ctl(system, "stop", target)
        stopped.since = time.time()  # acknowledged: Central has stopped it
        log.stopped.append(stopped)
        await asyncio.sleep(length)
        stopped.until = time.time()
        await _ctl(system, "resume", target)
        return f"admin stopped {target} for {length:.1f} s"
    if kind in NET_KINDS:
        return await _network(system, fault)
    raise ValueError(f"unknown fault kind {kind!r}")


async def _network(system: System, fault: Fault) -> str:
    """A PC's link cut, lossy or slow for the fault's length, then as it was (even if the
    waiting is cut short)."""
    hosts = system.hosts
    if hosts is None:
        raise RuntimeError(f"{fault.kind} needs the simulated PCs (--net)")
    pc, length = fault.target, fault.length
    if fault.kind == "net-cut":
        await asyncio.to_thread(hosts.cut, pc)
        try:
            await asyncio.sleep(length)
        finally:
            await asyncio.to_thread(hosts.mend, pc)
        return f"{pc} off the network for {length:.1f} s"
    await asyncio.to_thread(hosts.netem, pc, fault.detail)
    try:
        await asyncio.sleep(length)
    finally:
        what = await asyncio.to_thread(hosts.clear, pc)
    return f"{fault.detail} on {pc}'s link for {length:.1f} s: {what}"


async def _ctl(system: System, action: str, cp_id: str) -> None:
    """`EV_Central ctl stop|resume CP`, retried while Central is away (it may be restarting)."""
    password = system.work / "admin.password"
    if not password.exists():
        password.write_text(DEMO_ADMIN_PASSWORD + "\n")
        password.chmod(0o600)
    for _ in range(30):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "EV_Central", "ctl", "--central", system.admin]
            + ["--password-file", str(password), action, cp_id],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:
            return
        await asyncio.sleep(1.0)
    raise RuntimeError(f"ctl {action} {cp_id} failed: {done.stderr.strip()[-300:]}")
