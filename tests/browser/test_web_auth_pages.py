"""Logging in on the pages, and script injection, in a real headless Chromium.

A CP registered with a hostile location, and a hostile file of requests, must show as text on
the admin panel and on the driver dashboard, and run nothing; the session cookies must be out
of the pages' reach (HttpOnly); a lockout must show its countdown; a driver gets no panel.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, expect

from EV_Central.admin_api import RegisterCP
from EV_Central.ctl import send_command
from helpers import scaled
from procs import Deployment

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.kafka]

XSS = '<img src=x onerror="window.__xss=1">'


def ms(seconds: float) -> float:
    return scaled(seconds) * 1000


@pytest.fixture
async def central(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[Deployment]:
    """Central on the shared broker; accounts lock after 3 failures, for 30 s."""
    deployment = Deployment(kafka_bootstrap, tmp_path, lockout_after=3, lockout_seconds=30)
    try:
        await deployment.start_central()
        yield deployment
    finally:
        deployment.stop_all()


async def log_in(page: Page, user: str, password: str, user_field: str = "#login-user") -> None:
    await expect(page.locator("#login-form")).to_be_visible(timeout=ms(10))
    await page.fill(user_field, user)
    await page.fill("#login-password", password)
    await page.click("#login-form button[type=submit]")


async def no_script_ran(page: Page, cookie: str) -> None:
    """Nothing injected ran, and the session cookie exists but no script can read it."""
    assert await page.evaluate("typeof window.__xss") == "undefined"
    assert cookie not in await page.evaluate("document.cookie")
    cookies = {c["name"]: c for c in await page.context.cookies()}
    assert cookies[cookie]["httpOnly"] is True and cookies[cookie]["sameSite"] == "Strict"


async def test_hostile_text_is_shown_as_text_on_both_pages(
    central: Deployment, browser: Browser, tmp_path: Path
) -> None:
    system = central
    await system.start_dashboard()
    cookie = await system.admin_cookie()
    result = await send_command(
        "127.0.0.1",
        system.http_port,
        RegisterCP(id="CP066", location=XSS, price_eur_kwh=0.3, max_kw=11, ref="x"),
        scaled(10),
        cookie,
    )
    assert result["ok"] is True, result
    errors: list[str] = []

    # The admin panel: the tile, the event log and the audit log show the location as text.
    context = await browser.new_context()
    admin = await context.new_page()
    admin.on("pageerror", lambda exc: errors.append(str(exc)))
    await admin.goto(system.url("/"))
    await log_in(admin, "admin", "admin")
    await expect(admin.locator("#connection")).to_have_text("live", timeout=ms(10))
    tile = admin.locator('.tile[data-cp="CP066"]')
    await expect(tile.locator(".loc")).to_have_text(XSS, timeout=ms(10))
    await expect(admin.locator("#events")).to_contain_text(f"CP066: registered at {XSS}")
    await expect(admin.locator("#audit")).to_contain_text(XSS)
    assert await admin.locator("main img").count() == 0
    await no_script_ran(admin, "ev_admin_session")
    await context.close()

    # The driver dashboard: the CP list, and the problems of a hostile file of requests.
    context = await browser.new_context()
    driver = await context.new_page()
    driver.on("pageerror", lambda exc: errors.append(str(exc)))
    await driver.goto(f"http://127.0.0.1:{system.dashboard_port}/")
    await log_in(driver, "user1", "pass1", user_field="#login-driver")
    await expect(driver.locator("#app")).to_be_visible(timeout=ms(15))
    await expect(driver.locator('[data-cp="CP066"] .loc')).to_have_text(XSS, timeout=ms(10))
    requests = tmp_path / f"{XSS}.txt"
    requests.write_text(f"CP009\n{XSS}\n")
    await driver.set_input_files("#run-file", str(requests))
    await driver.click("#run-start")
    await expect(driver.locator("#run-problems")).to_contain_text(XSS, timeout=ms(10))
    assert await driver.locator("#app img").count() == 0
    await no_script_ran(driver, "ev_driver_session")
    await context.close()
    assert not errors, errors


async def test_a_blocked_address_counts_down_and_a_driver_gets_no_panel(
    central: Deployment, page: Page
) -> None:
    await page.goto(central.url("/"))
    for attempt in range(2):
        await log_in(page, "user2", f"guess{attempt}")
        await expect(page.locator("#login-error")).to_have_text(
            "wrong user or password", timeout=ms(10)
        )
    await log_in(page, "user2", "guess-last")
    error = page.locator("#login-error")
    await expect(error).to_have_text(
        re.compile(r"^too many failed logins \(retry in \d+ s\)$"), timeout=ms(10)
    )
    first = int(re.findall(r"\d+", await error.text_content() or "")[0])
    assert 25 <= first <= 30
    await expect(error).not_to_have_text(
        f"too many failed logins (retry in {first} s)", timeout=ms(3)
    )
    # This browser's address is blocked: the right password from it changes nothing.
    await log_in(page, "user2", "pass2")
    await expect(error).to_contain_text("too many failed logins", timeout=ms(10))
    await expect(page.locator("#app")).to_be_hidden()

    # A driver's right password: a session, but no admin panel and no admin WebSocket.
    await log_in(page, "user3", "pass3")
    await expect(error).to_have_text(
        "user3 is not an administrator: this panel is for admins only.", timeout=ms(10)
    )
    await expect(page.locator("#app")).to_be_hidden()
    await expect(page.locator(".tile")).to_have_count(0)
    # The admin logs in and out: the panel goes, and a reload asks for the login again.
    await log_in(page, "admin", "admin")
    await expect(page.locator("#connection")).to_have_text("live", timeout=ms(10))
    await page.click("#logout")
    await expect(page.locator("#login-form")).to_be_visible()
    await expect(page.locator("#app")).to_be_hidden()
    await page.reload()
    await expect(page.locator("#login-form")).to_be_visible(timeout=ms(10))
    assert not [c for c in await page.context.cookies() if c["name"] == "ev_admin_session"]
