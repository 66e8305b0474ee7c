"""Frost on the screens, in a real headless Chromium: the admin panel's weather table, alert
and tiles, and the driver dashboard saying why a CP is out of service (docs/weather.md).

The reports come from EV_W's own client to Central (EV_W/central.py), sent by the test, so
that the pages are checked against known values; tests/e2e/test_weather.py runs the service.
"""

from __future__ import annotations

import pytest
from playwright.async_api import Page, expect
from test_admin_page import ms, open_panel, tile
from test_driver_dashboard import logged_in
from weather_setup import WEATHER_PASSWORD, add_weather_account

from EV_W.central import CentralLink
from procs import Deployment
from shared.weather_api import WeatherReport

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.kafka]

FROST = "weather: -3.0 °C at Alicante"


async def test_the_panel_shows_the_weather_and_the_driver_sees_why(
    system: Deployment, page: Page
) -> None:
    await system.start_central()
    add_weather_account(system)
    # The dashboard first: its port was chosen with the Deployment, and must be taken before
    # an engine asks for a free port of its own.
    dashboard = await system.start_dashboard()
    await system.start_cp("CP001")
    async with CentralLink("127.0.0.1", system.http_port, "weather", WEATHER_PASSWORD) as link:
        for report in (
            WeatherReport(place="Alicante", provider="file", temperature=-3.0, ref="a"),
            WeatherReport(place="Elche", provider="file", temperature=None, error="HTTP 500"),
        ):
            await link.request(report)
    await system.wait_state("CP001", "PARADO")

    await open_panel(page, system)
    alicante = page.locator('#weather tr[data-place="Alicante"]')
    await expect(alicante).to_contain_text("-3.0 °C", timeout=ms(10))
    await expect(alicante).to_contain_text("file")
    await expect(alicante).to_have_class("frozen")
    await expect(page.locator('#weather tr[data-place="Elche"]')).to_contain_text("stale: HTTP 500")
    alert = page.locator('#weather-alerts li[data-place="Alicante"]')
    await expect(alert).to_contain_text("Frost at Alicante: -3.0 °C")
    await expect(alert).to_contain_text("CP001, CP002, CP003, CP004 out of service")
    await expect(tile(page, "CP001").locator(".note")).to_have_text(f"Out of service: {FROST}")
    await expect(tile(page, "CP001").locator(".weather-line")).to_have_text("Alicante -3.0 °C")

    await logged_in(page, f"http://127.0.0.1:{system.dashboard_port}/", "user1", "pass1")
    cp001 = page.locator('#cps .tile[data-cp="CP001"]')
    await expect(cp001).to_have_attribute("data-state", "PARADO", timeout=ms(10))
    await expect(cp001).to_contain_text(f"out of service: {FROST}")
    assert dashboard.running
