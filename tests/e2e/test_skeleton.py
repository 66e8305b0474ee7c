"""The walking skeleton: one supply end to end through real processes and a real broker."""

from __future__ import annotations

import sqlite3

import pytest

from procs import Deployment

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]


async def test_one_supply_end_to_end(system: Deployment) -> None:
    await system.start_central()
    states = await system.cp_states()
    assert set(states) >= {f"CP{n:03d}" for n in range(1, 11)}
    assert set(states.values()) == {"DESCONECTADO"}

    await system.start_cp("CP001", "--auto-plug", "1", "--auto-unplug", "4")
    driver = system.start_driver("user1", "--cp", "CP001")
    assert await driver.wait_exit(60) == 0, driver.output

    events = driver.json_events()
    kinds = [e["event"] for e in events]
    for expected in ("accepted", "authorized", "started", "telemetry", "ticket"):
        assert expected in kinds, kinds
    ticket = next(e for e in events if e["event"] == "ticket")
    assert ticket["cp_id"] == "CP001" and ticket["driver_id"] == "user1"
    assert ticket["reason"] == "unplugged"
    telemetry = [e for e in events if e["event"] == "telemetry"]
    # The ticket carries at least the energy of the last telemetry the driver saw.
    assert ticket["kwh"] >= telemetry[-1]["kwh"] > 0
    assert ticket["amount_eur"] == pytest.approx(round(ticket["kwh"] * 0.35, 2), abs=0.006)
    # 22 kW for about 4 s: 22 * 4 / 3600 = 0.024 kWh, within a tick either way.
    assert 22 * 2 / 3600 < ticket["kwh"] < 22 * 7 / 3600

    sessions = await system.api("/api/sessions")
    assert sessions[0]["status"] == "COMPLETED"
    assert sessions[0]["kwh"] == pytest.approx(ticket["kwh"])
    await system.wait_state("CP001", "ACTIVADO")
    with sqlite3.connect(system.db_path) as db:
        (balance,) = db.execute("SELECT balance_cents FROM users WHERE id='user1'").fetchone()
    assert balance == 15000 - round(ticket["amount_eur"] * 100)
