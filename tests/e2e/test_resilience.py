"""The system stays correct when any part dies: kill -9 each one during a supply."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from helpers import scaled, wait_for
from procs import Deployment
from shared.bus import Topics

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.slow]


def events_of(driver, kind: str) -> list[dict]:
    return [e for e in driver.json_events() if e["event"] == kind]


async def supplying(system: Deployment, cp_id: str, driver_id: str, *engine_flags: str):
    """Start Central, one CP and a driver, and return once telemetry flows."""
    await system.start_central()
    await system.start_cp(cp_id, "--auto-plug", "1", *engine_flags)
    driver = system.start_driver(driver_id, "--cp", cp_id)
    await wait_for(lambda: len(events_of(driver, "telemetry")) >= 2, 30, message="no telemetry")
    return driver


async def session_row(system: Deployment, driver_id: str) -> dict:
    sessions = await system.api(f"/api/sessions?driver_id={driver_id}")
    return sessions[0]


async def test_engine_killed_during_supply(system: Deployment) -> None:
    driver = await supplying(system, "CP001", "user1")
    system.engines["CP001"].kill(signal.SIGKILL)
    killed_at = time.monotonic()
    await system.wait_state("CP001", "AVERIADO", timeout=3)
    assert time.monotonic() - killed_at < scaled(3)
    assert await driver.wait_exit(30) == 0, driver.output
    (ticket,) = events_of(driver, "ticket")
    last_seen = max(e["kwh"] for e in events_of(driver, "telemetry"))
    # Nothing the engine reported is lost: the ticket has at least the last telemetry.
    assert ticket["reason"] == "engine_fault" and ticket["kwh"] >= last_seen > 0
    # The monitor said so on its screen.
    await system.monitors["CP001"].wait_output("cannot reach engine", 5)
    # A new engine on the same address brings the CP back.
    system.start_engine("CP001")
    await system.wait_state("CP001", "ACTIVADO", timeout=10)


async def test_monitor_killed_during_supply(system: Deployment) -> None:
    driver = await supplying(system, "CP001", "user1")
    engine = system.engines["CP001"]
    system.monitors["CP001"].kill(signal.SIGKILL)
    killed_at = time.monotonic()
    await system.wait_state("CP001", "DESCONECTADO", timeout=4)
    assert time.monotonic() - killed_at < scaled(4)
    # The engine ends the supply on its own when its health checks stop (3 s).
    assert await driver.wait_exit(30) == 0, driver.output
    (ticket,) = events_of(driver, "ticket")
    assert ticket["reason"] == "monitor_lost"
    assert ticket["kwh"] >= max(e["kwh"] for e in events_of(driver, "telemetry"))
    # Until its monitor is back, the CP refuses supplies, even from its own menu.
    mark = len(engine.output)
    engine.send("r user2")
    await engine.wait_output(r"refused", 5, start=mark)
    await asyncio.sleep(1)
    assert not [s for s in await system.api("/api/sessions") if s["driver_id"] == "user2"]
    system.start_monitor("CP001")
    await system.wait_state("CP001", "ACTIVADO", timeout=10)


async def test_driver_killed_during_supply_sees_its_ticket_after_restart(
    system: Deployment,
) -> None:
    driver = await supplying(system, "CP001", "user1", "--auto-unplug", "5")
    session_id = events_of(driver, "accepted")[0]["session_id"]
    driver.kill(signal.SIGKILL)

    async def completed() -> bool:
        return (await session_row(system, "user1"))["status"] == "COMPLETED"

    await wait_for(completed, 30)  # the supply went on without its driver
    again = system.start_driver("user1", "--cp", "CP001", name="driver-again")
    await again.wait_output(rf'"event":"ticket","session_id":"{session_id}"', 30)
    assert await again.wait_exit(60) == 0
    # Shown once; acknowledged, so a third start does not show it again.
    assert [t["session_id"] for t in events_of(again, "ticket")].count(session_id) == 1
    third = system.start_driver("user1", "--cp", "CP009", name="driver-third")
    assert await third.wait_exit(30) == 3  # CP009 is not connected: denied
    assert not events_of(third, "ticket")


async def test_central_killed_during_supply(system: Deployment) -> None:
    driver = await supplying(system, "CP001", "user1", "--auto-unplug", "6")
    engine = system.engines["CP001"]
    assert system.central is not None
    system.central.kill(signal.SIGKILL)
    # The engine finishes the supply in progress while Central is away...
    await engine.wait_output(r"IDLE", 15, start=len(engine.output) - 200)
    # ...and accepts nothing new.
    await system.monitors["CP001"].wait_output("cannot reach Central", 10)
    mark = len(engine.output)
    engine.send("r user2")
    await engine.wait_output("refused", 5, start=mark)

    await system.start_central()
    assert await driver.wait_exit(60) == 0, driver.output
    tickets = events_of(driver, "ticket")
    assert len(tickets) == 1
    (ticket,) = tickets
    assert ticket["reason"] == "unplugged"
    # 6 s at 22 kW, give or take a tick: the energy supplied while Central was away counts.
    assert 22 * 4.5 / 3600 < ticket["kwh"] < 22 * 8 / 3600
    rows = system.query("SELECT status, kwh FROM sessions WHERE driver_id = 'user1'")
    assert rows == [("COMPLETED", pytest.approx(ticket["kwh"]))]
    assert system.query("SELECT COUNT(*) FROM sessions WHERE driver_id = 'user2'") == [(0,)]
    assert system.balance("user1") == 15000 - round(ticket["amount_eur"] * 100)
    await system.wait_state("CP001", "ACTIVADO", timeout=10)


async def test_broker_restart_during_supply(system: Deployment, broker) -> None:
    driver = await supplying(system, "CP001", "user1", "--auto-unplug", "14")
    broker.restart_later()
    await asyncio.sleep(3)
    broker.start()
    assert await driver.wait_exit(90) == 0, driver.output
    (ticket,) = events_of(driver, "ticket")
    assert ticket["reason"] == "unplugged"
    assert 22 * 12 / 3600 < ticket["kwh"] < 22 * 17 / 3600
    assert system.balance("user1") == 15000 - round(ticket["amount_eur"] * 100)
    await system.wait_state("CP001", "ACTIVADO", timeout=20)
    health = await system.api("/healthz")
    assert health["broker"] is True


async def test_an_engine_killed_while_kafka_is_away_loses_no_energy(
    system: Deployment, broker
) -> None:
    """The engine meters on while Kafka is away, then dies before Kafka is back: what it
    metered meanwhile was only in its memory. Its journal keeps it: started again, the engine
    reports the supply's end with all of it, and Central corrects the ticket it had settled on
    the last sample it had."""
    ledger = system.workdir / "CP001.ledger"
    driver = await supplying(
        system, "CP001", "user1", "--auto-unplug", "60", "--ledger", str(ledger)
    )
    engine = system.engines["CP001"]
    broker.restart_later()
    before = len(engine.output)
    # Two samples that Kafka cannot take (telemetry is dropped, not queued), then the kill.
    await engine.wait_output(r"SUPPLYING.*", 10, before)
    await asyncio.sleep(3)
    engine.kill(signal.SIGKILL)
    ticks = [json.loads(line) for line in ledger.read_text().splitlines()]
    metered = max(line["kwh"] for line in ticks if line["event"] == "tick")
    sample = max(b["kwh"] - a["kwh"] for a, b in zip(ticks[1:], ticks[2:], strict=False))
    broker.start()
    # Central settles without the engine (engine_fault, on the last sample it had)...
    assert await driver.wait_exit(60) == 0, driver.output
    (first,) = events_of(driver, "ticket")
    assert first["reason"] == "engine_fault"
    assert first["kwh"] < metered - sample  # the samples Kafka missed are not in it
    # ...and the engine, started again, reports what it had metered.
    restarted = system.start_engine("CP001")
    await restarted.wait_output("was cut short when this engine stopped", 30)

    async def corrected() -> bool:
        row = await session_row(system, "user1")
        return row["kwh"] >= metered - 1e-4

    await wait_for(corrected, 30, message="Central never took the engine's figures")
    [(kwh, cents)] = system.query(
        "SELECT kwh, amount_cents FROM sessions WHERE driver_id = 'user1'"
    )
    assert kwh == pytest.approx(metered, abs=1e-4)
    assert system.balance("user1") == 15000 - cents
    # The driver's app, run again, shows the corrected ticket (its request at a CP that is not
    # connected is denied: it only shows what it had not seen).
    again = system.start_driver("user1", "--cp", "CP009", name="driver-user1-again")
    assert await again.wait_exit(30) == 3, again.output
    assert any(
        t["kwh"] == pytest.approx(metered, abs=1e-4) and t["revision"] == 2
        for t in events_of(again, "ticket")
    ), again.output
    await system.wait_state("CP001", "ACTIVADO", timeout=20)


async def replay(bootstrap: str, topics: list[str]) -> int:
    """Publish every record of `topics` again, unchanged: a duplicate delivery of everything."""
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await consumer.start()
    await producer.start()
    try:
        records = []
        while True:
            batch = await consumer.getmany(timeout_ms=1500)
            if not batch:
                break
            for part in batch.values():
                records += part
        for record in records:
            await producer.send_and_wait(record.topic, record.value, key=record.key)
        return len(records)
    finally:
        await consumer.stop()
        await producer.stop()


async def test_every_message_delivered_twice_changes_nothing(system: Deployment) -> None:
    await system.start_central()
    await system.start_cp("CP001", "--auto-plug", "1", "--auto-unplug", "3")
    await system.start_cp("CP002")
    driver = system.start_driver("user1", "--cp", "CP001")
    assert await driver.wait_exit(40) == 0
    system.engines["CP002"].send("r user2")  # a menu request too; CP002 never plugs in
    await wait_for(lambda: system.query("SELECT 1 FROM sessions WHERE driver_id = 'user2'"), 15)
    await asyncio.sleep(1)

    def snapshot():
        return (
            system.query("SELECT id, balance_cents FROM users ORDER BY id"),
            system.query(
                "SELECT id, status, kwh, amount_cents, ticket_revision FROM sessions ORDER BY id"
            ),
        )

    before = snapshot()
    handled = dict((await system.api("/api/stats"))["messages"])
    replayed = await replay(system.broker, [Topics.DRIVER_REQUESTS, Topics.CP_EVENTS])
    assert replayed >= 6

    async def all_handled_again() -> bool:
        now = (await system.api("/api/stats"))["messages"]
        return sum(now.values()) - sum(handled.values()) >= replayed

    await wait_for(all_handled_again, 30, message="Central did not consume the replay")
    after = snapshot()
    assert after == before
    (ticket,) = events_of(driver, "ticket")
    assert system.query("SELECT COUNT(*) FROM sessions WHERE driver_id = 'user1'") == [(1,)]
    assert system.balance("user1") == 15000 - round(ticket["amount_eur"] * 100)


async def test_a_driver_whose_central_is_down_says_so_then_gives_up(system: Deployment) -> None:
    # Kafka answers, Central does not run: the driver tells why it waits, then stops (1).
    driver = system.start_driver("user1", "--cp", "CP001", "--reply-timeout", "1")
    assert await driver.wait_exit(30) == 1
    out = driver.output
    waited = out.find("no answer from Central to Central's key after 1 s")
    assert 0 <= waited < out.find("cannot reach Central: no answer to Central's key"), out
