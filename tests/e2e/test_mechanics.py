"""Every mechanic of the brief, against real processes and a real broker."""

from __future__ import annotations

import time

import pytest

from helpers import wait_for
from procs import Deployment

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.slow]

AUTO = ("--auto-plug", "1", "--auto-unplug", "3")


def tickets(driver) -> list[dict]:
    return [e for e in driver.json_events() if e["event"] == "ticket"]


def check_ticket_amount(ticket: dict) -> None:
    assert ticket["amount_eur"] == pytest.approx(
        round(ticket["kwh"] * ticket["price_eur_kwh"], 2), abs=0.0051
    ), ticket


async def first_event(driver, kind: str, timeout: float = 20) -> dict:
    def found():
        return next((e for e in driver.json_events() if e["event"] == kind), None)

    return await wait_for(found, timeout, message=f"no {kind} event:\n{driver.output[-2000:]}")


async def test_driver_file_of_ten_requests_over_four_cps(system: Deployment, tmp_path) -> None:
    await system.start_central()
    for cp_id in ("CP001", "CP002", "CP003", "CP004"):
        system.start_engine(cp_id, *AUTO)
        system.start_monitor(cp_id)
    for cp_id in ("CP001", "CP002", "CP003", "CP004"):
        await system.wait_state(cp_id, "ACTIVADO", timeout=30)
    # Eight supplies and two denials: CP009 has no monitor (DESCONECTADO), CP999 is unknown.
    plan = [
        "CP001",
        "CP002",
        "CP003",
        "CP004",
        "CP009",
        "CP001",
        "CP002",
        "CP003",
        "CP004",
        "CP999",
    ]
    requests = tmp_path / "requests.txt"
    requests.write_text("# ten requests\n" + "\n".join(plan) + "\n")
    started = time.monotonic()
    driver = system.start_driver("user2", "--file", str(requests))
    assert await driver.wait_exit(240) == 3, driver.output  # 3: some requests were denied
    elapsed = time.monotonic() - started

    events = driver.json_events()
    outcomes = [e for e in events if e["event"] in ("ticket", "denied")]
    assert [e["cp_id"] for e in outcomes] == plan
    denied = [e for e in outcomes if e["event"] == "denied"]
    assert [(e["cp_id"], e["reason"]) for e in denied] == [
        ("CP009", "cp_unavailable"),
        ("CP999", "unknown_cp"),
    ]
    paid = tickets(driver)
    assert len(paid) == 8 and len({t["session_id"] for t in paid}) == 8
    for ticket in paid:
        check_ticket_amount(ticket)
        assert ticket["kwh"] > 0 and ticket["reason"] == "unplugged"
    # Nine pauses of 4 s between ten requests.
    assert elapsed >= 9 * 4
    # Balances add up: what the tickets say is what left the driver's account.
    spent = round(sum(t["amount_eur"] for t in paid) * 100)
    assert system.balance("user2") == 20000 - spent
    rows = system.query(
        "SELECT COUNT(*), SUM(amount_cents) FROM sessions WHERE driver_id = 'user2'"
        " AND status = 'COMPLETED'"
    )
    assert rows[0] == (8, spent)
    available = next(e for e in events if e["event"] == "available")
    assert {cp["cp_id"] for cp in available["cps"]} >= {"CP001", "CP002", "CP003", "CP004"}


