"""Central's admin panel in a real headless Chromium, against real services on a real broker."""

from __future__ import annotations

import re
import time

import pytest
from conftest import screenshot
from playwright.async_api import Locator, Page, expect

from helpers import scaled, wait_for
from procs import Deployment

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.kafka]

# The five state colours of shared/static/ev.css, as the browser computes them.
STATE_RGB = {
    "ACTIVADO": "rgb(30, 158, 74)",
    "SUMINISTRANDO": "rgb(35, 196, 92)",
    "PARADO": "rgb(240, 140, 0)",
    "AVERIADO": "rgb(217, 52, 43)",
    "DESCONECTADO": "rgb(123, 128, 136)",
}
XSS = "<img src=x onerror=alert(1)>"


def ms(seconds: float) -> float:
    return scaled(seconds) * 1000


def tile(page: Page, cp_id: str) -> Locator:
    return page.locator(f'.tile[data-cp="{cp_id}"]')


def number(text: str | None) -> float:
    match = re.search(r"-?\d+(?:\.\d+)?", text or "")
    assert match, f"no number in {text!r}"
    return float(match.group())


async def expect_state(page: Page, cp_id: str, state: str, timeout: float = 10) -> None:
    """The tile shows `state` by its class, data-state, its name and its colour."""
    t = tile(page, cp_id)
    await expect(t).to_have_attribute("data-state", state, timeout=ms(timeout))
    await expect(t).to_have_class(re.compile(rf"(^|\s)state-{state}(\s|$)"), timeout=ms(timeout))
    await expect(t.locator(".state")).to_have_text(state, timeout=ms(timeout))
    await expect(t).to_have_css("background-color", STATE_RGB[state], timeout=ms(5))


async def log_in(page: Page, user: str = "admin", password: str = "admin") -> None:
    """Fill and send the login form the panel shows to a browser without a session."""
    await expect(page.locator("#login-form")).to_be_visible(timeout=ms(10))
    await page.locator("#login-user").fill(user)
    await page.locator("#login-password").fill(password)
    await page.locator("#login-submit").click()


async def open_panel(page: Page, system: Deployment) -> None:
    """Open the panel, logging in as the demo admin unless the browser has a session."""
    await page.goto(system.url("/"))
    either = page.locator("#login-form:visible, #connection.online")
    await expect(either.first).to_be_visible(timeout=ms(10))
    if await page.locator("#login-form").is_visible():
        await log_in(page)
    await expect(page.locator("#connection")).to_have_text("live", timeout=ms(10))
    await expect(page.locator("#reconnecting")).to_be_hidden()
    await expect(page.locator("#who")).to_have_text("admin")


async def test_tiles_show_every_cp_and_turn_green_when_a_cp_connects(
    page: Page, system: Deployment
) -> None:
    await system.start_central()
    await open_panel(page, system)
    await expect(page.locator(".tile")).to_have_count(10)
    await expect_state(page, "CP001", "DESCONECTADO")
    cp001 = tile(page, "CP001")
    await expect(cp001).to_contain_text("Alicante")
    await expect(cp001).to_contain_text("€/kWh")
    # The legend names all five states, each in its own colour.
    legend = page.locator("#legend li")
    await expect(legend).to_have_count(5)
    for state, rgb in STATE_RGB.items():
        chip = page.locator(f'#legend li[data-state="{state}"]')
        await expect(chip).to_contain_text(state)
        await expect(chip).to_have_css("background-color", rgb)
    await expect(page.locator("#status-database")).to_have_attribute("data-ok", "true")
    await expect(page.locator("#monitors-count")).to_have_text("0/10")

    system.start_engine("CP001")
    system.start_monitor("CP001")
    await expect_state(page, "CP001", "ACTIVADO", timeout=15)
    await expect(page.locator("#monitors-count")).to_have_text("1/10", timeout=ms(5))
    await expect(page.locator("#status-broker")).to_have_attribute("data-ok", "true")
    await expect(page.locator("#events")).to_contain_text("CP001: monitor authenticated")
    # A supply asked for at the CP's menu, not plugged in yet: the CP is reserved, and says so.
    system.engines["CP001"].send("r user3")
    driver = tile(page, "CP001").locator('[data-field="driver"]')
    await expect(driver).to_have_text("user3 (reserved: waiting for the plug)", timeout=ms(10))
    await expect_state(page, "CP001", "ACTIVADO")


