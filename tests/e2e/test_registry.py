"""EV_Registry end to end: real processes (Central with TLS, the registry over HTTPS, engines,
monitors, drivers, the driver dashboard) on a real broker.

A CP enrols itself with a one-time token and charges; the same token is refused the second
time. A CP deregistered during a supply: the supply is settled with its ticket, the monitor
is refused, and the CP is gone from the admin panel's data and the driver dashboard's list.
One Central serves the module.
"""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from helpers import free_port, scaled, wait_for
from procs import ServiceProcess, http_get
from registry_procs import Registry, central_with_registry

in_module_loop = pytest.mark.asyncio(loop_scope="module")
pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.slow, in_module_loop]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def registry(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Registry]:
    async with central_with_registry(kafka_bootstrap, tmp_path_factory) as started:
        yield started


def events(proc: ServiceProcess, kind: str) -> list[dict[str, Any]]:
    return [e for e in proc.json_events() if e["event"] == kind]


def enrolling_monitor(
    registry: Registry, cp_id: str, secret_file: Path, token: str, name: str
) -> ServiceProcess:
    """A monitor that enrols `cp_id` with `token` (its secret file does not exist yet)."""
    system = registry.central
    return system._add(
        ServiceProcess(
            name,
            [
                "-m",
                "EV_CP_M",
                "--engine",
                f"127.0.0.1:{system.engine_ports[cp_id]}",
                "--central",
                f"127.0.0.1:{system.central_port}",
                "--cp-id",
                cp_id,
                "--secret-file",
                str(secret_file),
                "--registry",
                registry.url,
                "--enrolment-token",
                token,
                *system.tls_flags(),  # --tls-ca: Central's CA, the registry's too
            ],
            system.workdir,
        )
    )


async def test_a_cp_enrols_with_a_token_charges_and_the_token_works_once(
    registry: Registry, tmp_path: Path
) -> None:
    system = registry.central
    admin = await registry.login()
    new_cp = {"id": "CP200", "location": "Elche - Enrolled", "price_eur_kwh": 0.4, "max_kw": 22}
    assert (await registry.call("POST", "/cps", new_cp, token=admin))[0] == 201
    status, issued = await registry.call("POST", "/cps/CP200/enrolment", token=admin)
    assert status == 201, issued

    secret_file = tmp_path / "CP200.secret"
    system.engine_ports["CP200"] = free_port()
    monitor = enrolling_monitor(registry, "CP200", secret_file, issued["token"], "monitor-CP200")
    await wait_for(secret_file.exists, 20, message=f"no secret file:\n{monitor.output[-2000:]}")
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    # The engine checks its monitor with the same secret.
    system.start_engine(
        "CP200", "--secret-file", str(secret_file), "--auto-plug", "1", "--auto-unplug", "2"
    )
    await system.wait_state("CP200", "ACTIVADO", timeout=30)

    driver = system.start_driver("user2", "--cp", "CP200")
    assert await driver.wait_exit(60) == 0, driver.output
    (ticket,) = events(driver, "ticket")
    assert ticket["cp_id"] == "CP200" and ticket["reason"] == "unplugged" and ticket["kwh"] > 0

    # The token was used up: a second enrolment with it is refused, in one line, exit code 2.
    other_file = tmp_path / "again.secret"
    again = enrolling_monitor(registry, "CP200", other_file, issued["token"], "monitor-again")
    assert await again.wait_exit(30) == 2
    errors = [line for line in again.output.splitlines() if "error" in line]
    assert len(errors) == 1 and "used or expired" in errors[0], again.output
    assert not other_file.exists()
    assert monitor.running  # the enrolled CP is not disturbed


async def test_deregistering_a_cp_during_a_supply_settles_it_and_removes_the_cp(
    registry: Registry,
) -> None:
    system = registry.central
    admin = await registry.login()
    dashboard = await system.start_dashboard()
    dashboard_url = f"http://127.0.0.1:{system.dashboard_port}/healthz"

    async def dashboard_cps() -> int:
        status, health = await asyncio.to_thread(http_get, dashboard_url, 5)
        return int(health["cps"]) if status == 200 else 0

    # The shared broker's state topic may name CPs of other modules' Centrals too.
    listed = len((await registry.call("GET", "/cps", token=admin))[1])
    await wait_for(
        lambda: _at_least(dashboard_cps(), listed), 30, message="the dashboard lacks CPs"
    )
    before = await dashboard_cps()

    await system.start_cp("CP002", "--auto-plug", "1")
    driver = system.start_driver("user1", "--cp", "CP002")
    await system.wait_state("CP002", "SUMINISTRANDO", timeout=30)
    await wait_for(lambda: events(driver, "telemetry"), 20, message="no telemetry")

    status, answer = await registry.call("DELETE", "/cps/CP002", token=admin)
    assert status == 200 and answer["settled_session"], answer

    # Settled with its ticket, as an admin's stop would.
    assert await driver.wait_exit(30) == 0, driver.output
    (ticket,) = events(driver, "ticket")
    assert ticket["session_id"] == answer["settled_session"]
    assert ticket["reason"] == "stopped_by_admin" and ticket["kwh"] > 0
    assert system.query("SELECT status FROM sessions WHERE id = ?", ticket["session_id"]) == [
        ("ABORTED",)
    ]
    # Its keys and secret are gone. Its monitor is told, and stops connecting (refusals in a
    # row would get its PC's address blocked for every CP there).
    live = "SELECT COUNT(*) FROM channel_keys WHERE principal = 'CP002' AND revoked_at IS NULL"
    assert system.query(live) == [(0,)]
    monitor = system.monitors["CP002"]
    await monitor.wait_output(r"Central removed CP002 \(deregistered by an admin\)", timeout=20)
    assert monitor.running
    # Nothing must happen: a monitor that went on would try again 0.5 s after the lost link
    # (shared/backoff.py) and print its refusal; the window leaves it time to connect too.
    await asyncio.sleep(scaled(3))
    assert "rejected" not in monitor.output, monitor.output
    monitor.stop()

    # Gone from the admin panel's data and from the driver dashboard's list.
    assert "CP002" not in await system.cp_states()
    await wait_for(
        lambda: _equals(dashboard_cps(), before - 1), 20, message="CP002 still on the dashboard"
    )
    assert dashboard.running
    audit = await system.api("/api/audit?limit=50")
    (row,) = [r for r in audit if r["action"] == "cp_deregistered"]
    assert row["outcome"] == "ok" and ticket["session_id"] in row["detail"]
    assert row["source"].startswith("127.0.0.1 via 127.0.0.1")


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _at_least(value: Awaitable[int], expected: int) -> bool:
    return await value >= expected
