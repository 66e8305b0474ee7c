"""The engine's journal (--journal): the supply in hand and the events Kafka has not taken
survive a crash, and are sent again by the next engine once its monitor names the CP.

Driven without Kafka: an engine whose sender never runs keeps every event pending, as one
whose broker is away does; a second engine on the same journal is the one started again."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from EV_CP_E.config import EngineSettings, parse_settings
from EV_CP_E.journal import FORMAT, Held, Journal, recover
from EV_CP_E.service import EngineService
from shared.lifecycle import Shutdown
from shared.messages import (
    AuthorizeSupply,
    CPAuthorisation,
    CPPlugged,
    CPRequest,
    CPSupplyEnded,
    CPTelemetry,
    EndReason,
    Message,
    StartSupply,
    encode,
)
from shared.sealing import Sealer, new_key

CP = "CP001"
KEY_ID = "key0000001"
KW = 36.0


def engine(journal: Path, ledger: Path | None = None) -> EngineService:
    settings = EngineSettings(
        broker="127.0.0.1:1", listen=("127.0.0.1", 0), journal=journal, ledger=ledger
    )
    return EngineService(settings, Shutdown(), screen=io.StringIO())


def hello(service: EngineService, cp_id: str = CP) -> None:
    """What the monitor's hello does: the CP id learnt, the journal's events sent again."""
    assert service.machine.set_cp_id(cp_id)
    service._resume(cp_id)


def command(service: EngineService, sealer: Sealer, message: Message) -> None:
    service._on_record(
        SimpleNamespace(
            key=CP.encode(),
            value=sealer.seal(message.id, encode(message)),
            timestamp=round(time.time() * 1000),
            timestamp_type=1,
            topic="ev.cp.commands",
            partition=0,
            offset=0,
        )
    )


def authorised(service: EngineService) -> Sealer:
    """The engine named by its monitor, holding the CP's key and an accepted authorisation
    (session s1); what seals Central's further commands."""
    hello(service)
    key = new_key()
    service._channel_of(CP).take_key(KEY_ID, key)
    service.machine.health_check(True)
    sealer = Sealer("cp-command", CP, KEY_ID, key)
    authorise = AuthorizeSupply(
        cp_id=CP,
        session_id="s1",
        driver_id="user1",
        price_eur_kwh=0.35,
        max_kw=KW,
        expires_at=time.time() + 60,
    )
    command(service, sealer, authorise)
    return sealer


def supplying(service: EngineService, ticks: int) -> None:
    """An authorised supply, plugged in, started by Central, `ticks` samples metered."""
    sealer = authorised(service)
    service._apply(service.machine.plug())
    command(service, sealer, StartSupply(cp_id=CP, session_id="s1"))
    for _ in range(ticks):
        service._apply(service.machine.tick(1.0))


def outbox(service: EngineService) -> list[Message]:
    return [message for _, message, _ in service._outbox]


def test_an_engine_killed_mid_supply_reports_what_it_metered_when_started_again(
    tmp_path: Path,
) -> None:
    path, ledger = tmp_path / "engine.journal", tmp_path / "ledger.jsonl"
    first = engine(path)
    supplying(first, ticks=3)
    sent_before = outbox(first)
    # Kafka took none of it (it was away); then the process died: nothing more is written.
    state = json.loads(path.read_text())
    assert state["held"]["kwh"] == pytest.approx(3 * KW / 3600)
    assert [m["type"] for m in state["pending"]] == ["cp_authorisation", "cp_plugged"]

    second = engine(path, ledger)
    assert second._outbox == type(second._outbox)()  # nothing before the monitor's hello
    hello(second)
    resent = outbox(second)
    assert [m.id for m in resent[:2]] == [m.id for m in sent_before[:2]]  # the same events
    ended = resent[2]
    assert isinstance(ended, CPSupplyEnded)
    assert (ended.session_id, ended.reason) == ("s1", EndReason.ENGINE_FAULT)
    assert ended.kwh == pytest.approx(3 * KW / 3600)
    assert ended.started_at is not None
    assert second.machine.state.value == "IDLE"
    assert second.ledger is not None
    second.ledger.close()
    [line] = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert (line["event"], line["kwh"], line["driver_id"]) == ("ended", ended.kwh, "user1")
    # The journal now holds what waits for Kafka: the same three events, no supply in hand.
    state = json.loads(path.read_text())
    assert state["held"] is None and len(state["pending"]) == 3