async def test_supply_figures_count_up_and_the_ticket_shows_in_sessions(
    page: Page, system: Deployment
) -> None:
    await system.start_central()
    # As `make run` does: simulated time 60 times faster, so the README's picture shows kWh.
    for cp_id in ("CP001", "CP002", "CP003", "CP004"):
        system.start_engine(cp_id, "--auto-plug", "1", "--speed", "60")
        system.start_monitor(cp_id)
    for cp_id in ("CP001", "CP002", "CP003", "CP004"):
        await system.wait_state(cp_id, "ACTIVADO", timeout=30)
    await open_panel(page, system)
    system.start_driver("user1", "--cp", "CP001")
    user2 = system.start_driver("user2", "--cp", "CP002")
    # Every colour on screen at once: PARADO by command, AVERIADO by an engine fault.
    await system.ctl("stop", "CP003")
    system.engines["CP004"].send("k")

    await expect_state(page, "CP001", "SUMINISTRANDO", timeout=20)
    await expect_state(page, "CP002", "SUMINISTRANDO", timeout=20)
    await expect_state(page, "CP003", "PARADO")
    await expect_state(page, "CP004", "AVERIADO")
    cp001 = tile(page, "CP001")
    await expect(cp001.locator('[data-field="driver"]')).to_have_text("user1")
    # Every CP on a simulated clock is marked so; one without an engine is not.
    for cp_id in ("CP001", "CP002", "CP003", "CP004"):
        marker = tile(page, cp_id).locator('[data-field="speed"]')
        await expect(marker).to_have_text("×60 simulated time", timeout=ms(5))
        await expect(marker).to_be_visible()
    await expect(tile(page, "CP005").locator('[data-field="speed"]')).to_be_hidden()
    await expect(cp001.locator('[data-field="kw"]')).to_have_text(re.compile(r"^\d+\.\d\d kW$"))
    await expect(cp001.locator('[data-field="eur"]')).to_have_text(re.compile(r"^\d+\.\d\d €$"))
    # The first telemetry (a second after the plug) brings the power.
    await expect(cp001.locator('[data-field="kw"]')).not_to_have_text("0.00 kW", timeout=ms(5))

    # kWh counts up with each telemetry push (about once a second).
    kwh = cp001.locator('[data-field="kwh"]')
    seen = [number(await kwh.text_content())]

    async def rose() -> bool:
        value = number(await kwh.text_content())
        if value > seen[-1]:
            seen.append(value)
        return len(seen) >= 4

    await wait_for(rose, 8, interval=0.2, message=f"kWh did not keep rising: {seen}")
    assert seen == sorted(seen)
    # The live session is in the table and the chart has a line for each supplying CP.
    await expect(page.locator('#sessions-live tr:has-text("CP001")')).to_contain_text("SUPPLYING")
    await expect(page.locator("#chart-legend")).to_contain_text("CP001")
    await expect(page.locator("#chart-legend")).to_contain_text("CP002")
    await expect(page.locator('#drivers tr[data-driver="user1"]')).to_contain_text("CP001")

    # Unplug CP002: its session ends and the table shows the ticket's figures.
    system.engines["CP002"].send("u")
    ticket = await wait_for(
        lambda: next((e for e in user2.json_events() if e["event"] == "ticket"), None),
        20,
        message="no ticket for user2",
    )
    await expect_state(page, "CP002", "ACTIVADO")
    row = page.locator(f'#sessions-done tr[data-session="{ticket["session_id"]}"]')
    await expect(row).to_contain_text("COMPLETED", timeout=ms(5))
    await expect(row).to_contain_text(f"{ticket['kwh']:.4f}")
    await expect(row).to_contain_text(f"{ticket['amount_eur']:.2f} €")
    await expect(row).to_contain_text("unplugged")
    await expect(page.locator("#events")).to_contain_text("CP002")

    await expect_state(page, "CP001", "SUMINISTRANDO")
    await page.wait_for_timeout(6000)  # a few more seconds of chart for the README picture
    path = await screenshot(page, "admin-panel")
    assert path.stat().st_size > 10_000


