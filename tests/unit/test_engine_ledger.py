"""The engine's ledger (--ledger): a JSON line for each supply accepted, each telemetry sample and
each supply's end, on file before the event goes to the outbox (and so before Central can see
it). Driven without Kafka: commands are fed to the service sealed, as Central sends them."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from EV_CP_E.config import EngineSettings, parse_settings
from EV_CP_E.ledger import Ledger
from EV_CP_E.service import EngineService
from shared.lifecycle import Shutdown
from shared.messages import (
    AuthorizeSupply,
    CPAuthorisation,
    CPPlugged,
    EndReason,
    EndSupply,
    Message,
    StartSupply,
    encode,
)
from shared.sealing import Sealer, new_key

CP = "CP001"
KEY_ID = "key0000001"


class Engine:
    """An engine for CP001 that holds its key, with its monitor and Central there."""

    def __init__(self, ledger: Path) -> None:
        self.service = EngineService(
            EngineSettings(broker="127.0.0.1:1", listen=("127.0.0.1", 0), ledger=ledger),
            Shutdown(),
            screen=io.StringIO(),
        )
        assert self.service.machine.set_cp_id(CP)
        key = new_key()
        self.service._channel_of(CP).take_key(KEY_ID, key)
        self.service.machine.health_check(True)
        self.sealer = Sealer("cp-command", CP, KEY_ID, key)
        self.path = ledger
        # What the ledger held each time an event went to the outbox: (event type, lines).
        self.published: list[tuple[str, int]] = []
        self.events: list[Message] = []
        publish = self.service._publish

        def spy(event: Message) -> None:
            self.published.append((type(event).__name__, len(self.lines())))
            self.events.append(event)
            publish(event)

        self.service._publish = spy  # type: ignore[method-assign]

    def command(self, command: Message) -> None:
        stamped = time.time()
        self.service._on_record(
            SimpleNamespace(
                key=CP.encode(),
                value=self.sealer.seal(command.id, encode(command)),
                timestamp=round(stamped * 1000),
                timestamp_type=1,
                topic="ev.cp.commands",
                partition=0,
                offset=0,
            )
        )

    def plug(self, session_id: str = "s1") -> None:
        """The car plugs in and Central starts the supply."""
        self.service._apply(self.service.machine.plug())
        self.command(StartSupply(cp_id=CP, session_id=session_id))

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def raw(self) -> list[str]:
        return self.path.read_text().splitlines()


def authorisation(session_id: str = "s1", max_kwh: float | None = None) -> AuthorizeSupply:
    return AuthorizeSupply(
        cp_id=CP,
        session_id=session_id,
        driver_id="user1",
        price_eur_kwh=0.35,
        max_kw=36.0,
        max_kwh=max_kwh,
        expires_at=time.time() + 60,
    )


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = Engine(tmp_path / "ledger.jsonl")
    yield engine
    assert engine.service.ledger is not None
    engine.service.ledger.close()


def test_a_supply_is_on_the_ledger_line_by_line_before_central_is_told(engine: Engine) -> None:
    service, machine = engine.service, engine.service.machine
    engine.command(authorisation(max_kwh=12.5))
    engine.plug()
    for _ in range(3):
        service._apply(machine.tick(1.0))
    service._apply(machine.unplug())

    lines = engine.lines()
    # "ts" last: the stamp of the event each line records (the plug has no line).
    assert [list(line)[-1] for line in lines] == ["ts"] * 5
    stamps = [e.ts for e in engine.events if not isinstance(e, CPPlugged)]
    assert [line.pop("ts") for line in lines] == stamps
    assert lines == [
        {
            "event": "authorised",
            "cp_id": CP,
            "session_id": "s1",
            "driver_id": "user1",
            "price_eur_kwh": 0.35,
            "max_kwh": 12.5,
        },
        {
            "event": "tick",
            "cp_id": CP,
            "session_id": "s1",
            "driver_id": "user1",
            "seq": 1,
            "kwh": 0.01,
            "amount_eur": 0.0,
        },
        {
            "event": "tick",
            "cp_id": CP,
            "session_id": "s1",
            "driver_id": "user1",
            "seq": 2,
            "kwh": 0.02,
            "amount_eur": 0.01,
        },
        {
            "event": "tick",
            "cp_id": CP,
            "session_id": "s1",
            "driver_id": "user1",
            "seq": 3,
            "kwh": pytest.approx(0.03),
            "amount_eur": 0.01,
        },
        {
            "event": "ended",
            "cp_id": CP,
            "session_id": "s1",
            "driver_id": "user1",
            "kwh": pytest.approx(0.03),
            "amount_eur": 0.01,
            "reason": "unplugged",
        },
    ]
    # Compact, "event" first.
    assert all(line.startswith('{"event":"') and ", " not in line for line in engine.raw())
    # Each line was on file before its event went to the outbox: the authorisation's answer
    # after line 1, the plug (no line of its own) after it, each tick after its line, the end
    # after its line.
    assert engine.published == [
        ("CPAuthorisation", 1),
        ("CPPlugged", 1),
        ("CPTelemetry", 2),
        ("CPTelemetry", 3),
        ("CPTelemetry", 4),
        ("CPSupplyEnded", 5),
    ]


def test_the_last_tick_and_the_end_keep_the_driver_when_the_balance_runs_out(
    engine: Engine,
) -> None:
    """The tick that reaches the energy limit ends the supply in the same step: the machine
    has forgotten the authorisation by the time both lines are written."""
    service, machine = engine.service, engine.service.machine
    engine.command(authorisation(max_kwh=0.015))
    engine.plug()
    service._apply(machine.tick(1.0))
    service._apply(machine.tick(1.0))

    tick, ended = engine.lines()[-2:]
    assert tick["event"] == "tick" and tick["kwh"] == 0.015 and tick["driver_id"] == "user1"
    del ended["ts"]
    assert ended == {
        "event": "ended",
        "cp_id": CP,
        "session_id": "s1",
        "driver_id": "user1",
        "kwh": 0.015,
        "amount_eur": 0.01,
        "reason": "balance_exhausted",
    }


def test_only_accepted_authorisations_are_on_the_ledger(engine: Engine) -> None:
    engine.command(authorisation("s1"))
    engine.command(authorisation("s1"))  # a redelivery: answered already
    engine.command(authorisation("s2"))  # busy with s1: refused

    assert [(line["event"], line["session_id"]) for line in engine.lines()] == [
        ("authorised", "s1")
    ]
    answers = [m for _, m, _ in engine.service._outbox if isinstance(m, CPAuthorisation)]
    assert [(a.session_id, a.accepted) for a in answers] == [("s1", True), ("s2", False)]


def test_an_authorisation_never_plugged_in_ends_on_the_ledger_with_no_energy(
    engine: Engine,
) -> None:
    service, machine = engine.service, engine.service.machine
    engine.command(authorisation())
    service._apply(machine.shutdown())  # quitting before the plug

    ended = engine.lines()[-1]
    del ended["ts"]
    assert ended == {
        "event": "ended",
        "cp_id": CP,
        "session_id": "s1",
        "driver_id": "user1",
        "kwh": 0.0,
        "amount_eur": 0.0,
        "reason": "unplugged",
    }


def test_a_withdrawn_authorisation_meters_nothing_though_the_car_plugged_in(
    engine: Engine,
) -> None:
    """Central gave up waiting for the acceptance (cp_no_answer) and sent a stop, which came
    after the car plugged in: no energy, because Central never said start_supply."""
    service, machine = engine.service, engine.service.machine
    engine.command(authorisation())
    service._apply(machine.plug())
    for _ in range(5):  # what the ticker would do meanwhile
        service._apply(machine.tick(1.0))
    engine.command(EndSupply(cp_id=CP, session_id="s1", reason=EndReason.AUTHORIZATION_EXPIRED))

    assert [(line["event"], line.get("kwh")) for line in engine.lines()] == [
        ("authorised", None),
        ("ended", 0.0),
    ]
    sent = [type(m).__name__ for _, m, _ in engine.service._outbox]
    assert sent == ["CPAuthorisation", "CPPlugged", "CPSupplyEnded"]


def test_lines_are_appended_to_what_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"event":"earlier"}\n')
    ledger = Ledger(path)
    try:
        ledger.write("later", n=1)
    finally:
        ledger.close()
    assert path.read_text() == '{"event":"earlier"}\n{"event":"later","n":1}\n'


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a full disk)")
def test_a_full_disk_is_logged_once_and_the_engine_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = EngineService(
        EngineSettings(broker="127.0.0.1:1", listen=("127.0.0.1", 0), ledger=Path("/dev/full")),
        Shutdown(),
        screen=io.StringIO(),
    )
    machine = service.machine
    assert machine.set_cp_id(CP)
    machine.health_check(True)
    try:
        with caplog.at_level(logging.WARNING, logger="EV_CP_E.service"):
            service._apply(machine.authorize(authorisation()))
            service._apply(machine.plug())
            service._apply(machine.start_supply(StartSupply(cp_id=CP, session_id="s1")))
            service._apply(machine.tick(1.0))
            service._apply(machine.unplug())
    finally:
        assert service.ledger is not None
        service.ledger.close()

    # Every event still went to the outbox.
    assert [type(m).__name__ for _, m, _ in service._outbox] == [
        "CPAuthorisation",
        "CPPlugged",
        "CPTelemetry",
        "CPSupplyEnded",
    ]
    failures = [r for r in caplog.records if "cannot write to the ledger" in r.getMessage()]
    assert len(failures) == 1, caplog.text
    assert "3 line(s) could not be written" in caplog.text


def test_the_flag_and_its_environment_variable(tmp_path: Path) -> None:
    base = ["--broker", "127.0.0.1:9092", "--listen", "127.0.0.1:6000"]
    path = tmp_path / "engine.jsonl"
    assert parse_settings([*base, "--ledger", str(path)], environ={}).ledger == path
    assert path.exists()  # created at start-up, empty
    other = tmp_path / "env.jsonl"
    assert parse_settings(base, environ={"EV_LEDGER": str(other)}).ledger == other
    assert parse_settings(base, environ={}).ledger is None


def test_an_unwritable_ledger_is_one_line_at_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--broker", "127.0.0.1:9092", "--listen", "127.0.0.1:6000"]
    missing = tmp_path / "no-such-dir" / "ledger.jsonl"
    with pytest.raises(SystemExit) as exit_:
        parse_settings([*base, "--ledger", str(missing)], environ={})
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith(f"EV_CP_E: error: argument --ledger: cannot append to {missing}")
