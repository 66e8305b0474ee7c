"""The weather service (EV_W) with real processes: Central, engines, monitors, a driver and
EV_W on its file provider, over a real broker (docs/weather.md).

Frost at Alicante during a supply stops Alicante's CPs (PARADO, reason weather) within 6 s and
the supply ends with its ticket; an admin may not resume them meanwhile; the thaw brings back
those that only the weather held, while an admin's stop given during the frost stays. A broken
provider marks the weather stale and changes nothing. The weather account may do nothing else.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from weather_setup import WEATHER_PASSWORD, add_weather_account, start_weather
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from EV_Central.ctl import admin_login
from EV_W.central import CentralLink, CentralRefused
from helpers import scaled, wait_for
from procs import REPO_ROOT, Deployment, http_get
from shared.weather_api import PlacesQuery, WeatherReport

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

ALICANTE_CPS = ("CP001", "CP002")  # of CP001-CP004, "Alicante - …" in the demo seed


async def set_temperature(places: Path, place: str, celsius: str) -> None:
    """`python -m EV_W set PLACE TEMP --file PATH`, as an operator types it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "EV_W",
        "set",
        place,
        celsius,
        "--file",
        str(places),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()


async def cps(system: Deployment) -> dict[str, dict[str, Any]]:
    return {cp["id"]: cp for cp in await system.api("/api/cps")}


async def place(system: Deployment, name: str) -> dict[str, Any]:
    return next(w for w in await system.api("/api/weather") if w["place"] == name)


async def test_frost_stops_a_supply_and_the_thaw_keeps_an_admins_stop(
    system: Deployment, tmp_path: Path
) -> None:
    places = tmp_path / "weather.json"
    places.write_text(json.dumps({"Alicante": 12, "Elche": 15}))
    await system.start_central()
    add_weather_account(system)
    system.start_engine("CP001", "--auto-plug", "1")
    system.start_monitor("CP001")
    system.start_engine("CP002")
    system.start_monitor("CP002")
    weather = start_weather(system, places)
    for cp_id in ALICANTE_CPS:
        await system.wait_state(cp_id, "ACTIVADO", timeout=30)

    async def reported() -> bool:
        return (await place(system, "Alicante"))["temperature"] == 12

    await wait_for(reported, 20, interval=0.3, message=f"no weather:\n{weather.output[-2000:]}")
    driver = system.start_driver("user1", "--cp", "CP001")
    await system.wait_state("CP001", "SUMINISTRANDO", timeout=30)

    async def metered() -> bool:  # energy on the meter, so that the ticket has some
        return any(e["event"] == "telemetry" for e in driver.json_events())

    await wait_for(metered, 20, interval=0.2, message=f"no telemetry:\n{driver.output[-2000:]}")

    # Frost during the supply: both Alicante CPs PARADO for the weather within 6 s.
    await set_temperature(places, "Alicante", "-2")
    frozen_at = time.monotonic()
    for cp_id in ALICANTE_CPS:
        await system.wait_state(cp_id, "PARADO", timeout=6)
    assert time.monotonic() - frozen_at <= scaled(6)
    now = await cps(system)
    for cp_id in ALICANTE_CPS:
        assert now[cp_id]["stop_reason"] == "weather: -2.0 °C at Alicante"
        assert now[cp_id]["in_service"] is True  # no admin stopped it
    assert await driver.wait_exit(30) == 0, driver.output
    (ticket,) = [e for e in driver.json_events() if e["event"] == "ticket"]
    assert ticket["cp_id"] == "CP001" and ticket["reason"] == "weather" and ticket["kwh"] > 0
    alicante = await place(system, "Alicante")
    assert alicante["frozen"] and alicante["provider"] == "file"
    assert alicante["cps"] == ["CP001", "CP002", "CP003", "CP004"] and not alicante["stale"]

    # An admin may not resume a CP that frost holds, and is told why.
    refused = await system.ctl("resume", "CP001", check=False)
    assert "CP001 stays PARADO: weather: -2.0 °C at Alicante" in refused
    # An admin's stop during the frost is a second, independent hold.
    await system.ctl("stop", "CP002")

    # The thaw: CP001 back in service, CP002 still stopped by the admin.
    await set_temperature(places, "Alicante", "3.5")
    await system.wait_state("CP001", "ACTIVADO", timeout=6)
    now = await cps(system)
    assert now["CP002"]["state"] == "PARADO"
    assert now["CP002"]["stop_reason"] == "stopped by an admin"
    await system.ctl("resume", "CP002")
    await system.wait_state("CP002", "ACTIVADO", timeout=10)

    # A provider that fails: the weather turns stale, nothing stops or resumes.
    places.write_text("{not json")

    async def stale() -> bool:
        return (await place(system, "Alicante"))["stale"]

    await wait_for(stale, 10, interval=0.3)
    assert "not JSON" in (await place(system, "Alicante"))["error"]
    assert {cp_id: (await cps(system))[cp_id]["state"] for cp_id in ALICANTE_CPS} == {
        "CP001": "ACTIVADO",
        "CP002": "ACTIVADO",
    }
    audit = await system.api("/api/audit")
    actions = {(row["actor"], row["action"]) for row in audit}
    assert {("weather", "weather_stop"), ("weather", "weather_resume")} <= actions


async def test_the_weather_account_may_report_the_weather_and_nothing_else(
    system: Deployment,
) -> None:
    await system.start_central()
    add_weather_account(system)
    cookie = await admin_login(
        "127.0.0.1", system.http_port, "weather", WEATHER_PASSWORD, scaled(10)
    )
    status, _ = await asyncio.to_thread(http_get, system.url("/api/cps"), 5, {"Cookie": cookie})
    assert status == 403
    async with CentralLink("127.0.0.1", system.http_port, "weather", WEATHER_PASSWORD) as link:
        answer = await link.request(PlacesQuery(ref=link.next_ref()))
        assert {"Alicante", "Elche", "Murcia", "Valencia"} <= set(answer["places"])
        with pytest.raises(CentralRefused, match="no registered CP is at 'Atlantis'"):
            await link.request(
                WeatherReport(place="Atlantis", provider="file", temperature=-5, ref="r1")
            )
    # An admin command on the weather account's WebSocket is refused, and it is pushed nothing.
    async with connect(
        f"ws://127.0.0.1:{system.http_port}/ws", additional_headers={"Cookie": cookie}
    ) as ws:
        await ws.send(json.dumps({"type": "command", "action": "stop", "target": "all"}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
        assert reply["type"] == "result" and reply["ok"] is False
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 2.5)  # no snapshot, CPs or status pushed
    assert all(cp["in_service"] for cp in await system.api("/api/cps"))
    # The admin's panel sees every watched place, none reported yet.
    assert all(w["temperature"] is None for w in await system.api("/api/weather"))
    # A driver's session may not open the WebSocket at all.
    driver_cookie = await admin_login("127.0.0.1", system.http_port, "user1", "pass1", 10)
    with pytest.raises(InvalidStatus):
        async with connect(
            f"ws://127.0.0.1:{system.http_port}/ws",
            additional_headers={"Cookie": driver_cookie},
        ):
            pass
