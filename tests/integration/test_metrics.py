"""Central's /metrics: Prometheus text that moves when a supply happens."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

from helpers import wait_for
from procs import Deployment
from tools.fleet import promtext

pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.slow]


def scrape(system: Deployment) -> tuple[str, str, dict[promtext.Key, float]]:
    with urllib.request.urlopen(system.url("/metrics"), timeout=5) as resp:
        text = resp.read().decode()
        return resp.headers["Content-Type"], text, promtext.parse(text)


async def test_metrics_count_a_supply(system: Deployment) -> None:
    await system.start_central()
    content_type, text, before = await asyncio.to_thread(scrape, system)
    assert content_type.startswith("text/plain")
    assert "# TYPE ev_central_messages_total counter" in text
    assert promtext.value(before, "ev_central_cps", state="DESCONECTADO") >= 1
    assert promtext.value(before, "ev_central_monitors_connected") == 0
    assert promtext.value(before, "ev_central_messages_total", type="supply_request") == 0

    await system.start_cp("CP001", "--auto-plug", "1", "--auto-unplug", "3")
    driver = system.start_driver("user2", "--cp", "CP001")
    assert await driver.wait_exit(60) == 0, driver.output

    async def settled() -> dict[promtext.Key, float] | None:
        _, _, now = await asyncio.to_thread(scrape, system)
        done = promtext.value(now, "ev_central_sessions", status="COMPLETED") >= 1
        return now if done else None

    after = await wait_for(settled, 30, interval=0.5, message="no COMPLETED session in /metrics")
    assert promtext.value(after, "ev_central_monitors_connected") == 1
    assert promtext.value(after, "ev_central_cps", state="ACTIVADO") == 1
    assert promtext.value(after, "ev_central_messages_total", type="supply_request") == 1
    assert promtext.value(after, "ev_central_messages_total", type="heartbeat") > 0
    assert promtext.value(after, "ev_central_messages_total", type="cp_telemetry") >= 1
    assert promtext.value(after, "ev_central_messages_total", type="cp_supply_ended") == 1
    assert promtext.value(after, "ev_central_handler_seconds_count", type="supply_request") == 1
    assert promtext.value(after, "ev_central_handler_seconds_count", type="telemetry_batch") >= 1
    lag = promtext.family(after, "ev_central_consumer_lag")
    assert lag and all(v >= 0 for v in lag.values())
    # Where the request's time went: one arrival, its reply handed over and acknowledged.
    assert promtext.value(after, "ev_central_stage_seconds_count", stage="arrival") == 1
    assert promtext.value(after, "ev_central_stage_seconds_count", stage="outbox") >= 1
    assert promtext.value(after, "ev_central_stage_seconds_count", stage="publish") >= 1
    pauses = promtext.family(after, "ev_central_gc_pause_seconds_count")
    assert set(pauses) >= {(("generation", g),) for g in "012"}, pauses
