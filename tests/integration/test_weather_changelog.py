"""Weather stops reach a standby Central through the changelog (docs/high-availability.md).

Central's weather part records a frost at Alicante in a database that captures its changes;
the records, replayed into an empty database as a standby applies them, give a Central that
loads the same holds: the same CPs PARADO for the weather, with the same reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from changelog_setup import capturing_database, queued, replay
from EV_Central import schema
from EV_Central.context import Context
from EV_Central.db import Database
from EV_Central.feed import Feed
from EV_Central.metrics import CentralStats
from EV_Central.registry import ChargingPoint, Registry
from EV_Central.session import Timers
from EV_Central.store import Store
from EV_Central.supplies import Supplies
from EV_Central.weather_stops import WeatherStops
from shared.messages import CPState
from shared.weather_api import WeatherReport


class PostedCommands:
    """Where the weather part's commands to engines go in this test: kept, to be checked
    (the broker is not what this test is about; tests/e2e/test_weather.py has it)."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, str, Any]] = []

    async def post(self, topic: str, key: str, message: Any) -> None:
        self.posted.append((topic, key, message))


def weather_part(db: Database, registry: Registry, bus: PostedCommands) -> WeatherStops:
    context = Context(Store(db), registry, bus, Feed(registry, bus), CentralStats())  # type: ignore[arg-type]
    return WeatherStops(context, Supplies(context, Timers()))


def demo_registry() -> Registry:
    registry = Registry()
    for cp_id, location, price, max_kw in schema.DEMO_CPS:
        registry.add(ChargingPoint(cp_id, location, price, max_kw, connected=True))
    return registry


async def test_a_standby_loads_the_same_weather_holds(tmp_path: Path) -> None:
    source = tmp_path / "active.db"
    bus = PostedCommands()
    async with capturing_database(source) as db:
        active = weather_part(db, demo_registry(), bus)
        result = await active.report(
            WeatherReport(place="Alicante", provider="file", temperature=-2.0)
        )
        await active.report(WeatherReport(place="Elche", provider="file", temperature=None))
        records = await queued(db)
    assert result["stopped"] == ["CP001", "CP002", "CP003", "CP004"]
    assert [(key, m.in_service) for _, key, m in bus.posted] == [
        (cp_id, False) for cp_id in result["stopped"]
    ]

    replica = tmp_path / "standby.db"
    replay(records, replica)
    standby_db = Database(replica, demo=False)
    await standby_db.start()
    try:
        registry = demo_registry()
        standby = weather_part(standby_db, registry, PostedCommands())
        assert await standby.load() == 2
        weather = {w["place"]: w for w in standby.as_api()}
    finally:
        await standby_db.stop()
    held = {cp.id: cp.weather_hold for cp in registry.sorted() if cp.weather_hold}
    assert held == dict.fromkeys(result["stopped"], "weather: -2.0 °C at Alicante")
    assert registry.cps["CP001"].state == CPState.PARADO
    assert registry.cps["CP006"].state == CPState.ACTIVADO  # Elche: stale, not stopped
    assert weather["Alicante"]["frozen"] and weather["Alicante"]["temperature"] == -2.0
    assert weather["Elche"]["stale"] and weather["Elche"]["error"] == "no reading"