def test_events_kafka_took_leave_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "engine.journal"
    service = engine(path)
    supplying(service, ticks=1)
    while service._outbox:  # as the sender does once Kafka takes each
        service._outbox.popleft()
        service._keep()
    service._apply(service.machine.unplug())
    state = json.loads(path.read_text())
    assert state["held"] is None
    [pending] = state["pending"]
    assert (pending["type"], pending["reason"]) == ("cp_supply_ended", "unplugged")
    service._outbox.clear()
    service._keep()
    assert recover(json.loads(path.read_text())) is None  # nothing left to send


def test_a_journal_of_another_cp_is_not_sent(tmp_path: Path) -> None:
    path = tmp_path / "engine.journal"
    supplying(engine(path), ticks=2)
    other = engine(path)
    other.machine.set_cp_id("CP002")
    other._resume("CP002")
    assert other._outbox == type(other._outbox)()
    assert "ignored a journal of another CP (CP001)" in other.screen.getvalue()  # type: ignore[attr-defined]


def test_an_unreadable_journal_is_kept_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "engine.journal"
    path.write_text('{"format": 1, "cp_id": "CP001", "held": null, "pending": [{"type": "x"}]}')
    assert Journal(path).load() is None
    assert not path.exists()
    assert (tmp_path / "engine.journal.unreadable").exists()
    assert "unreadable" in caplog.text
    assert Journal(tmp_path / "missing.journal").load() is None


def test_recovery_ends_the_supply_in_hand_once_and_drops_menu_requests() -> None:
    plugged = CPPlugged(cp_id=CP, session_id="s1")
    request = CPRequest(cp_id=CP, driver_id="user7")
    held = Held(session_id="s1", driver_id="user1", price_eur_kwh=0.5, kwh=1.0, started_at=5.0)
    state = {
        "format": FORMAT,
        "cp_id": CP,
        "held": held.__dict__,
        "pending": [json.loads(m.model_dump_json()) for m in (plugged, request)],
    }
    recovered = recover(state)
    assert recovered is not None
    assert [type(e) for e in recovered.events] == [CPPlugged, CPSupplyEnded]
    assert recovered.ended is not None
    assert (recovered.ended.kwh, recovered.ended.amount_eur) == (1.0, 0.5)
    # An end already waiting for Kafka is the supply's end: no second one is made.
    ended = CPSupplyEnded(
        cp_id=CP, session_id="s1", kwh=1.2, amount_eur=0.6, reason=EndReason.UNPLUGGED
    )
    state["pending"] = [json.loads(ended.model_dump_json())]
    recovered = recover(state)
    assert recovered is not None and recovered.ended is None
    assert recovered.events == [ended]
    # Telemetry is never kept (the next sample replaces a lost one).
    assert not any(isinstance(e, CPTelemetry) for e in recovered.events)
    assert isinstance(recovered.events[0], CPSupplyEnded)
    with pytest.raises(ValueError, match="format"):
        recover({**state, "format": 99})


def test_the_command_line_keeps_a_journal_unless_told_not_to(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path)}
    base = ["--broker", "127.0.0.1:9092", "--listen", "127.0.0.1:6101"]
    settings = parse_settings(base, env)
    assert settings.journal == tmp_path / "ev-charging" / "engine-6101.journal"
    chosen = tmp_path / "mine.journal"
    assert parse_settings([*base, "--journal", str(chosen)], env).journal == chosen
    assert parse_settings([*base, "--no-journal"], env).journal is None


def test_an_unwritable_journal_is_refused_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    argv = ["--broker", "127.0.0.1:9092", "--listen", "127.0.0.1:6101"]
    with pytest.raises(SystemExit) as exit_info:
        parse_settings([*argv, "--journal", str(blocked / "engine.journal")], {})
    assert exit_info.value.code == 2
    assert "--no-journal runs without one" in capsys.readouterr().err


def test_authorisation_answers_in_the_journal_are_the_engine_s_own(tmp_path: Path) -> None:
    """An accepted authorisation never plugged in ends at 0 kWh after a crash."""
    path = tmp_path / "engine.journal"
    authorised(engine(path))
    recovered = Journal(path).load()
    assert recovered is not None
    assert [type(e) for e in recovered.events] == [CPAuthorisation, CPSupplyEnded]
    assert recovered.ended is not None
    assert (recovered.ended.kwh, recovered.ended.started_at) == (0.0, None)
