"""The weather service's loop: places from Central, temperatures from the provider, reports.

Every `interval` seconds: ask Central which places have CPs, ask the provider for their
temperatures, and report each place's reading (or the provider's failure) to Central, which
decides what stops and resumes (EV_Central/weather.py). When Central cannot be reached the
service says so and tries again with backoff; the provider's client lives for the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from websockets.exceptions import InvalidStatus, WebSocketException

from EV_Central.ctl import LoginRefused
from EV_W.central import CentralLink, CentralRefused
from EV_W.config import WeatherSettings
from EV_W.providers import FileProvider, OpenWeatherProvider, Provider, ProviderError
from shared.backoff import Backoff
from shared.lifecycle import Shutdown
from shared.tls import client_context, describe_failure
from shared.weather_api import MAX_ERROR, PlacesQuery, WeatherReport

log = logging.getLogger(__name__)


def make_provider(settings: WeatherSettings) -> Provider:
    if settings.provider == "openweather":
        return OpenWeatherProvider(
            settings.api_key, settings.openweather_url, settings.timeout, settings.country
        )
    return FileProvider(settings.file)


def unreachable(exc: BaseException) -> str:
    """Why Central could not be reached, in a few words (a bare timeout has no message)."""
    return describe_failure(exc) or str(exc) or "timed out"


class WeatherService:
    def __init__(self, settings: WeatherSettings, shutdown: Shutdown) -> None:
        self.settings = settings
        self.shutdown = shutdown
        self.provider = make_provider(settings)
        self._tls = client_context(settings.tls_ca) if settings.tls_ca else None
        self._last: dict[str, str] = {}  # what was last said of each place, to log changes

    async def run(self) -> None:
        """Report until shutdown, reconnecting to Central (each address in turn) when lost."""
        backoff = Backoff(initial=1.0, maximum=30.0)
        centrals = self.settings.central
        turn = 0
        try:
            while not self.shutdown.requested:
                host, port = centrals[turn % len(centrals)]
                link = CentralLink(
                    host, port, self.settings.user, self.settings.password, tls=self._tls
                )
                try:
                    async with link:
                        log.info("reporting the weather to Central at %s", link.address)
                        backoff.reset()
                        await self._rounds(link)
                    return
                except LoginRefused as exc:
                    why = f"refused the login of {self.settings.user}: {exc}"
                except CentralRefused as exc:  # e.g. a Central without weather stops
                    why = f"refused the weather service: {exc}"
                except InvalidStatus as exc:
                    why = f"refused the WebSocket (HTTP {exc.response.status_code})"
                except (OSError, TimeoutError, WebSocketException, ConnectionError) as exc:
                    why = f"cannot reach it: {unreachable(exc)}"
                turn += 1
                delay = backoff.next_delay()
                log.warning("Central at %s: %s; retrying in %.0f s", link.address, why, delay)
                await self._pause(delay)
        finally:
            await self.provider.aclose()

    async def _rounds(self, link: CentralLink) -> None:
        loop = asyncio.get_running_loop()
        while not self.shutdown.requested:
            started = loop.time()
            await self.round(link)
            await self._pause(self.settings.interval - (loop.time() - started))

    async def round(self, link: CentralLink) -> None:
        """One reading of every place Central names, each reported to it."""
        places = (await link.request(PlacesQuery(ref=link.next_ref())))["places"]
        readings = await self.provider.temperatures([str(place) for place in places])
        for place, reading in readings.items():
            if isinstance(reading, ProviderError):
                temperature, error = None, str(reading)[:MAX_ERROR]
            else:
                temperature, error = reading, ""
            report = WeatherReport(
                place=place,
                provider=self.provider.name,
                temperature=temperature,
                error=error,
                ref=link.next_ref(),
            )
            try:
                result = await link.request(report)
            except CentralRefused as exc:
                log.warning("Central refused the weather of %s: %s", place, exc)
                continue
            self._log(place, report, result)

    def _log(self, place: str, report: WeatherReport, result: dict[str, object]) -> None:
        if report.temperature is None:
            said = f"{place}: no reading ({report.error}): stale, nothing changes"
        else:
            said = f"{place}: {report.temperature:.1f} °C" + (
                " (frozen)" if result.get("frozen") else ""
            )
        if self._last.get(place) != said:
            self._last[place] = said
            (log.warning if report.temperature is None else log.info)("%s", said)
        for key, verb in (("stopped", "stopped"), ("resumed", "resumed")):
            cps = result.get(key)
            if isinstance(cps, list) and cps:
                log.info("%s: Central %s %s", place, verb, ", ".join(map(str, cps)))

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shutdown.wait(), seconds)
