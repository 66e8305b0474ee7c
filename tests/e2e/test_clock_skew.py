"""Wrong clocks on one PC break nothing, and every clock's offset is shown (docs/operations.md,
"Clocks"). Real processes, each given a clock shifted with libfaketime (`faketime`), on the
session's real broker, whose clock is the network's.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

from helpers import wait_for
from procs import Deployment
from shared.bus import KafkaBus, Topics

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

AUTO = ("--auto-plug", "1", "--auto-unplug", "3")


async def clocks(system: Deployment) -> dict[str, Any]:
    status = await system.api("/api/status")
    return dict(status["clocks"])


def offset_of(view: dict[str, Any], kind: str, peer_id: str) -> float | None:
    for peer in view["peers"]:
        if peer["kind"] == kind and peer["id"] == peer_id:
            return peer["offset_s"]  # type: ignore[no-any-return]
    return None


async def wait_offset(
    system: Deployment, kind: str, peer_id: str, expected: float, timeout: float = 20
) -> None:
    """The panel shows `kind` `peer_id` `expected` s off the network's clock (± 0.5 s)."""
    seen: list[float | None] = []

    async def shown() -> bool:
        offset = offset_of(await clocks(system), kind, peer_id)
        seen.append(offset)
        return offset is not None and abs(offset - expected) <= 0.5

    await wait_for(shown, timeout, interval=0.5, message=f"{kind} {peer_id}: {seen[-3:]}")


async def one_supply(system: Deployment, driver_id: str, cp_id: str) -> dict[str, Any]:
    """A supply through the driver app; its ticket, checked against the database."""
    driver = system.start_driver(driver_id, "--cp", cp_id)
    assert await driver.wait_exit(60) == 0, driver.output
    events = driver.json_events()
    ticket = next(e for e in events if e["event"] == "ticket")
    assert ticket["cp_id"] == cp_id and ticket["reason"] == "unplugged", ticket
    assert ticket["kwh"] > 0, ticket
    amount = round(ticket["kwh"] * ticket["price_eur_kwh"], 2)
    assert ticket["amount_eur"] == pytest.approx(amount, abs=0.006)
    return ticket


def sessions_of(system: Deployment, driver_id: str) -> list[sqlite3.Row]:
    with sqlite3.connect(system.db_path) as db:
        db.row_factory = sqlite3.Row
        return db.execute(
            "SELECT * FROM sessions WHERE driver_id = ? ORDER BY requested_at", (driver_id,)
        ).fetchall()


def assert_times_in_order(rows: list[sqlite3.Row]) -> None:
    """Every time Central shows is its own: requested <= authorised <= started <= ended, and
    each supply after the one before."""
    previous_end = 0.0
    for row in rows:
        times = [row["requested_at"], row["authorized_at"], row["started_at"], row["ended_at"]]
        assert None not in times, dict(row)
        assert times == sorted(times), dict(row)
        assert times[0] >= previous_end, dict(row)
        previous_end = times[-1]


def assert_paid(system: Deployment, driver_id: str, start_cents: int) -> None:
    rows = sessions_of(system, driver_id)
    assert system.balance(driver_id) == start_cents - sum(r["amount_cents"] for r in rows)


