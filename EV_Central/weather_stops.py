"""Central's side of the weather service: places to watch, reports, and the CPs frost stops.

The weather service (EV_W) asks which places to watch and reports each place's temperature
over the admin WebSocket, as an account of role "weather" (EV_Central/web.py). The rules are
in EV_Central/weather.py; this part keeps every place's last report in the `weather` table
(replicated through the changelog, so a standby Central that takes over keeps the same CPs
stopped), puts the CPs of a frozen place out of service (ending a supply in progress, which
gets its ticket) and brings them back when it thaws. The SQL is here, beside what it serves,
as the audit log's is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from EV_Central.context import Context, Part
from EV_Central.registry import ChargingPoint
from EV_Central.supplies import Supplies
from EV_Central.weather import PlaceWeather, place_of
from shared.bus import Topics
from shared.messages import EndReason, SetService
from shared.weather_api import WeatherReport

log = logging.getLogger(__name__)

_COLUMNS = ("place", "temperature", "provider", "updated_at", "checked_at", "error", "frozen_at")


class WeatherStops(Part):
    def __init__(self, context: Context, supplies: Supplies) -> None:
        super().__init__(context)
        self._supplies = supplies
        self.places: dict[str, PlaceWeather] = {}
        self._subscribers: list[Callable[[], None]] = []

    def on_change(self, subscriber: Callable[[], None]) -> None:
        """Call `subscriber` after every report (the admin panel pushes the weather)."""
        self._subscribers.append(subscriber)

    async def load(self) -> int:
        """Every place's last report, and the holds of the CPs of frozen places."""
        rows = await self._store.db.read(f"SELECT {', '.join(_COLUMNS)} FROM weather")
        for row in rows:
            self.places[row["place"]] = PlaceWeather(**{name: row[name] for name in _COLUMNS})
        for cp in self._registry.cps.values():
            weather = self.places.get(place_of(cp.location))
            cp.weather_hold = weather.hold() if weather is not None else ""
        return len(self.places)

    def _by_place(self) -> dict[str, list[ChargingPoint]]:
        """The registered CPs grouped by place, places and CPs sorted: one pass over them."""
        groups: dict[str, list[ChargingPoint]] = {}
        for cp in self._registry.sorted():
            groups.setdefault(place_of(cp.location), []).append(cp)
        return dict(sorted(groups.items()))

    def watched(self) -> list[str]:
        """The places of the registered CPs, which the weather service is to watch."""
        return list(self._by_place())

    def cps_at(self, place: str) -> list[ChargingPoint]:
        return [cp for cp in self._registry.sorted() if place_of(cp.location) == place]

    def signature(self) -> tuple[int, tuple[bool, ...]]:
        """What the panel's weather card shows that changes without a report: the number of
        CPs (a new CP's place) and which places turned stale. Cheap, unlike `as_api`."""
        now = time.time()
        return len(self._registry.cps), tuple(w.stale(now) for w in self.places.values())

    def as_api(self) -> list[dict[str, Any]]:
        """The weather of every watched place (never reported yet: no temperature, stale)."""
        now = time.time()
        return [
            self.places.get(place, PlaceWeather(place)).as_api([cp.id for cp in cps], now)
            for place, cps in self._by_place().items()
        ]

    async def report(self, report: WeatherReport) -> dict[str, Any]:
        """Record one place's report and stop or resume its CPs; what changed, for the result.

        LookupError for a place where no CP is.
        """
        cps = self.cps_at(report.place)
        if not cps:
            raise LookupError(f"no registered CP is at {report.place!r}")
        # A copy: memory changes only once the database has the report.
        weather = replace(self.places.get(report.place) or PlaceWeather(report.place))
        weather.record(report.temperature, report.provider, report.error, time.time())
        async with self._store.db.transaction() as tx:
            await tx.execute(
                f"INSERT OR REPLACE INTO weather ({', '.join(_COLUMNS)})"
                f" VALUES ({', '.join('?' * len(_COLUMNS))})",
                [getattr(weather, name) for name in _COLUMNS],
            )
        self.places[report.place] = weather
        if weather.error:
            log.warning("weather at %s is stale: %s", report.place, weather.error)
        stopped, resumed = await self._hold(cps, weather.hold())
        for subscriber in self._subscribers:
            subscriber()
        return {"stopped": stopped, "resumed": resumed, "frozen": weather.frozen}

    async def _hold(self, cps: list[ChargingPoint], hold: str) -> tuple[list[str], list[str]]:
        """Give each CP the place's hold; stop those it newly holds, resume those it freed."""
        stopped: list[str] = []
        resumed: list[str] = []
        for cp in cps:
            if cp.weather_hold == hold:
                continue
            held_before = bool(cp.weather_hold)
            cp.weather_hold = hold
            self._feed.changed(cp)
            if bool(hold) == held_before:
                continue  # still frozen, at another temperature
            if hold:
                stopped.append(cp.id)
                # The end first: the engine, told on the same ordered topic, ends the supply
                # for this reason before the stop that follows could end it as an admin's.
                await self._supplies.end(cp, EndReason.WEATHER)
            else:
                resumed.append(cp.id)
            await self._bus.post(
                Topics.CP_COMMANDS, cp.id, SetService(cp_id=cp.id, in_service=cp.serving)
            )
        if stopped:
            self._feed.note("weather", f"stopped {', '.join(stopped)} ({hold})")
        if resumed:
            still = [cp for cp in resumed if not self._registry.cps[cp].serving]
            kept = f"; {', '.join(still)} stay stopped by an admin" if still else ""
            self._feed.note("weather", f"thaw: weather hold lifted on {', '.join(resumed)}{kept}")
        return stopped, resumed
