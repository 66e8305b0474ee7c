"""The real engine and monitor processes over real TCP, with a small in-test Central.

Central's monitor socket is played by a FramedConnection server in the test; the engine's
Kafka side is exercised against the session broker in the tests marked `kafka`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from helpers import free_port, scaled, wait_for
from shared.bus import KafkaBus, Topics
from shared.errors import ConnectionLost, EVError
from shared.framed import FramedConnection, FramedServer, serve_framed
from shared.messages import (
    CP_EVENTS,
    MONITOR_TO_CENTRAL,
    AuthorizeSupply,
    AuthResult,
    CPAuthorisation,
    CPPlugged,
    CPRequest,
    CPState,
    CPStatusNotice,
    CPSupplyEnded,
    CPTelemetry,
    EndReason,
    FaultReport,
    Heartbeat,
    Message,
    MonitorAuth,
    MonitorToCentral,
    RecoveryReport,
    StartSupply,
    decode,
    encode,
)
from shared.sealing import Sealer, b64, new_key, open_sealed, parse

REPO_ROOT = Path(__file__).resolve().parents[2]
INTERVAL = 0.5


# --- helpers -----------------------------------------------------------------------------------


class Service:
    """A service process whose stdout lines are collected as they arrive."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, stderr_path: Path) -> None:
        self.proc = proc
        self.name = name
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def saw(self, text: str, since: int = 0) -> bool:
        return any(text in line for line in self.lines[since:])

    async def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        await self.proc.stdin.drain()

    def describe(self) -> str:
        stderr = self.stderr_path.read_text(errors="replace")[-3000:]
        return f"{self.name} stdout:\n" + "\n".join(self.lines[-40:]) + f"\nstderr:\n{stderr}"

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), scaled(10))
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._reader, scaled(5))
        assert self.proc.returncode is not None
        return self.proc.returncode


Launcher = Callable[..., Any]


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launcher]:
    """Start `python -m MODULE ARGS...`; every process is stopped after the test."""
    started: list[Service] = []

    async def start(module: str, *args: str) -> Service:
        stderr_path = tmp_path / f"{module}-{len(started)}.stderr"
        with stderr_path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        service = Service(proc, module, stderr_path)
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()


class FakeCentral:
    """Central's monitor socket: accepts every CP, records every frame it receives."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[MonitorToCentral] = []
        self._server: FramedServer[MonitorToCentral] | None = None
        self._connections: set[FramedConnection[MonitorToCentral]] = set()
        # The key this fake issues to every CP, as Central does at authentication.
        self.key_id, self.key = "fakekey000000001", new_key()
        self.sealers: dict[str, Sealer] = {}

    async def start(self) -> None:
        self._server = await serve_framed(
            self._handle, "127.0.0.1", self.port, MONITOR_TO_CENTRAL, name="fake-central"
        )

    async def stop(self) -> None:
        for connection in list(self._connections):
            await connection.close()
        if self._server is not None:
            await self._server.close()
            self._server = None

    def seal(self, command: Message) -> bytes:
        """A command sealed the way Central seals it, with the key this fake issued."""
        cp_id = getattr(command, "cp_id", "")
        sealer = self.sealers.setdefault(cp_id, Sealer("cp-command", cp_id, self.key_id, self.key))
        return sealer.seal(command.id, encode(command))

    def open(self, value: bytes) -> Any:
        return decode(CP_EVENTS, open_sealed(parse(value), self.key))

    async def _handle(self, connection: FramedConnection[MonitorToCentral]) -> None:
        self._connections.add(connection)
        try:
            while True:
                message = await connection.receive()
                self.received.append(message)
                if isinstance(message, MonitorAuth):
                    await connection.send(
                        AuthResult(
                            cp_id=message.cp_id,
                            accepted=True,
                            location="Test Street 1",
                            price_eur_kwh=0.35,
                            key_id=self.key_id,
                            key=b64(self.key),
                        )
                    )
                    await connection.send(
                        CPStatusNotice(cp_id=message.cp_id, state=CPState.ACTIVADO)
                    )
        except EVError:
            pass
        finally:
            self._connections.discard(connection)

    def count(self, kind: type[Message]) -> int:
        return sum(isinstance(m, kind) for m in self.received)

    def since(self, index: int, kind: type[Message]) -> list[Any]:
        return [m for m in self.received[index:] if isinstance(m, kind)]


@pytest.fixture
async def central() -> AsyncIterator[FakeCentral]:
    fake = FakeCentral(free_port())
    await fake.start()
    yield fake
    await fake.stop()


def new_cp_id() -> str:
    return "CPT" + uuid.uuid4().hex[:8]


async def start_pair(
    launch: Launcher, central: FakeCentral, cp_id: str, broker: str, *engine_args: str
) -> tuple[Service, Service, int]:
    engine_port = free_port()
    engine = await launch(
        "EV_CP_E", "--broker", broker, "--listen", f"127.0.0.1:{engine_port}", *engine_args
    )
    await wait_for(
        lambda: engine.saw("IDLE"), 15, message="engine did not start\n" + engine.describe()
    )
    monitor = await launch(
        "EV_CP_M",
        "--engine",
        f"127.0.0.1:{engine_port}",
        "--central",
        f"127.0.0.1:{central.port}",
        "--cp-id",
        cp_id,
        "--interval",
        str(INTERVAL),
        "--secret",
        "test-secret",
    )
    return engine, monitor, engine_port


def engine_status(engine: Service) -> str:
    """The engine's latest status line."""
    for line in reversed(engine.lines):
        if re.search(r"^\[[^]]+\] (IDLE|AUTHORISED|SUPPLYING)\b", line):
            return line
    return ""