async def test_a_simulated_clock_shows_at_central_and_scales_the_ticket(
    system: Deployment,
) -> None:
    await system.start_central()
    await system.start_cp("CP001", "--auto-plug", "1", "--auto-unplug", "3", "--speed", "60")

    # The engine's time scale reaches Central through its monitor's heartbeats.
    async def speeds() -> dict[str, float] | None:
        found = {cp["id"]: cp["speed"] for cp in await system.api("/api/cps")}
        return found if found["CP001"] == 60 else None

    shown = await wait_for(speeds, 10, message="CP001's speed never reached Central")
    assert shown["CP002"] == 1.0  # no engine: real time, the default

    driver = system.start_driver("user1", "--cp", "CP001")
    assert await driver.wait_exit(60) == 0, driver.output
    (ticket,) = tickets(driver)
    assert ticket["reason"] == "unplugged"
    check_ticket_amount(ticket)
    # Each 1 s tick at 22 kW is a simulated minute: 22 x 60 / 3600 kWh. Three real seconds
    # plugged in are two or three ticks, over 0.7 kWh (about 0.018 kWh at real time).
    per_tick = 22 * 60 / 3600
    ticks = ticket["kwh"] / per_tick
    assert round(ticks) in (2, 3, 4) and ticks == pytest.approx(round(ticks), abs=1e-3), ticket
    # Central billed what the engine metered.
    ended = await system.engines["CP001"].wait_output(
        rf"session {ticket['session_id']} ended \(unplugged\): ([0-9.]+) kWh"
    )
    assert float(ended.group(1)) == pytest.approx(ticket["kwh"], abs=5e-5)
    assert system.query("SELECT kwh FROM sessions WHERE id = ?", ticket["session_id"]) == [
        (pytest.approx(ticket["kwh"]),)
    ]


async def test_stop_one_during_supply_then_stop_all_and_resume_all(system: Deployment) -> None:
    await system.start_central()
    await system.start_cp("CP001", "--auto-plug", "1")
    await system.start_cp("CP002")
    driver = system.start_driver("user1", "--cp", "CP001")
    await first_event(driver, "telemetry")
    await system.wait_state("CP001", "SUMINISTRANDO")

    await system.ctl("stop", "CP001")
    await system.wait_state("CP001", "PARADO", timeout=5)
    assert await driver.wait_exit(30) == 0
    (ticket,) = tickets(driver)
    assert ticket["reason"] == "stopped_by_admin" and ticket["kwh"] > 0
    check_ticket_amount(ticket)
    assert system.query("SELECT status FROM sessions WHERE id = ?", ticket["session_id"]) == [
        ("ABORTED",)
    ]

    # A stopped CP refuses supplies.
    refused = system.start_driver("user3", "--cp", "CP001", name="driver-refused")
    assert await refused.wait_exit(30) == 3  # denied
    assert [e["reason"] for e in refused.json_events() if e["event"] == "denied"] == [
        "cp_unavailable"
    ]

    await system.ctl("stop", "all")
    await system.wait_state("CP002", "PARADO", timeout=5)
    assert (await system.cp_states())["CP005"] == "DESCONECTADO"  # no monitor: still grey
    await system.ctl("resume", "all")
    await system.wait_state("CP001", "ACTIVADO", timeout=5)
    await system.wait_state("CP002", "ACTIVADO", timeout=5)


async def test_console_stop_and_resume_change_the_cp(system: Deployment) -> None:
    central = await system.start_central()
    await system.start_cp("CP001")
    await system.wait_state("CP001", "ACTIVADO", timeout=30)

    central.send("stop CP001")
    await central.wait_output(r"stop: CP001")
    await system.wait_state("CP001", "PARADO", timeout=5)
    assert system.query("SELECT in_service FROM charging_points WHERE id = ?", "CP001") == [(0,)]

    central.send("resume CP001")
    await central.wait_output(r"resume: CP001")
    await system.wait_state("CP001", "ACTIVADO", timeout=5)
    assert system.query("SELECT in_service FROM charging_points WHERE id = ?", "CP001") == [(1,)]


async def test_engine_ko_during_supply_then_ok(system: Deployment) -> None:
    await system.start_central()
    await system.start_cp("CP001", "--auto-plug", "1")
    engine = system.engines["CP001"]
    driver = system.start_driver("user1", "--cp", "CP001")
    await wait_for(
        lambda: len([e for e in driver.json_events() if e["event"] == "telemetry"]) >= 2, 20
    )
    seen_kwh = max(e["kwh"] for e in driver.json_events() if e["event"] == "telemetry")

    engine.send("k")
    ko_at = time.monotonic()
    await system.wait_state("CP001", "AVERIADO", timeout=2)
    assert time.monotonic() - ko_at <= 2.5
    assert await driver.wait_exit(30) == 0
    (ticket,) = tickets(driver)
    assert ticket["reason"] == "engine_fault"
    assert ticket["kwh"] >= seen_kwh
    check_ticket_amount(ticket)

    engine.send("o")
    await system.wait_state("CP001", "ACTIVADO", timeout=3)


