"""The driver dashboard in a real browser, against real processes on a broker of its own."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from conftest import screenshot
from playwright.async_api import Browser, Page, expect

from helpers import free_port, scaled, wait_for
from procs import Deployment, ServiceProcess, http_get

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.kafka, pytest.mark.slow]

XSS = "<img src=x onerror=alert(1)>"


class Dashboard:
    """The dashboard process on a fixed port, so that it can be restarted in place."""

    def __init__(self, system: Deployment) -> None:
        self.system = system
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc: ServiceProcess | None = None

    async def start(self) -> Dashboard:
        self.proc = ServiceProcess(
            "driver-dashboard",
            [
                "-m",
                "EV_Driver",
                "dashboard",
                "--broker",
                self.system.broker,
                "--http-port",
                str(self.port),
                "--listen-host",
                "127.0.0.1",
            ],
            self.system.workdir,
        )
        self.system.processes.append(self.proc)
        self.proc.start()
        await wait_for(self._healthy, 60, interval=0.3, message="dashboard never healthy")
        return self

    async def _healthy(self) -> bool:
        assert self.proc is not None
        if not self.proc.running:
            raise AssertionError(f"dashboard exited:\n{self.proc.output[-3000:]}")
        try:
            status, _ = await asyncio.to_thread(http_get, self.url + "healthz", 2)
        except OSError:
            return False
        return status == 200


async def login(page: Page, url: str, driver_id: str, password: str) -> None:
    await page.goto(url)
    await expect(page.locator("#login-form")).to_be_visible(timeout=scaled(10_000))
    await page.fill("#login-driver", driver_id)
    await page.fill("#login-password", password)
    await page.click("#login-form button[type=submit]")


async def logged_in(page: Page, url: str, driver_id: str, password: str) -> None:
    await login(page, url, driver_id, password)
    await expect(page.locator("#app")).to_be_visible(timeout=scaled(15_000))
    await expect(page.locator("#who")).to_have_text(driver_id)
    await expect(page.locator("#connection")).to_have_text("live")


def number(text: str | None) -> float:
    return float(text or 0)


async def value(page: Page, selector: str) -> float:
    return number(await page.get_attribute(selector, "data-value"))


async def wait_value_above(page: Page, selector: str, floor: float, timeout: float = 20) -> float:
    async def above() -> float | None:
        v = await value(page, selector)
        return v if v > floor else None

    return float(
        await wait_for(above, timeout, interval=0.2, message=f"{selector} never rose above {floor}")
    )


async def test_wrong_password_then_supply_stop_ticket_balance_history(
    system: Deployment, page: Page
) -> None:
    await system.start_central()
    # As `make run` does: simulated time 60 times faster, so the README's picture shows kWh.
    await system.start_cp("CP001", "--auto-plug", "1", "--speed", "60")
    dashboard = await Dashboard(system).start()
    balance_before = system.balance("user1")

    await login(page, dashboard.url, "user1", "wrong")
    await expect(page.locator("#login-error")).to_contain_text("wrong", timeout=scaled(15_000))
    await expect(page.locator("#app")).to_be_hidden()

    await page.fill("#login-password", "pass1")
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#app")).to_be_visible(timeout=scaled(15_000))
    await expect(page.locator("#balance")).to_have_attribute("data-cents", str(balance_before))

    # The CP list: CP001 available (clickable); the tile follows CP002's state live (its
    # monitor dies: DESCONECTADO, not clickable).
    cp001 = page.locator('[data-cp="CP001"]')
    await expect(cp001).to_have_attribute("data-state", "ACTIVADO", timeout=scaled(10_000))
    await expect(cp001).to_be_enabled()
    await expect(cp001).to_contain_text("tap to charge")
    await system.start_cp("CP002")
    cp002 = page.locator('[data-cp="CP002"]')
    await expect(cp002).to_have_attribute("data-state", "ACTIVADO", timeout=scaled(10_000))
    system.monitors["CP002"].kill()
    await expect(cp002).to_have_attribute("data-state", "DESCONECTADO", timeout=scaled(10_000))
    await expect(cp002).to_be_disabled()

    await cp001.click()
    await expect(page.locator("#supply-state")).to_have_text("Charging", timeout=scaled(20_000))
    await expect(page.locator("#stop-button")).to_be_enabled()
    kwh = await wait_value_above(page, "#supply-kwh", 0)
    eur = await wait_value_above(page, "#supply-eur", 0)
    await wait_value_above(page, "#supply-kwh", kwh)
    await wait_value_above(page, "#supply-eur", eur)
    await expect(page.locator("#supply-elapsed")).not_to_have_text("–")
    # CP001 runs a simulated clock: the supply says so beside its figures.
    await expect(page.locator("#supply-speed")).to_have_text("×60 simulated time")
    await expect(page.locator("#supply-speed")).to_be_visible()
    await wait_value_above(page, "#supply-kwh", 1.0)  # kWh, not Wh, in the README's picture
    await expect(page.locator('[data-cp="CP001"]')).to_have_attribute("data-state", "SUMINISTRANDO")
    await screenshot(page, "driver-dashboard")
    await page.set_viewport_size({"width": 390, "height": 844})  # a phone
    await expect(page.locator("#stop-button")).to_be_visible()
    await screenshot(page, "driver-dashboard-phone")
    await page.set_viewport_size({"width": 1280, "height": 900})

    await page.click("#stop-button")
    ticket = page.locator("#ticket")
    await expect(ticket).to_have_attribute(
        "data-session", re.compile(r"\w+"), timeout=scaled(15_000)
    )
    await expect(page.locator("#supply-state")).to_have_text("Finished")
    session_id = await ticket.get_attribute("data-session")
    amount = number(await ticket.get_attribute("data-amount"))
    assert amount >= eur > 0
    await expect(ticket).to_contain_text("stopped by you")

    async def balance_settled() -> bool:
        shown = await page.get_attribute("#balance", "data-cents")
        return shown == str(system.balance("user1"))

    await wait_for(balance_settled, 15, message="the balance shown is not Central's")
    assert system.balance("user1") == balance_before - round(amount * 100)
    row = page.locator(f'#history tbody tr[data-session="{session_id}"]')
    await expect(row).to_be_visible(timeout=scaled(10_000))
    await expect(row).to_contain_text("CP001")
    await expect(page.locator("#stop-button")).to_be_disabled()


async def test_two_drivers_each_see_only_their_own_supply(
    system: Deployment, browser: Browser
) -> None:
    await system.start_central()
    await system.start_cp("CP001", "--auto-plug", "1")
    await system.start_cp("CP002", "--auto-plug", "1")
    dashboard = await Dashboard(system).start()
    contexts = [await browser.new_context() for _ in range(2)]
    errors: list[str] = []
    try:
        pages = [await context.new_page() for context in contexts]
        for p in pages:
            p.on("pageerror", lambda exc: errors.append(str(exc)))
        one, two = pages
        await logged_in(one, dashboard.url, "user1", "pass1")
        await logged_in(two, dashboard.url, "user2", "pass2")

        await one.locator('[data-cp="CP001"]').click()
        await expect(one.locator("#supply-state")).to_have_text("Charging", timeout=scaled(20_000))
        # user2 sees CP001 busy, but nothing of user1's supply.
        await expect(two.locator('[data-cp="CP001"]')).to_have_attribute(
            "data-state", "SUMINISTRANDO", timeout=scaled(10_000)
        )
        await expect(two.locator("#supply-body")).to_be_hidden()
        await expect(two.locator('[data-cp="CP001"]')).not_to_have_class(re.compile(r"\bmine\b"))

        await two.locator('[data-cp="CP002"]').click()
        await expect(two.locator("#supply-state")).to_have_text("Charging", timeout=scaled(20_000))
        await expect(two.locator("#supply-cp")).to_contain_text("CP002")
        await expect(one.locator("#supply-cp")).to_contain_text("CP001")
        await wait_value_above(one, "#supply-kwh", 0)
        await wait_value_above(two, "#supply-kwh", 0)

        # A second tab of user1 follows the same supply; user2's tab is untouched by user1's stop.
        third = await contexts[0].new_page()
        await third.goto(dashboard.url)  # the same browser: its session cookie is enough
        await expect(third.locator("#who")).to_have_text("user1", timeout=scaled(10_000))
        await expect(third.locator("#login-view")).to_be_hidden()
        await expect(third.locator("#supply-cp")).to_contain_text("CP001")
        await one.click("#stop-button")
        for tab in (one, third):
            await expect(tab.locator("#ticket")).to_contain_text("CP001", timeout=scaled(15_000))
        await expect(two.locator("#supply-state")).to_have_text("Charging")
        await expect(two.locator("#ticket")).not_to_contain_text("CP001")
        await two.click("#stop-button")
        await expect(two.locator("#ticket")).to_contain_text("CP002", timeout=scaled(15_000))
        await expect(one.locator("#ticket")).not_to_contain_text("CP002")
    finally:
        for context in contexts:
            await context.close()
    assert not errors, errors


async def test_uploaded_file_runs_each_request_four_seconds_apart(
    system: Deployment, page: Page, tmp_path: Path
) -> None:
    await system.start_central()
    await system.start_cp("CP001", "--auto-plug", "1", "--auto-unplug", "2")
    dashboard = await Dashboard(system).start()
    await logged_in(page, dashboard.url, "user3", "pass3")
    requests = tmp_path / "requests.txt"
    requests.write_text("# two requests\nCP001\nCP009  # no monitor: denied\n")

    await page.set_input_files("#run-file", str(requests))
    await page.click("#run-start")
    queue = page.locator("#run-queue li")
    await expect(queue).to_have_count(2, timeout=scaled(5_000))
    await expect(page.locator("#run-cancel")).to_be_enabled()
    first, second = queue.nth(0), queue.nth(1)
    await expect(first).to_have_attribute("data-status", "ticket", timeout=scaled(30_000))
    ticket_seen = time.monotonic()
    await expect(second).to_have_attribute("data-status", "pending")
    await expect(second).to_have_attribute("data-status", "denied", timeout=scaled(20_000))
    assert time.monotonic() - ticket_seen >= 3.5  # as the page saw it
    # As the server timed it: the second request went out 4 s after the first one's ticket.
    first_done = number(await first.get_attribute("data-done-at"))
    second_sent = number(await second.get_attribute("data-sent-at"))
    assert second_sent - first_done >= 4.0, (first_done, second_sent)
    await expect(page.locator("#run-status")).to_contain_text("finished")
    await expect(page.locator("#run-cancel")).to_be_disabled()
    await expect(page.locator("#supply-state")).to_have_text("Denied")

    sessions = system.query(
        "SELECT cp_id, status, requested_at, ended_at FROM sessions"
        " WHERE driver_id = 'user3' ORDER BY requested_at"
    )
    assert [(cp, status) for cp, status, _, _ in sessions] == [
        ("CP001", "COMPLETED"),
        ("CP009", "DENIED"),
    ], sessions
    assert sessions[1][2] - sessions[0][3] >= 4.0, sessions  # as Central saw it


async def test_restarting_the_dashboard_shows_reconnecting_then_recovers(
    system: Deployment, page: Page
) -> None:
    # A hostile location (kept out of the screenshots' scenario) is shown as text.
    system.prepare_db(f"UPDATE charging_points SET location='{XSS}' WHERE id='CP002'")
    await system.start_central()
    await system.start_cp("CP001")
    dashboard = await Dashboard(system).start()
    await logged_in(page, dashboard.url, "user4", "pass4")
    await expect(page.locator('[data-cp="CP001"]')).to_have_attribute("data-state", "ACTIVADO")
    await expect(page.locator('[data-cp="CP002"] .loc')).to_have_text(XSS)
    assert await page.locator("#cps img").count() == 0

    assert dashboard.proc is not None
    dashboard.proc.stop()
    await expect(page.locator("#reconnecting")).to_be_visible(timeout=scaled(10_000))
    await expect(page.locator("#connection")).to_have_text("reconnecting…")

    await dashboard.start()
    # The restarted dashboard has forgotten every session: log in again, fresh data follows.
    await expect(page.locator("#login-form")).to_be_visible(timeout=scaled(20_000))
    await expect(page.locator("#login-error")).to_contain_text("session ended")
    await expect(page.locator("#reconnecting")).to_be_hidden()
    await page.fill("#login-password", "pass4")
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#connection")).to_have_text("live", timeout=scaled(15_000))
    await expect(page.locator("#who")).to_have_text("user4", timeout=scaled(15_000))
    await expect(page.locator('[data-cp="CP001"]')).to_have_attribute(
        "data-state", "ACTIVADO", timeout=scaled(10_000)
    )
    await expect(page.locator("#balance")).to_have_attribute(
        "data-cents", str(system.balance("user4"))
    )