async def test_clocks_a_minute_off_on_cps_and_drivers_break_nothing(system: Deployment) -> None:
    system.clocks.update(
        {
            "engine-CP001": "+60s",
            "engine-CP002": "-60s",
            "monitor-CP003": "+60s",
            "driver-user1": "-60s",
            "driver-user2": "+60s",
        }
    )
    await system.start_central()
    drivers = ("user1", "user2", "user3", "user4")
    balances = {driver_id: system.balance(driver_id) for driver_id in drivers}
    for cp_id in ("CP001", "CP002", "CP003"):
        await system.start_cp(cp_id, *AUTO)
    # A monitor its engine refuses (wrong secret) retries, slower and slower.
    system.start_engine("CP004")
    refused = system.start_monitor("CP004", "--secret", "not-the-secret")

    # Each clock is shown, with its sign and size, within seconds.
    await wait_offset(system, "engine", "CP001", 60)
    await wait_offset(system, "engine", "CP002", -60)
    await wait_offset(system, "monitor", "CP003", 60)
    await wait_offset(system, "engine", "CP003", 0)
    await wait_offset(system, "monitor", "CP001", 0)
    view = await clocks(system)
    assert view["central"]["offset_s"] is not None and abs(view["central"]["offset_s"]) < 0.5

    # Commands to CP001 (engine a minute ahead), to replay later.
    bus = KafkaBus(system.broker, "clock-test")
    await bus.start(ensure_topics=False)
    commands = await bus.tail_consumer([Topics.CP_COMMANDS])
    try:
        # A driver a minute behind logs in and charges at an engine a minute ahead; one a
        # minute ahead charges twice at an engine a minute behind; a driver with a right
        # clock charges at the CP whose monitor is a minute ahead.
        tickets = await asyncio.gather(
            one_supply(system, "user1", "CP001"),
            one_supply(system, "user3", "CP003"),
            one_supply(system, "user2", "CP002"),
        )
        await one_supply(system, "user2", "CP002")
        assert all(t["kwh"] > 0 for t in tickets)
        await wait_offset(system, "driver", "user1", -60)
        await wait_offset(system, "driver", "user2", 60)

        # The menu of the engine a minute behind: its request is authorised.
        await system.wait_state("CP002", "ACTIVADO")
        system.engines["CP002"].send("r user4")

        async def menu_supply_done() -> bool:
            rows = sessions_of(system, "user4")
            return bool(rows) and rows[-1]["status"] == "COMPLETED"

        await wait_for(menu_supply_done, 30, message=system.engines["CP002"].output[-2000:])

        # A captured authorisation replayed to the engine a minute ahead is refused.
        captured: list[Any] = []

        async def captured_one() -> bool:
            records = await commands.getmany(timeout_ms=500)
            captured.extend(r for rs in records.values() for r in rs if r.key == b"CP001")
            return bool(captured)

        await wait_for(captured_one, 10, message="no command to CP001 was seen")
        engine = system.engines["CP001"]
        mark = len(engine.output)
        await bus.send_raw(Topics.CP_COMMANDS, b"CP001", captured[0].value or b"")
        await engine.wait_output(r"replayed message", timeout=10, start=mark)
    finally:
        await bus.stop()

    for driver_id in drivers:
        rows = sessions_of(system, driver_id)
        assert rows and all(r["status"] == "COMPLETED" for r in rows), [dict(r) for r in rows]
        assert_times_in_order(rows)
        assert_paid(system, driver_id, balances[driver_id])
    assert len(sessions_of(system, "user2")) == 2

    # The warnings: in the audit, once per clock.
    audit = await system.api("/api/audit?limit=200")
    warned = sorted((e["source"], e["actor"]) for e in audit if e["action"] == "clock_skew")
    expected = [("driver", "user1"), ("driver", "user2"), ("engine", "CP001")]
    expected += [("engine", "CP002"), ("monitor", "CP003")]
    assert warned == sorted(expected)
    # The engines and driver apps with wrong clocks said so, with the fix.
    assert "w32tm /resync" in system.engines["CP001"].output
    assert "timedatectl set-ntp true" in system.engines["CP002"].output
    driver_log = (system.workdir / "driver-user2.log").read_text()
    assert "this PC's clock is 60.0 s ahead of" in driver_log

    # The refused monitor backed off: a handful of lines, not thousands.
    engine_lines = system.engines["CP004"].output.count("\n")
    monitor_lines = refused.output.count("\n")
    assert "refused a monitor connection" in system.engines["CP004"].output
    assert engine_lines < 60 and monitor_lines < 60, (engine_lines, monitor_lines)


async def test_central_a_minute_ahead_of_everyone_breaks_nothing(system: Deployment) -> None:
    system.clocks["central"] = "+60s"
    await system.start_central()
    balance = system.balance("user1")
    await system.start_cp("CP001", *AUTO)
    await one_supply(system, "user1", "CP001")
    await one_supply(system, "user1", "CP001")
    view = await clocks(system)
    central = view["central"]["offset_s"]
    assert central is not None and abs(central - 60) <= 0.5, view
    await wait_offset(system, "monitor", "CP001", 0)
    await wait_offset(system, "engine", "CP001", 0)
    await wait_offset(system, "driver", "user1", 0)
    rows = sessions_of(system, "user1")
    assert len(rows) == 2 and all(r["status"] == "COMPLETED" for r in rows)
    assert_times_in_order(rows)
    assert_paid(system, "user1", balance)
    audit = await system.api("/api/audit?limit=50")
    assert any(e["action"] == "clock_skew" and e["source"] == "central" for e in audit)