def heartbeat_ok(central: FakeCentral, since: int = 0) -> bool:
    return any(isinstance(m, Heartbeat) and m.engine_ok for m in central.received[since:])


# --- monitor <-> engine <-> Central (the engine reports OK once it listens to Kafka) -----------


@pytest.mark.kafka
async def test_monitor_reports_engine_ko_and_recovery(
    launch: Launcher, central: FakeCentral, kafka_bootstrap: str
) -> None:
    cp_id = new_cp_id()
    engine, monitor, _ = await start_pair(launch, central, cp_id, kafka_bootstrap)

    await wait_for(lambda: central.count(MonitorAuth), 10, message=monitor.describe())
    auth = central.since(0, MonitorAuth)[0]
    assert auth.cp_id == cp_id
    await wait_for(lambda: heartbeat_ok(central), 10, message=monitor.describe())
    await wait_for(lambda: engine.saw(f"this engine is {cp_id}"), 5, message=engine.describe())
    await wait_for(lambda: monitor.saw("CP state at Central: ACTIVADO"), 5)
    assert monitor.saw("Central link up")

    mark = len(central.received)
    await engine.type("k")
    faults = await wait_for(
        lambda: central.since(mark, FaultReport), 2, message="no FaultReport after k"
    )
    assert faults[0].cp_id == cp_id
    await wait_for(lambda: engine.saw("IDLE (engine KO"), 2, message=engine.describe())
    await wait_for(
        lambda: any(isinstance(m, Heartbeat) and not m.engine_ok for m in central.received[mark:]),
        3,
    )

    mark = len(central.received)
    await engine.type("o")
    await wait_for(
        lambda: central.since(mark, RecoveryReport), 2, message="no RecoveryReport after o"
    )
    await wait_for(lambda: heartbeat_ok(central, mark), 3)

    await engine.type("x")
    await wait_for(lambda: engine.saw("commands: p plug in"), 3, message=engine.describe())

    await engine.type("q")
    assert await asyncio.wait_for(engine.proc.wait(), scaled(10)) == 0
    assert "Traceback" not in engine.stderr_path.read_text()


@pytest.mark.kafka
async def test_killed_engine_is_reported_as_a_fault(
    launch: Launcher, central: FakeCentral, kafka_bootstrap: str
) -> None:
    cp_id = new_cp_id()
    engine, monitor, _ = await start_pair(launch, central, cp_id, kafka_bootstrap)
    await wait_for(lambda: heartbeat_ok(central), 10, message=monitor.describe())

    mark, line_mark = len(central.received), len(monitor.lines)
    engine.proc.send_signal(signal.SIGKILL)
    await engine.proc.wait()
    await wait_for(lambda: central.since(mark, FaultReport), 2, message=monitor.describe())
    await wait_for(
        lambda: monitor.saw("cannot reach engine at 127.0.0.1:", line_mark),
        5,
        message=monitor.describe(),
    )
    assert monitor.saw("engine KO", line_mark)
    await wait_for(
        lambda: any(isinstance(m, Heartbeat) and not m.engine_ok for m in central.received[mark:]),
        3,
    )
    assert monitor.proc.returncode is None  # the monitor keeps running
    assert "Traceback" not in monitor.stderr_path.read_text()


@pytest.mark.kafka
async def test_monitor_reconnects_when_central_returns(
    launch: Launcher, central: FakeCentral, kafka_bootstrap: str
) -> None:
    cp_id = new_cp_id()
    _, monitor, _ = await start_pair(launch, central, cp_id, kafka_bootstrap)
    await wait_for(lambda: heartbeat_ok(central), 10, message=monitor.describe())

    line_mark = len(monitor.lines)
    await central.stop()
    await wait_for(
        lambda: monitor.saw(f"cannot reach Central at 127.0.0.1:{central.port}", line_mark),
        5,
        message=monitor.describe(),
    )
    assert monitor.saw("Central link down", line_mark)

    mark = len(central.received)
    await central.start()
    await wait_for(lambda: central.since(mark, MonitorAuth), 15, message="no re-authentication")
    await wait_for(lambda: heartbeat_ok(central, mark), 5, message=monitor.describe())
    assert monitor.proc.returncode is None
    assert "Traceback" not in monitor.stderr_path.read_text()