async def test_balance_runs_out(system: Deployment) -> None:
    # 2 cents buy 0.0476 kWh at 0.42 €/kWh: about 3.4 s at CP003's 50 kW.
    system.prepare_db("UPDATE users SET balance_cents = 2 WHERE id = 'user5'")
    await system.start_central()
    await system.start_cp("CP003", "--auto-plug", "1")
    driver = system.start_driver("user5", "--cp", "CP003")
    assert await driver.wait_exit(40) == 0, driver.output
    (ticket,) = tickets(driver)
    assert ticket["reason"] == "balance_exhausted"
    assert ticket["amount_eur"] == 0.02
    check_ticket_amount(ticket)
    assert system.balance("user5") == 0
    await system.wait_state("CP003", "ACTIVADO")


async def test_denials_carry_their_reason(system: Deployment) -> None:
    system.prepare_db("UPDATE users SET balance_cents = 0 WHERE id = 'user4'")
    await system.start_central()
    await system.start_cp("CP001", "--auto-plug", "1")
    await system.start_cp("CP002")
    supplying = system.start_driver("user1", "--cp", "CP001")
    await first_event(supplying, "started")

    broke = system.start_driver("user4", "--cp", "CP002", name="driver-broke")
    assert await broke.wait_exit(30) == 3  # denied
    assert [e["reason"] for e in broke.json_events() if e["event"] == "denied"] == [
        "insufficient_balance"
    ]
    # Requests from a CP's own menu go through Central like any other.
    system.engines["CP002"].send("r user1")
    system.engines["CP002"].send("r ghost")

    async def denied(driver_id: str, reason: str) -> bool:
        sessions = await system.api("/api/sessions")
        return any(
            s["driver_id"] == driver_id
            and s["status"] == "DENIED"
            and s["reason"] == reason
            and s["origin"] == "cp"
            for s in sessions
        )

    await wait_for(lambda: denied("user1", "driver_busy"), 15)
    await wait_for(lambda: denied("ghost", "unknown_driver"), 15)
    # The driver app, started while its supply is running, follows that supply.
    follower = system.start_driver("user1", "--cp", "CP002", name="driver-follower")
    await follower.wait_output('"text":"following the supply in progress', 20)
    unknown = system.start_driver("nobody", "--cp", "CP002", name="driver-unknown")
    assert await unknown.wait_exit(30) == 1
    assert any(e["event"] == "error" for e in unknown.json_events())


async def test_request_from_the_cp_menu_supplies(system: Deployment) -> None:
    await system.start_central()
    await system.start_cp("CP002", "--auto-plug", "1", "--auto-unplug", "2")
    system.engines["CP002"].send("r user3")

    async def completed() -> list:
        return [
            s
            for s in await system.api("/api/sessions")
            if s["driver_id"] == "user3" and s["status"] == "COMPLETED"
        ]

    (session,) = await wait_for(completed, 30)
    assert session["origin"] == "cp" and session["kwh"] > 0
    assert system.balance("user3") == 7550 - round(session["amount_eur"] * 100)


async def test_authorisation_expires_when_never_plugged(broker, tmp_path) -> None:
    system = Deployment(broker.bootstrap, tmp_path, authorization_ttl=2)
    try:
        await system.start_central()
        await system.start_cp("CP001")  # no auto-plug: nobody plugs in
        driver = system.start_driver("user1", "--cp", "CP001")
        assert await driver.wait_exit(30) == 0
        (ticket,) = tickets(driver)
        assert ticket["reason"] == "authorization_expired" and ticket["kwh"] == 0
        assert system.query("SELECT status FROM sessions WHERE id = ?", ticket["session_id"]) == [
            ("EXPIRED",)
        ]
        await system.wait_state("CP001", "ACTIVADO")
        assert system.balance("user1") == 15000
    finally:
        system.stop_all()
