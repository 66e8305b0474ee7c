"""Where temperatures come from: OpenWeather's API, or a file an operator edits.

A provider answers, for each place asked about, its temperature in °C or a `ProviderError`
saying why it has none. A failure is per place and never raised out of `temperatures`: the
service reports it to Central, which shows the place's weather as stale and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Protocol

import httpx

from EV_W.places_file import PlacesFileError, find, read_places
from shared.errors import EVError

MAX_REPLY_BYTES = 64 * 1024  # an OpenWeather answer is about 500 bytes
OPENWEATHER_URL = "https://api.openweathermap.org"


class ProviderError(EVError):
    """A provider could not give a place's temperature."""


Reading = float | ProviderError


class Provider(Protocol):
    name: str

    async def temperatures(self, places: list[str]) -> dict[str, Reading]: ...

    async def aclose(self) -> None: ...


class FileProvider:
    """Temperatures from a JSON file (EV_W/places_file.py), read afresh every round."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path

    async def temperatures(self, places: list[str]) -> dict[str, Reading]:
        try:
            known = await asyncio.to_thread(read_places, self.path)
        except PlacesFileError as exc:
            failure = ProviderError(str(exc))
            return dict.fromkeys(places, failure)
        readings: dict[str, Reading] = {}
        for place in places:
            name = find(known, place)
            readings[place] = (
                known[name]
                if name is not None
                else ProviderError(f"no temperature for {place} in {self.path}")
            )
        return readings

    async def aclose(self) -> None:
        return None


def parse_openweather(status: int, body: bytes) -> float:
    """The temperature (°C) in an answer of OpenWeather's current weather API, or why not.

    An error answer carries {"cod": ..., "message": ...}; a good one {"main": {"temp": ...}}.
    """
    try:
        data = json.loads(body)
    except ValueError:
        raise ProviderError(f"malformed reply (HTTP {status}, not JSON)") from None
    if status != 200:
        message = data.get("message") if isinstance(data, dict) else None
        raise ProviderError(f"HTTP {status}: {str(message or 'no message')[:120]}")
    main = data.get("main") if isinstance(data, dict) else None
    temp = main.get("temp") if isinstance(main, dict) else None
    if isinstance(temp, bool) or not isinstance(temp, int | float) or not math.isfinite(temp):
        raise ProviderError("malformed reply: no main.temp number")
    return float(temp)


class OpenWeatherProvider:
    """OpenWeather's current weather by place name, in metric units, one request a place.

    Requests of a round go out together over one pooled client (httpx); each has `timeout`
    seconds, and an answer larger than 64 KiB is refused unread.
    """

    name = "openweather"

    def __init__(self, api_key: str, base_url: str, timeout: float, country: str = "") -> None:
        self._key = api_key
        self._country = country
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            headers={"User-Agent": "EV_W (EV charging network weather service)"},
            follow_redirects=False,
        )

    async def temperatures(self, places: list[str]) -> dict[str, Reading]:
        answers = await asyncio.gather(*(self._one(place) for place in places))
        return dict(zip(places, answers, strict=True))

    async def _one(self, place: str) -> Reading:
        query = f"{place},{self._country}" if self._country else place
        params = {"q": query, "units": "metric", "appid": self._key}
        try:
            async with self._client.stream("GET", "/data/2.5/weather", params=params) as reply:
                body = bytearray()
                async for chunk in reply.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_REPLY_BYTES:
                        return ProviderError(f"reply larger than {MAX_REPLY_BYTES} bytes")
            return parse_openweather(reply.status_code, bytes(body))
        except ProviderError as exc:
            return exc
        except httpx.TimeoutException:
            return ProviderError("OpenWeather did not answer in time")
        except httpx.HTTPError as exc:
            # Never the URL: it carries the API key.
            return ProviderError(f"cannot reach OpenWeather: {type(exc).__name__}")

    async def aclose(self) -> None:
        await self._client.aclose()