async def test_stop_and_resume_from_the_tiles_and_for_all(page: Page, system: Deployment) -> None:
    await system.start_central()
    for cp_id in ("CP001", "CP002"):
        system.start_engine(cp_id)
        system.start_monitor(cp_id)
    for cp_id in ("CP001", "CP002"):
        await system.wait_state(cp_id, "ACTIVADO", timeout=30)
    await open_panel(page, system)
    await expect_state(page, "CP001", "ACTIVADO")

    await tile(page, "CP001").get_by_role("button", name="Stop").click()
    await expect_state(page, "CP001", "PARADO", timeout=5)
    assert (await system.cp_states())["CP001"] == "PARADO"
    await expect(page.locator("#command-result")).to_contain_text("stop CP001")
    await expect(tile(page, "CP001").get_by_role("button", name="Stop")).to_be_disabled()
    await expect_state(page, "CP002", "ACTIVADO")  # only the one CP

    await tile(page, "CP001").get_by_role("button", name="Resume").click()
    await expect_state(page, "CP001", "ACTIVADO", timeout=5)
    assert (await system.cp_states())["CP001"] == "ACTIVADO"

    await page.locator("#stop-all").click()
    await expect_state(page, "CP001", "PARADO", timeout=5)
    await expect_state(page, "CP002", "PARADO", timeout=5)
    await expect_state(page, "CP003", "DESCONECTADO")  # no monitor: still shown as such
    states = await system.cp_states()
    assert states["CP001"] == states["CP002"] == "PARADO", states
    assert not any(cp["in_service"] for cp in await system.api("/api/cps"))

    await page.locator("#resume-all").click()
    await expect_state(page, "CP001", "ACTIVADO", timeout=5)
    await expect_state(page, "CP002", "ACTIVADO", timeout=5)
    states = await system.cp_states()
    assert states["CP001"] == states["CP002"] == "ACTIVADO", states
    assert all(cp["in_service"] for cp in await system.api("/api/cps"))


async def test_register_form_shows_hostile_text_as_text(page: Page, system: Deployment) -> None:
    await system.start_central()
    await open_panel(page, system)
    await page.locator("#reg-id").fill("CP011")
    await page.locator("#reg-location").fill(XSS)
    await page.locator("#reg-price").fill("0.41")
    await page.locator("#reg-max-kw").fill("11")
    await page.locator("#reg-submit").click()
    result = page.locator("#register-result")
    await expect(result).to_contain_text("registered CP011", timeout=ms(5))
    await expect(result).to_have_class(re.compile(r"\bok\b"))
    # The new CP's secret is shown this once, with what to do with it.
    await expect(page.locator("#secret-box")).to_be_visible()
    await expect(page.locator("#secret-cp")).to_have_text("CP011")
    await expect(page.locator("#secret-value")).to_have_text(re.compile(r"^[\w-]{24,}$"))
    await expect(page.locator("#secret-box")).to_contain_text("EV_CP_SECRET")
    await page.locator("#secret-done").click()
    await expect(page.locator("#secret-box")).to_be_hidden()
    await expect(page.locator("#secret-value")).to_have_text("")

    new = tile(page, "CP011")
    await expect_state(page, "CP011", "DESCONECTADO", timeout=5)
    await expect(new.locator(".loc")).to_have_text(XSS)
    await expect(new).to_contain_text("0.41 €/kWh")
    assert await new.locator("img").count() == 0
    assert await page.locator("img").count() == 0
    await expect(page.locator("#events")).to_contain_text(f"CP011: registered at {XSS}")
    registered = {cp["id"]: cp for cp in await system.api("/api/cps")}
    assert registered["CP011"]["location"] == XSS
    assert registered["CP011"]["price_eur_kwh"] == pytest.approx(0.41)

    # An existing id is refused, and the reason is shown.
    await page.locator("#reg-id").fill("CP001")
    await page.locator("#reg-location").fill("somewhere else")
    await page.locator("#reg-submit").click()
    await expect(result).to_contain_text("already registered", timeout=ms(5))
    await expect(result).to_have_class(re.compile(r"\berror\b"))
    await expect(page.locator(".tile")).to_have_count(11)
    await expect(tile(page, "CP001").locator(".loc")).not_to_have_text("somewhere else")


