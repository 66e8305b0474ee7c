"""EV_W's OpenWeather provider against a local HTTP server that answers as OpenWeather does.

The server runs on 127.0.0.1 in the test (`--openweather-url` points the service at it); the
internet is never contacted. It checks what a request carries (the place, metric units, the
key) and answers with a temperature, an error, a broken body or nothing at all in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import pytest

from EV_W.providers import OpenWeatherProvider, ProviderError

KEY = "test-key"
TEMPERATURES = {"Alicante,ES": -2.5, "Elche,ES": 14.0}


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request, one answer, as OpenWeather's /data/2.5/weather gives it."""
    try:
        await respond(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    target = request.split(b" ", 2)[1].decode()
    url = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    place = query.get("q", "")
    status, body = 200, b""
    if url.path != "/data/2.5/weather" or query.get("units") != "metric":
        status, body = 400, json.dumps({"cod": "400", "message": "bad request"}).encode()
    elif query.get("appid") != KEY:
        status, body = 401, json.dumps({"cod": 401, "message": "Invalid API key"}).encode()
    elif place in TEMPERATURES:
        body = json.dumps({"name": place, "main": {"temp": TEMPERATURES[place]}}).encode()
    elif place == "Broken,ES":
        body = b"<html>gateway</html>"
    elif place == "Huge,ES":
        body = b"{" + b" " * 100_000 + b"}"
    elif place == "Slow,ES":
        await reader.read()  # no answer: the client gives up and closes
        return
    else:
        status, body = 404, json.dumps({"cod": "404", "message": "city not found"}).encode()
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()


@pytest.fixture
async def openweather() -> AsyncIterator[str]:
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def test_temperatures_and_every_kind_of_failure(openweather: str) -> None:
    provider = OpenWeatherProvider(KEY, openweather, timeout=1.0, country="ES")
    try:
        places = ["Alicante", "Elche", "Nowhere", "Broken", "Huge", "Slow"]
        readings = await provider.temperatures(places)
    finally:
        await provider.aclose()
    assert readings["Alicante"] == -2.5 and readings["Elche"] == 14.0
    failures = {p: str(r) for p, r in readings.items() if isinstance(r, ProviderError)}
    assert failures == {
        "Nowhere": "HTTP 404: city not found",
        "Broken": "malformed reply (HTTP 200, not JSON)",
        "Huge": "reply larger than 65536 bytes",
        "Slow": "OpenWeather did not answer in time",
    }


async def test_a_wrong_key_or_no_server_is_a_failure_that_never_names_the_key(
    openweather: str,
) -> None:
    provider = OpenWeatherProvider("wrong-key", openweather, timeout=1.0)
    try:
        reading = (await provider.temperatures(["Alicante,ES"]))["Alicante,ES"]
    finally:
        await provider.aclose()
    assert isinstance(reading, ProviderError) and str(reading) == "HTTP 401: Invalid API key"
    gone = OpenWeatherProvider("secret-key", "http://127.0.0.1:9", timeout=1.0)
    try:
        reading = (await gone.temperatures(["Alicante"]))["Alicante"]
    finally:
        await gone.aclose()
    assert isinstance(reading, ProviderError) and "cannot reach OpenWeather" in str(reading)
    assert "secret-key" not in str(reading)
