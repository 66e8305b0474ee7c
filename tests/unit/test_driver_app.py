"""The driver app's asyncio layer (EV_Driver.app) against an in-memory stand-in for Kafka.

The stand-in answers like Central would; timing and ordering are what is tested here. The
real broker is exercised by the integration tests.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from EV_Driver import __main__ as cli
from EV_Driver.app import DriverApp, outcome_exit_code
from EV_Driver.config import DriverSettings, ExitCode, parse_settings
from EV_Driver.flow import Outcome
from EV_Driver.output import Output
from EV_Driver.session import DriverSession, login_key
from shared import messages as m
from shared.bus import Topics
from shared.lifecycle import Shutdown
from shared.sealing import Sealer, new_key, open_sealed, parse

D = "D1"
# The login the app is given: Central's side of the fake seals and opens with the same key.
KEY_ID, KEY = "testkey000000001", new_key()


class FakeRecord:
    def __init__(self, key: str, value: bytes) -> None:
        self.key = key.encode()
        self.value = value
        self.topic = Topics.DRIVER_UPDATES
        self.partition = 0
        self.offset = 0


class FakeConsumer:
    def __init__(self) -> None:
        self.records: asyncio.Queue[FakeRecord] = asyncio.Queue()
        self.stopped = False

    async def getone(self) -> FakeRecord:
        return await self.records.get()

    async def stop(self) -> None:
        self.stopped = True


Responder = Callable[["FakeBus", m.Message], None]


class FakeBus:
    """Records what the app sends; `respond` plays Central."""

    def __init__(self, consumer: FakeConsumer, respond: Responder) -> None:
        self.bootstrap = "fake:1"
        self.client_id = "test"
        self.consumer = consumer
        self.respond = respond
        self.sent: list[m.Message] = []
        self.started = self.stopped = False
        self.sealer = Sealer("driver-update", D, KEY_ID, KEY)

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True
        await self.consumer.stop()

    async def tail_consumer(self, topics: list[str]) -> FakeConsumer:
        assert topics == [Topics.DRIVER_UPDATES]
        return self.consumer

    async def probe_clock(self) -> float:
        return time.time()  # the network's clock and this one agree

    async def send_raw(self, topic: str, key: bytes, value: bytes) -> None:
        assert topic == Topics.DRIVER_REQUESTS and key == D.encode()
        message = m.decode(m.DRIVER_REQUESTS, open_sealed(parse(value), KEY))
        self.sent.append(message)
        self.respond(self, message)

    def update(self, message: m.Message, key: str = D) -> None:
        sealed = self.sealer.seal(message.id, m.encode(message))
        self.consumer.records.put_nowait(FakeRecord(key, sealed))

    def raw(self, value: bytes) -> None:
        self.consumer.records.put_nowait(FakeRecord(D, value))


def central(
    *,
    known: bool = True,
    deny: frozenset[str] | set[str] = frozenset(),
    silent: frozenset[str] | set[str] = frozenset(),
    refuse: frozenset[str] | set[str] = frozenset(),
    ignore_queries: int = 0,
) -> Responder:
    """Central: supplies at every CP except those it denies, ignores, or whose engine refuses."""
    state = {"queries": 0, "sessions": 0}

    def respond(bus: FakeBus, message: m.Message) -> None:
        if isinstance(message, m.StatusQuery):
            state["queries"] += 1
            if state["queries"] <= ignore_queries:
                return
            bus.raw(b"{not a message")
            bus.update(m.DriverNotice(driver_id="D2", text="for someone else"), key="D2")
            bus.update(m.DriverStatus(driver_id=D, request_id=message.id, known=known))
        elif isinstance(message, m.SupplyRequest):
            cp = message.cp_id
            if cp in silent:
                return
            if cp in deny:
                bus.update(
                    m.RequestDenied(
                        driver_id=D,
                        cp_id=cp,
                        request_id=message.id,
                        reason=m.DenialReason.CP_UNAVAILABLE,
                    )
                )
                return
            state["sessions"] += 1
            sid = f"s{state['sessions']}"
            bus.update(
                m.RequestAccepted(driver_id=D, cp_id=cp, request_id=message.id, session_id=sid)
            )
            if cp in refuse:
                # Accepted by Central, then refused by the CP's engine.
                bus.update(
                    m.RequestDenied(
                        driver_id=D,
                        cp_id=cp,
                        request_id=message.id,
                        reason=m.DenialReason.CP_REFUSED,
                        detail="engine is KO",
                    )
                )
                return
            bus.update(
                m.SupplyAuthorized(
                    driver_id=D, cp_id=cp, session_id=sid, price_eur_kwh=0.35, expires_at=0
                )
            )
            bus.update(m.SupplyStarted(driver_id=D, cp_id=cp, session_id=sid))
            bus.update(
                m.SupplyProgress(
                    driver_id=D, cp_id=cp, session_id=sid, kw=7.4, kwh=0.01, amount_eur=0.0
                )
            )
            bus.update(
                m.Ticket(
                    ticket=m.TicketData(
                        session_id=sid,
                        cp_id=cp,
                        driver_id=D,
                        kwh=0.01,
                        price_eur_kwh=0.35,
                        amount_eur=0.0,
                        reason=m.EndReason.UNPLUGGED,
                        started_at=None,
                        ended_at=1.0,
                    )
                )
            )

    return respond


async def run_app(
    monkeypatch: pytest.MonkeyPatch,
    respond: Responder,
    cp_ids: tuple[str, ...],
    *,
    pause: float = 0.0,
    reply_timeout: float = 0.2,
    shutdown: Shutdown | None = None,
) -> tuple[DriverApp, FakeBus, list[dict[str, Any]]]:
    consumer = FakeConsumer()

    bus = FakeBus(consumer, respond)
    settings = DriverSettings(
        broker="fake:1",
        driver_id=D,
        cp_ids=cp_ids,
        source="test",
        json=True,
        pause=pause,
        reply_timeout=reply_timeout,
    )
    stream = io.StringIO()
    session = DriverSession(D, KEY_ID, KEY, expires_at=time.time() + 3600)
    output = Output(json_mode=True, stream=stream)
    driver = DriverApp(settings, output, shutdown or Shutdown(), bus, session)  # type: ignore[arg-type]
    await asyncio.wait_for(driver.run(), 10)
    assert bus.stopped and consumer.stopped
    return driver, bus, [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_requests_run_one_after_another(monkeypatch: pytest.MonkeyPatch) -> None:
    driver, bus, events = await run_app(
        monkeypatch, central(deny={"CP002"}), ("CP001", "CP002", "CP003")
    )
    assert driver.exit_code == ExitCode.DENIED  # one of the three was denied
    assert [e["event"] for e in events] == [
        "available",
        "accepted", "authorized", "started", "telemetry", "ticket",
        "denied",
        "accepted", "authorized", "started", "telemetry", "ticket",
    ]  # fmt: skip
    kinds = [type(msg).__name__ for msg in bus.sent]
    assert kinds == [
        "StatusQuery", "SupplyRequest", "TicketAck", "SupplyRequest", "SupplyRequest", "TicketAck",
    ]  # fmt: skip
    assert [msg.cp_id for msg in bus.sent if isinstance(msg, m.SupplyRequest)] == [
        "CP001", "CP002", "CP003",
    ]  # fmt: skip


async def test_pause_between_requests_but_not_after_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run_app(monkeypatch, central(deny={"CP001", "CP002"}), ("CP001", "CP002"), pause=0.3)
    elapsed = loop.time() - started
    assert 0.3 <= elapsed < 0.6


async def test_unknown_driver_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    driver, bus, events = await run_app(monkeypatch, central(known=False), ("CP001",))
    assert driver.exit_code == 1
    assert events == [
        {"event": "error", "driver_id": D, "cp_id": None, "session_id": None,
         "message": "unknown driver ID D1"},
    ]  # fmt: skip
    assert not any(isinstance(msg, m.SupplyRequest) for msg in bus.sent)


async def test_status_query_is_repeated_until_central_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver, bus, events = await run_app(
        monkeypatch, central(ignore_queries=3, deny={"CP001"}), ("CP001",), reply_timeout=0.05
    )
    assert driver.exit_code == ExitCode.DENIED
    assert sum(isinstance(msg, m.StatusQuery) for msg in bus.sent) == 4
    assert events[0]["event"] == "error" and "cannot reach Central" in events[0]["message"]
    assert sum(e["event"] == "error" for e in events) == 1  # said once, not at every retry
    assert [e["event"] for e in events[1:]] == ["available", "denied"]


async def test_no_answer_to_a_request_is_an_error_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver, _, events = await run_app(
        monkeypatch,
        central(silent={"CP001"}, deny={"CP002"}),
        ("CP001", "CP002"),
        reply_timeout=0.05,
    )
    assert [e["event"] for e in events] == ["available", "error", "denied"]
    assert events[1]["cp_id"] == "CP001"
    assert driver.exit_code == 1


async def test_shutdown_stops_a_waiting_app(monkeypatch: pytest.MonkeyPatch) -> None:
    shutdown = Shutdown()
    asyncio.get_running_loop().call_later(0.2, shutdown.request)
    driver, bus, events = await run_app(
        monkeypatch, central(silent={"CP001"}), ("CP001",), reply_timeout=60, shutdown=shutdown
    )
    assert driver.exit_code == ExitCode.STOPPED  # no outcome: a script must not read success
    assert [e["event"] for e in events] == ["available"]


# --- exit codes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("respond", "code"),
    [
        (central(), ExitCode.OK),
        (central(deny={"CP001"}), ExitCode.DENIED),
        (central(refuse={"CP001"}), ExitCode.DENIED),
        (central(silent={"CP001"}), ExitCode.FAILED),
    ],
    ids=["ticket", "denied", "refused-by-the-cp", "no-answer"],
)
async def test_exit_code_of_a_single_request(
    monkeypatch: pytest.MonkeyPatch, respond: Responder, code: ExitCode
) -> None:
    driver, _, _ = await run_app(monkeypatch, respond, ("CP001",), reply_timeout=0.05)
    assert driver.exit_code == code


async def test_a_refusal_by_the_cp_after_acceptance_ends_the_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver, _, events = await run_app(
        monkeypatch, central(refuse={"CP001"}), ("CP001", "CP002"), reply_timeout=0.05
    )
    assert [e["event"] for e in events] == [
        "available", "accepted", "denied",
        "accepted", "authorized", "started", "telemetry", "ticket",
    ]  # fmt: skip
    assert (events[2]["reason"], events[2]["detail"]) == ("cp_refused", "engine is KO")
    assert driver.exit_code == ExitCode.DENIED


@pytest.mark.parametrize(
    ("outcomes", "requests", "code"),
    [
        ([Outcome.TICKET, Outcome.TICKET], 2, ExitCode.OK),
        ([Outcome.TICKET, Outcome.DENIED], 2, ExitCode.DENIED),
        ([Outcome.DENIED, Outcome.ERROR, Outcome.TICKET], 3, ExitCode.FAILED),
        ([Outcome.DENIED], 2, ExitCode.STOPPED),
        ([Outcome.ERROR], 2, ExitCode.FAILED),
        ([], 1, ExitCode.STOPPED),
    ],
)
def test_the_worst_outcome_of_a_file_decides(
    outcomes: list[Outcome], requests: int, code: ExitCode
) -> None:
    assert outcome_exit_code(outcomes, requests) == code


@pytest.mark.parametrize(
    ("respond", "code", "shown"),
    [
        (central(), 0, "ticket: CP001"),
        (central(deny={"CP001"}), 3, "denied: the charging point is not available"),
        (central(refuse={"CP001"}), 3, "denied: the charging point refused the authorisation"),
    ],
    ids=["ticket", "denied", "refused-by-the-cp"],
)
def test_the_process_exit_code(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    respond: Responder,
    code: int,
    shown: str,
) -> None:
    """The whole command line (python -m EV_Driver --cp CP001) with Kafka and a login faked."""

    def app_on_a_fake_bus(settings: DriverSettings, output: Output, shutdown: Shutdown) -> Any:
        session = DriverSession(D, KEY_ID, KEY, expires_at=time.time() + 3600)
        bus = FakeBus(FakeConsumer(), respond)
        return DriverApp(settings, output, shutdown, bus, session)  # type: ignore[arg-type]

    for name in [name for name in os.environ if name.startswith("EV_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(cli, "DriverApp", app_on_a_fake_bus)
    monkeypatch.setattr(cli, "setup_logging", lambda *args: None)  # keep pytest's log capture
    argv = ["--broker", "fake:1", "--driver-id", D, "--cp", "CP001", "--reply-timeout", "0.2"]
    assert cli.main(argv) == code
    assert shown in capsys.readouterr().out


def test_the_login_key_is_kept_between_runs_for_the_owner_only(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def public(key: Any) -> bytes:
        return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    settings = parse_settings(
        ["--broker", "127.0.0.1:9092", "--driver-id", "user1", "--cp", "CP001"],
        {"XDG_STATE_HOME": str(tmp_path)},
    )
    path = settings.login_key_file
    assert path == tmp_path / "ev-charging" / "driver-user1.key"
    first = login_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert public(login_key(path)) == public(first)  # the next run is the same source
    path.write_text("not a key")
    replaced = login_key(path)  # unusable: a new one, said in the log
    assert public(replaced) != public(first) and "unusable" in caplog.text
    assert public(login_key(path)) == public(replaced)
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert login_key(blocked / "driver-user1.key") is not None  # this run only
    assert "a new one each run" in caplog.text