async def test_command_lines_fail_cleanly(launch: Launcher) -> None:
    engine = await launch("EV_CP_E", "--listen", "nonsense")
    assert await asyncio.wait_for(engine.proc.wait(), scaled(10)) == 2
    err = engine.stderr_path.read_text().strip()
    assert len(err.splitlines()) == 1 and "error" in err

    monitor = await launch("EV_CP_M", "dashboard")
    assert await asyncio.wait_for(monitor.proc.wait(), scaled(10)) == 2
    err = monitor.stderr_path.read_text().strip()
    assert len(err.splitlines()) == 1 and "--broker" in err

    bad_id = await launch(
        "EV_CP_M", "--engine", "h:1", "--central", "h:2", "--cp-id", "no spaces allowed"
    )
    assert await asyncio.wait_for(bad_id.proc.wait(), scaled(10)) == 2


# --- the engine over Kafka ---------------------------------------------------------------------


class EventLog:
    """Every CP event of one CP id, read from the end of the topic."""

    def __init__(self, consumer: AIOKafkaConsumer, cp_id: str, central: FakeCentral) -> None:
        self.cp_id = cp_id
        self.central = central
        self.events: list[Message] = []
        self._consumer = consumer
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for record in self._consumer:
            if record.key != self.cp_id.encode():
                continue
            event = self.central.open(record.value)
            if event.cp_id == self.cp_id:
                self.events.append(event)

    def of(self, kind: type[Message], since: int = 0) -> list[Any]:
        return [e for e in self.events[since:] if isinstance(e, kind)]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._consumer.stop()


@pytest.mark.kafka
async def test_engine_supplies_over_kafka(
    launch: Launcher, central: FakeCentral, kafka_bootstrap: str
) -> None:
    cp_id = new_cp_id()
    bus = KafkaBus(kafka_bootstrap, client_id="test-monitor-engine")
    await bus.start()
    log: EventLog | None = None
    try:
        log = EventLog(await bus.tail_consumer([Topics.CP_EVENTS]), cp_id, central)
        engine, monitor, _ = await start_pair(
            launch, central, cp_id, kafka_bootstrap, "--tick", "0.2"
        )
        await wait_for(lambda: heartbeat_ok(central), 10, message=monitor.describe())
        await wait_for(
            lambda: engine.saw("listening for Central's commands"),
            30,
            message=engine.describe(),
        )
        # Ready: the engine has heard from its monitor that Central is reachable.
        await wait_for(
            lambda: engine_status(engine).endswith("IDLE (ready)"), 10, message=engine.describe()
        )

        async def authorise(session_id: str) -> None:
            command = AuthorizeSupply(
                cp_id=cp_id,
                session_id=session_id,
                driver_id="user1",
                price_eur_kwh=0.5,
                max_kw=36.0,
                expires_at=time.time() + 60,
            )
            await bus.send_raw(Topics.CP_COMMANDS, cp_id.encode(), central.seal(command))
            await wait_for(
                lambda: engine.saw(f"session {session_id}"), 10, message=engine.describe()
            )

        async def start(session_id: str) -> None:
            """Central's word after the plug: the engine meters from now on."""
            go = StartSupply(cp_id=cp_id, session_id=session_id)
            await bus.send_raw(Topics.CP_COMMANDS, cp_id.encode(), central.seal(go))

        # A whole supply: authorise, plug, Central's word, telemetry, unplug.
        await authorise("sess1")
        await engine.type("p")
        await wait_for(lambda: log.of(CPPlugged), 10, message=engine.describe())
        await asyncio.sleep(0.5)
        assert not log.of(CPTelemetry)  # plugged in, but nothing flows before Central's word
        await start("sess1")
        await wait_for(lambda: len(log.of(CPTelemetry)) >= 3, 10, message=engine.describe())
        await engine.type("u")
        ended = (await wait_for(lambda: log.of(CPSupplyEnded), 10, message=engine.describe()))[0]
        telemetry = log.of(CPTelemetry)
        assert [t.seq for t in telemetry] == list(range(1, len(telemetry) + 1))
        assert ended.session_id == "sess1" and ended.reason is EndReason.UNPLUGGED
        assert ended.kwh >= telemetry[-1].kwh > 0
        assert ended.amount_eur == round(ended.kwh * 0.5, 2)
        assert ended.started_at is not None

        # A request from the CP's own menu.
        await engine.type("r user9")
        request = (await wait_for(lambda: log.of(CPRequest), 10, message=engine.describe()))[0]
        assert request.driver_id == "user9"

        # KO during a supply ends it with the energy so far, and the monitor reports it.
        mark, central_mark = len(log.events), len(central.received)
        await authorise("sess2")
        await engine.type("p")
        await wait_for(lambda: log.of(CPPlugged, mark), 10)
        await start("sess2")
        await wait_for(lambda: log.of(CPTelemetry, mark), 10, message=engine.describe())
        await engine.type("k")
        ended2 = (await wait_for(lambda: log.of(CPSupplyEnded, mark), 10))[0]
        assert ended2.session_id == "sess2" and ended2.reason is EndReason.ENGINE_FAULT
        assert ended2.kwh > 0
        await wait_for(lambda: central.since(central_mark, FaultReport), 2)
        # ...and refuses the next authorisation at once.
        command = AuthorizeSupply(
            cp_id=cp_id,
            session_id="sess3",
            driver_id="user1",
            price_eur_kwh=0.5,
            max_kw=36.0,
            expires_at=time.time() + 60,
        )
        await bus.send_raw(Topics.CP_COMMANDS, cp_id.encode(), central.seal(command))
        answers = await wait_for(
            lambda: [e for e in log.of(CPAuthorisation, mark) if e.session_id == "sess3"], 10
        )
        assert (answers[0].accepted, answers[0].reason) == (False, "engine KO")
        assert not [e for e in log.of(CPSupplyEnded, mark) if e.session_id == "sess3"]

        # Quitting mid-supply ends it as unplugged and flushes the event first.
        await engine.type("o")
        mark = len(log.events)
        await authorise("sess4")
        await engine.type("p")
        await wait_for(lambda: log.of(CPPlugged, mark), 10)
        await engine.type("q")
        assert await asyncio.wait_for(engine.proc.wait(), scaled(10)) == 0
        last = (await wait_for(lambda: log.of(CPSupplyEnded, mark), 10))[0]
        assert last.session_id == "sess4" and last.reason is EndReason.UNPLUGGED
    finally:
        if log is not None:
            await log.close()
        await bus.stop()


