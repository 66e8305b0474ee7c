"""The fleet simulator against a real Central: it authenticates like the real parts and measures.

Twenty CPs, half seeded into the database before Central starts and half registered over the
admin WebSocket; four drivers log in over Kafka; short supplies so that every sealed event kind
(plugged, telemetry, ended) reaches Central. Central must refuse nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from EV_Central.passwords import verify_secret
from procs import Deployment
from tools.fleet.accounts import Credentials, seed_database
from tools.fleet.sim import Fleet, FleetConfig, cp_ids, driver_ids

pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.slow]

CPS = 20


async def test_fleet_runs_authenticated_against_central(system: Deployment, tmp_path: Path) -> None:
    ids = cp_ids("SIM", CPS)
    drivers = driver_ids("SIM", 4)
    credentials = Credentials()
    system.prepare_db()
    seed_database(system.db_path, ids[: CPS // 2], drivers, credentials)
    central = await system.start_central()
    assert central.proc is not None
    path = tmp_path / "credentials.json"
    config = FleetConfig(
        central=f"127.0.0.1:{system.central_port}",
        broker=system.broker,
        admin=f"127.0.0.1:{system.http_port}",
        cps=CPS,
        supplying=0.2,
        warmup=2.0,
        duration=6.0,
        supply_seconds=(2.0, 3.0),
        lose=2,
        central_pid=central.proc.pid,
        admin_password=system.admin_password,
        credentials=replace(credentials, cps=dict(credentials.cps)),
        credentials_path=path,
    )

    result = await Fleet(config).run()

    # Every monitor presented its CP's secret and got a key; every driver logged in.
    assert result["monitors_authenticated"] == CPS, result
    assert result["monitors_refused"] == 0
    assert result["drivers_logged_in"] == len(drivers)
    assert result["driver_logins_failed"] == 0
    # The CPs Central did not know were registered; their secrets were kept.
    kept = Credentials.load(path)
    assert sorted(kept.cps) == ids
    assert all(kept.cps[cp] == credentials.cps[cp] for cp in ids[: CPS // 2])
    hashes = dict(system.query("SELECT id, secret_hash FROM charging_points WHERE id LIKE 'SIM%'"))
    assert all(verify_secret(kept.cps[cp], hashes[cp]) for cp in ids)
    # Sealed requests got authorisations, sealed telemetry reached the dashboard, supplies ended.
    assert result["request_to_authorisation_ms"]["count"] >= len(drivers)
    # Its two legs (request -> engine, engine -> driver): each a part of the whole.
    whole, one, two = (
        result[k]
        for k in (
            "request_to_authorisation_ms",
            "request_to_engine_ms",
            "engine_to_authorisation_ms",
        )
    )
    assert 0 < one["count"] == two["count"] <= whole["count"]
    assert 0 < one["max"] <= whole["max"] and 0 < two["max"] <= whole["max"]
    assert result["telemetry_to_dashboard_ms"]["count"] > 0
    assert result["heartbeat_rtt_ms"]["count"] > 0
    assert result["supplies_completed"] >= 1
    assert system.query("SELECT COUNT(*) FROM sessions WHERE status = 'COMPLETED'")[0][0] >= 1
    assert result["denied"] == result["request_timeouts"] == 0
    assert result["unopened_sealed"] == 0
    # The CPs cut off were seen lost; nothing else was.
    assert result["lost_cp_undetected"] == 0
    assert result["lost_cp_closed_ms"]["count"] == result["lost_cp_silent_ms"]["count"] == 1
    assert result["unexpected_disconnects"] == result["unexpected_closes"] == 0
    # Central refused, skipped or failed on nothing.
    assert result["central_rejected"] == 0
    assert result["central_invalid"] == 0
    assert result["central_handler_errors"] == 0
    assert result["central_telemetry_handled"] > 0
