"""The site dashboard (`python -m EV_CP_M dashboard`) in a real browser, over a real deployment.

Central, engines, monitors (publishing health samples with --broker) and the dashboard run as
real processes on a broker of the test's own; Chromium shows the page.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from conftest import screenshot
from playwright.async_api import Page, expect

import procs
from helpers import free_port, scaled

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.kafka, pytest.mark.slow]

XSS = "<img src=x onerror=alert(1)>"


def ms(seconds: float) -> float:
    """A Playwright timeout in ms, scaled like every other deadline."""
    return float(scaled(seconds) * 1000)


SITE_CPS = [f"CP{n:03d}" for n in range(1, 11)]  # the demo CPs these tests start


def start_dashboard(system: procs.Deployment, port: int) -> procs.ServiceProcess:
    proc = procs.ServiceProcess(
        "site-dashboard",
        [
            "-m",
            "EV_CP_M",
            "dashboard",
            "--broker",
            system.broker,
            "--http-port",
            str(port),
            "--listen-host",
            "127.0.0.1",
            "--cp-secrets",
            ",".join(f"{cp}={system.secret(cp)}" for cp in SITE_CPS),
        ],
        system.workdir,
    ).start()
    system.processes.append(proc)
    return proc


async def start_cp(system: procs.Deployment, cp_id: str, *engine_flags: str) -> None:
    system.start_engine(cp_id, *engine_flags)
    system.start_monitor(cp_id, "--broker", system.broker)


async def open_dashboard(system: procs.Deployment, page: Page) -> tuple[procs.ServiceProcess, int]:
    port = free_port()
    proc = start_dashboard(system, port)
    await procs.wait_healthy(proc, port)
    await page.goto(f"http://127.0.0.1:{port}/")
    await expect(page.locator("#connection")).to_have_text("live", timeout=ms(10))
    return proc, port


async def test_health_faults_recoveries_and_a_supply(system: procs.Deployment, page: Page) -> None:
    await system.start_central()
    # As `make run` does: simulated time 60 times faster (the README's picture shows it).
    await start_cp(system, "CP001", "--auto-plug", "1", "--speed", "60")
    await start_cp(system, "CP002", "--speed", "60")
    await start_cp(system, "CP003", "--speed", "60")
    for cp_id in ("CP001", "CP002", "CP003"):
        await system.wait_state(cp_id, "ACTIVADO", timeout=30)
    await open_dashboard(system, page)

    # CP001: engine OK with a round trip, Central link OK, ACTIVADO at Central.
    cp1 = page.locator('[data-cp="CP001"]')
    await expect(cp1).to_have_attribute("data-engine", "OK", timeout=ms(10))
    await expect(cp1).to_have_attribute("data-state", "ACTIVADO", timeout=ms(5))
    await expect(cp1.locator(".metric.rtt .value")).to_have_text(re.compile(r"^\d+\.\d ms$"))
    await expect(cp1.locator(".metric.link .value")).to_have_text("OK")
    await expect(cp1.locator(".cp-loc")).to_have_text("Alicante - Campus, Aulario III")
    await expect(cp1.locator("[data-availability]")).to_have_attribute("data-availability", "1")
    await expect(cp1.locator('[data-field="speed"]')).to_have_text("×60 simulated time")

    # `k` on CP002's engine: a fault within ~2 s, on the card and in the timeline.
    cp2 = page.locator('[data-cp="CP002"]')
    await expect(cp2).to_have_attribute("data-engine", "OK", timeout=ms(10))
    system.engines["CP002"].send("k")
    await expect(cp2).to_have_attribute("data-engine", "KO", timeout=ms(2.5))
    # The newest entry first: CP002's engine fault.
    fault = page.locator('#timeline [data-fault="engine"][data-fault-cp="CP002"]').first
    await expect(fault).to_have_attribute("data-open", "true", timeout=ms(1.5))
    await expect(fault.locator(".status")).to_have_text("open")
    await expect(cp2.locator(".cp-alert.ko")).to_contain_text("Engine KO since")
    await expect(cp2).to_have_attribute("data-state", "AVERIADO", timeout=ms(5))
    await asyncio.sleep(2)

    # `o`: the fault closes with its duration, and the CP is healthy again.
    system.engines["CP002"].send("o")
    await expect(fault).to_have_attribute("data-open", "false", timeout=ms(2.5))
    await expect(fault.locator(".status")).to_have_text("recovered")
    await expect(fault.locator(".dur")).to_have_text(re.compile(r"^[2-9] s$"))
    await expect(fault.locator(".when")).to_have_text(
        re.compile(r"^\d\d:\d\d:\d\d → \d\d:\d\d:\d\d$")
    )
    await expect(cp2).to_have_attribute("data-engine", "OK", timeout=ms(2))
    await expect(cp2).to_have_attribute("data-state", "ACTIVADO", timeout=ms(5))
    availability = await cp2.locator("[data-availability]").get_attribute("data-availability")
    assert availability is not None and 0 < float(availability) < 1, availability

    # A supply on CP001, for the README's screenshot.
    system.start_driver("user1", "--cp", "CP001")
    await expect(cp1).to_have_attribute("data-state", "SUMINISTRANDO", timeout=ms(20))
    # Who is charging is not on the public state topic: the site sees the energy, not the driver.
    await expect(cp1.locator(".cp-supply")).to_contain_text("kWh", timeout=ms(5))
    await expect(cp1.locator(".cp-supply")).not_to_contain_text("user1")
    await expect(cp1.locator(".cp-supply")).not_to_contain_text("0.0000 kWh", timeout=ms(5))
    await expect(page.locator("#kpi-monitored")).to_have_text("3")
    await asyncio.sleep(1.5)  # a few round-trip points more on the chart
    await screenshot(page, "site-dashboard")


async def test_monitor_lost_and_location_shown_as_text(
    system: procs.Deployment, page: Page
) -> None:
    system.prepare_db(f"UPDATE charging_points SET location='{XSS}' WHERE id='CP002'")
    await system.start_central()
    await start_cp(system, "CP001")
    await start_cp(system, "CP002")
    await system.wait_state("CP001", "ACTIVADO", timeout=30)
    await system.wait_state("CP002", "ACTIVADO", timeout=30)
    await open_dashboard(system, page)

    cp2 = page.locator('[data-cp="CP002"]')
    await expect(cp2).to_have_attribute("data-engine", "OK", timeout=ms(10))
    await expect(cp2.locator(".cp-loc")).to_have_text(XSS)  # as text, nothing parsed
    assert await page.locator("img").count() == 0

    # Kill CP002's monitor: Central shows DESCONECTADO, the page the monitor as lost.
    system.monitors["CP002"].kill()
    await expect(cp2).to_have_attribute("data-monitor", "lost", timeout=ms(6))
    await expect(cp2).to_have_attribute("data-state", "DESCONECTADO", timeout=ms(5))
    await expect(cp2).to_have_attribute("data-engine", "UNKNOWN")
    await expect(cp2.locator(".cp-alert.lost")).to_contain_text("Monitor lost")
    lost = page.locator('#timeline [data-fault="monitor"][data-fault-cp="CP002"]').first
    await expect(lost).to_have_attribute("data-open", "true")
    await expect(page.locator('[data-cp="CP001"]')).to_have_attribute("data-monitor", "live")

    # The monitor comes back: the fault closes.
    system.start_monitor("CP002", "--broker", system.broker)
    await expect(cp2).to_have_attribute("data-monitor", "live", timeout=ms(15))
    await expect(lost).to_have_attribute("data-open", "false", timeout=ms(5))
    await expect(cp2).to_have_attribute("data-state", "ACTIVADO", timeout=ms(10))


async def test_dashboard_restart_reconnects_and_keeps_the_last_hour(
    system: procs.Deployment, page: Page
) -> None:
    await system.start_central()
    await start_cp(system, "CP001")
    await system.wait_state("CP001", "ACTIVADO", timeout=30)
    dashboard, port = await open_dashboard(system, page)
    cp1 = page.locator('[data-cp="CP001"]')
    await expect(cp1).to_have_attribute("data-engine", "OK", timeout=ms(10))
    system.engines["CP001"].send("k")
    await expect(cp1).to_have_attribute("data-engine", "KO", timeout=ms(2.5))
    await asyncio.sleep(1)
    system.engines["CP001"].send("o")
    fault = page.locator('#timeline [data-fault="engine"][data-fault-cp="CP001"]').first
    await expect(fault).to_have_attribute("data-open", "false", timeout=ms(2.5))

    # Stop the dashboard: the page says it is reconnecting.
    assert dashboard.stop() == 0
    await expect(page.locator("#reconnecting")).to_be_visible(timeout=ms(3))
    await expect(page.locator("#connection")).to_have_text(re.compile("reconnecting"))

    # Start it again on the same port: the page reconnects by itself, and the fault of
    # before the restart is still there (the last hour is read again from Kafka).
    restarted = start_dashboard(system, port)
    await procs.wait_healthy(restarted, port)
    await expect(page.locator("#connection")).to_have_text("live", timeout=ms(10))
    await expect(page.locator("#reconnecting")).to_be_hidden()
    await expect(cp1).to_have_attribute("data-engine", "OK", timeout=ms(5))
    await expect(fault).to_have_attribute("data-open", "false", timeout=ms(5))
    await expect(page.locator('#timeline [data-fault="monitor"]')).to_have_count(0)