@pytest.mark.kafka
async def test_lost_monitor_ends_the_supply_and_blocks_requests(
    launch: Launcher, central: FakeCentral, kafka_bootstrap: str
) -> None:
    cp_id = new_cp_id()
    bus = KafkaBus(kafka_bootstrap, client_id="test-monitor-lost")
    await bus.start()
    log: EventLog | None = None
    try:
        log = EventLog(await bus.tail_consumer([Topics.CP_EVENTS]), cp_id, central)
        engine, monitor, _ = await start_pair(
            launch,
            central,
            cp_id,
            kafka_bootstrap,
            "--tick",
            "0.2",
            "--auto-plug",
            "0.3",
            "--health-timeout",
            "1.5",
        )
        await wait_for(lambda: heartbeat_ok(central), 10, message=monitor.describe())
        await wait_for(lambda: engine.saw("listening for Central's commands"), 30)
        await wait_for(lambda: engine_status(engine).endswith("IDLE (ready)"), 10)
        command = AuthorizeSupply(
            cp_id=cp_id,
            session_id="sessA",
            driver_id="user2",
            price_eur_kwh=0.4,
            max_kw=22.0,
            expires_at=time.time() + 60,
        )
        await bus.send_raw(Topics.CP_COMMANDS, cp_id.encode(), central.seal(command))
        await wait_for(lambda: log.of(CPPlugged), 10, message=engine.describe())  # auto-plug
        go = StartSupply(cp_id=cp_id, session_id="sessA")
        await bus.send_raw(Topics.CP_COMMANDS, cp_id.encode(), central.seal(go))
        await wait_for(lambda: log.of(CPTelemetry), 10)

        monitor.proc.send_signal(signal.SIGKILL)
        await monitor.proc.wait()
        ended = (await wait_for(lambda: log.of(CPSupplyEnded), 10, message=engine.describe()))[0]
        assert ended.reason is EndReason.MONITOR_LOST and ended.kwh > 0
        await wait_for(lambda: engine.saw("monitor lost"), 2, message=engine.describe())

        line_mark = len(engine.lines)
        await engine.type("r user2")
        await wait_for(
            lambda: engine.saw("refused: monitor lost", line_mark), 5, message=engine.describe()
        )
        assert not log.of(CPRequest)
    finally:
        if log is not None:
            await log.close()
        await bus.stop()


# ConnectionLost is part of the FakeCentral's contract with FramedConnection.
assert issubclass(ConnectionLost, EVError)