async def test_the_page_shows_a_change_within_a_second(page: Page, system: Deployment) -> None:
    await system.start_central()
    await system.start_cp("CP002")
    await open_panel(page, system)
    await expect_state(page, "CP002", "ACTIVADO")
    # Record in the page the moment the tile changes (the browser and we share the clock).
    await page.evaluate(
        """() => {
          const node = document.querySelector('.tile[data-cp="CP002"]');
          new MutationObserver(() => {
            if (node.dataset.state === "PARADO" && !window.changedAt) window.changedAt = Date.now();
          }).observe(node, { attributes: true, attributeFilter: ["data-state"] });
        }"""
    )
    started = time.time()
    await system.ctl("stop", "CP002")  # a whole process: its start-up counts too
    await expect_state(page, "CP002", "PARADO", timeout=5)
    changed_at = await page.evaluate("window.changedAt")
    latency = changed_at / 1000 - started
    assert 0 < latency < scaled(1.5), f"tile changed {latency:.2f} s after the command"


async def test_reconnects_after_central_restarts(page: Page, system: Deployment) -> None:
    central = await system.start_central()
    await system.start_cp("CP001")
    await open_panel(page, system)
    await expect_state(page, "CP001", "ACTIVADO")

    central.stop()
    await expect(page.locator("#reconnecting")).to_be_visible(timeout=ms(5))
    await expect(page.locator("#reconnecting")).to_contain_text("reconnecting")
    await expect(page.locator("#connection")).to_have_text("reconnecting…")

    await system.start_central()
    # A restarted Central has forgotten every session: the page asks for a login again.
    await expect(page.locator("#login-form")).to_be_visible(timeout=ms(15))
    await expect(page.locator("#login-error")).to_contain_text("session ended")
    await expect(page.locator("#reconnecting")).to_be_hidden()
    await log_in(page)
    await expect(page.locator("#connection")).to_have_text("live", timeout=ms(15))
    await expect(page.locator("#reconnecting")).to_be_hidden()
    await expect(page.locator(".tile")).to_have_count(10)
    await expect_state(page, "CP001", "ACTIVADO", timeout=20)


async def test_audit_panel_lists_rows_live_and_shows_hostile_text_as_text(
    page: Page, system: Deployment
) -> None:
    central = await system.start_central()
    await page.goto(system.url("/"))
    # Log in the way the page does: /login gives a grant, GET /session sets the cookie.
    login = await page.evaluate(
        """async ([user, password]) => {
          const ws = new WebSocket(`ws://${location.host}/login`);
          const result = await new Promise((resolve, reject) => {
            ws.onopen = () => ws.send(JSON.stringify({ type: "login", user, password }));
            ws.onmessage = (event) => resolve(JSON.parse(event.data));
            ws.onerror = () => reject(new Error("login socket failed"));
          });
          if (!result.ok) return result;
          const answer = await fetch(`/session?grant=${encodeURIComponent(result.grant)}`);
          return { ok: answer.status === 204 };
        }""",
        ["admin", "admin"],
    )
    assert login == {"ok": True}, login
    await open_panel(page, system)

    rows = page.locator("#audit tr")
    await expect(page.locator('#audit tr[data-action="login"]').first).to_contain_text("admin")

    central.send("stop CP003")
    await expect(rows.first).to_have_attribute("data-action", "stop", timeout=ms(5))
    await expect(rows.first).to_contain_text("console")
    await expect(rows.first.locator("td.detail")).to_have_text("CP003: CP003")

    hostile = "<img/src=x/onerror=window.__xss=1>"
    central.send(f"resume {hostile}")
    await expect(rows.first).to_have_attribute("data-outcome", "failed", timeout=ms(5))
    await expect(rows.first.locator("td.detail")).to_contain_text(hostile)
    await expect(page.locator("#audit img")).to_have_count(0)
    assert await page.evaluate("window.__xss") is None
