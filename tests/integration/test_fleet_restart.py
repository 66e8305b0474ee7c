"""The fleet simulator through restarts of Central (kill -9) and of the Kafka broker.

When Central dies, its monitors lose their links: as EV_CP_M does, they connect and
authenticate again once Central is back (getting new CP keys). While the broker is away, its
engines go on metering, as EV_CP_E does (their events wait in an outbox). After either, its
drivers go on asking for supplies, its engines supply again and Central settles those supplies.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from helpers import scaled, wait_for
from procs import Deployment
from tools.fleet.accounts import Credentials, seed_database
from tools.fleet.sim import Fleet, FleetConfig, cp_ids, driver_ids

if TYPE_CHECKING:  # the tests' conftest, not importable as a module beside the browser tests'
    from conftest import Broker

pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.slow]


def ledger_lines(path: Path) -> list[dict[str, Any]]:
    """The ledger's whole lines (the last one may be half written)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def sessions_with(path: Path, event: str, since: float = 0.0, until: float = 1e12) -> set[str]:
    """The sessions with an `event` line on the ledger stamped in [since, until]."""
    return {
        line["session_id"]
        for line in ledger_lines(path)
        if line["event"] == event and since <= line["ts"] <= until
    }


def supplied_again(path: Path, since: float) -> int:
    """How many supplies authorised after `since` got their ticket."""
    return len(sessions_with(path, "authorised", since) & sessions_with(path, "ticket", since))


async def start_fleet(
    system: Deployment, tmp_path: Path, cps: int, drivers: int, supply_seconds: float
) -> tuple[Fleet, Path, Path]:
    """Central on a seeded database, and the fleet running until the stop file exists."""
    credentials = Credentials()
    system.prepare_db()
    seed_database(system.db_path, cp_ids("SIM", cps), driver_ids("SIM", drivers), credentials)
    await system.start_central()
    ledger = tmp_path / "fleet-ledger.jsonl"
    stop = tmp_path / "fleet.stop"
    config = FleetConfig(
        central=f"127.0.0.1:{system.central_port}",
        broker=system.broker,
        admin=f"127.0.0.1:{system.http_port}",
        cps=cps,
        supplying=drivers / cps,
        warmup=1.0,
        duration=scaled(120.0),  # the window ends with the stop file
        supply_seconds=(supply_seconds, supply_seconds),
        lose=0,
        admin_password=system.admin_password,
        credentials=credentials,
        ledger=ledger,
        stop_file=stop,
        drain=scaled(20.0),
    )
    return Fleet(config), ledger, stop


def nothing_left_running(system: Deployment) -> bool:
    running = system.query(
        "SELECT id, status FROM sessions WHERE status IN ('ASKED', 'AUTHORISED', 'SUPPLYING',"
        " 'ENDING')"
    )
    return running == []


async def test_the_fleet_supplies_again_after_central_is_killed_and_restarted(
    system: Deployment, tmp_path: Path
) -> None:
    cps, drivers = 6, 3
    fleet, ledger, stop = await start_fleet(system, tmp_path, cps, drivers, 2.5)
    run = asyncio.create_task(fleet.run())
    try:
        await wait_for(lambda: len(sessions_with(ledger, "authorised")) >= drivers, 30)
        assert system.central is not None
        system.central.kill(signal.SIGKILL)
        await asyncio.sleep(2.0)
        await system.start_central()  # the same database and ports
        restarted = time.time()
        # New supplies, authorised by the restarted Central, ended and ticketed.
        await wait_for(
            lambda: supplied_again(ledger, restarted) >= 2 * drivers,
            45,
            message="no new supplies after Central's restart",
        )
    finally:
        stop.touch()
        result = await asyncio.wait_for(run, scaled(60.0))

    # Every monitor lost its link once, and authenticated again.
    assert result["unexpected_closes"] == cps, result
    assert result["monitors_reconnected"] == cps, result
    assert result["tickets_missing"] == 0, result
    assert result["unopened_sealed"] == 0, result
    # Central agrees: it completed supplies that started after it came back.
    again = system.query(
        "SELECT COUNT(*) FROM sessions WHERE status = 'COMPLETED' AND started_at > ?", restarted
    )[0][0]
    assert again >= 2 * drivers
    assert nothing_left_running(system)


async def test_the_fleet_meters_on_while_the_broker_is_away(
    system: Deployment, broker: Broker, tmp_path: Path
) -> None:
    # Enough supplies for the producer's buffers to fill while the broker is away.
    cps = drivers = 40
    fleet, ledger, stop = await start_fleet(system, tmp_path, cps, drivers, 12.0)
    run = asyncio.create_task(fleet.run())
    try:
        await wait_for(lambda: len(sessions_with(ledger, "authorised")) >= drivers, 30)
        await asyncio.to_thread(broker.restart_later)  # stopped, its data kept
        stopped = time.time()
        await asyncio.sleep(6.0)
        # The supplies in progress went on: every second, a tick for each.
        metered = sessions_with(ledger, "tick", stopped + 2.0)
        await asyncio.to_thread(broker.start)
        back = time.time()
        # New supplies (their tickets come in the drain, at the stop).
        await wait_for(
            lambda: len(sessions_with(ledger, "authorised", back)) >= drivers // 2,
            45,
            message="no new supplies after the broker's restart",
        )
    finally:
        stop.touch()
        result = await asyncio.wait_for(run, scaled(60.0))

    assert len(metered) >= drivers // 2, f"{len(metered)} supplies metered while Kafka was away"
    assert result["unexpected_closes"] == 0, result
    assert result["tickets_missing"] == 0, result
    assert result["unopened_sealed"] == 0, result
    assert nothing_left_running(system)
