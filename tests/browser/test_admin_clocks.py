"""The admin panel's clocks, in a real headless Chromium: a monitor a minute ahead is flagged.

Real Central, engines and monitors on a real broker; CP001's monitor runs under libfaketime
with its clock 60 s ahead, CP002 on time. The panel names the wrong clock in its banner, marks
its row, leaves every clock that is right alone, and times the four hops.
"""

from __future__ import annotations

import re

import pytest
from playwright.async_api import Locator, Page, expect
from test_admin_page import ms, open_panel

from helpers import need_tool, wait_for
from procs import Deployment

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.kafka]

WARN = re.compile(r"(^|\s)warn(\s|$)")


def clock_row(page: Page, kind: str, peer_id: str) -> Locator:
    return page.locator(f'#clock-table tr[data-kind="{kind}"][data-id="{peer_id}"]')


def seconds(text: str | None) -> float | None:
    """The signed number of an offset cell ("+60.0 s", "−0.3 s" with a real minus sign)."""
    match = re.search(r"([+−-])(\d+(?:\.\d+)?)", text or "")
    if match is None:
        return None  # "–": not measured yet
    sign = -1.0 if match.group(1) in "−-" else 1.0
    return sign * float(match.group(2))


async def offset_within(row: Locator, low: float, high: float, timeout: float = 20) -> None:
    """Wait until the row's offset lies in [low, high]: the first estimates can be off by half
    a slow first round trip, and the next measurements narrow them."""
    seen: list[float | None] = []

    async def inside() -> bool:
        value = seconds(await row.locator(".offset").text_content())
        seen.append(value)
        return value is not None and low <= value <= high

    await wait_for(inside, timeout, interval=0.25, message=f"offsets seen: {seen[-5:]}")


async def test_a_monitor_clock_a_minute_ahead_is_flagged_and_the_others_are_not(
    page: Page, system: Deployment
) -> None:
    need_tool("faketime", "clock skew tests", "faketime")
    system.clocks["monitor-CP001"] = "+60s"
    await system.start_central()
    for cp_id in ("CP001", "CP002"):
        system.start_engine(cp_id)
        system.start_monitor(cp_id, *system.tls_flags())
    for cp_id in ("CP001", "CP002"):
        await system.wait_state(cp_id, "ACTIVADO", timeout=30)
    await open_panel(page, system)

    banner = page.locator("#clock-warning")
    await expect(banner).to_be_visible(timeout=ms(20))
    await expect(banner).to_contain_text("CP001")
    await expect(banner).to_contain_text("ahead")
    await expect(banner).to_contain_text("timedatectl set-ntp true")

    monitor = clock_row(page, "monitor", "CP001")
    await expect(monitor).to_have_class(WARN)
    await offset_within(monitor, 59.5, 60.5)
    await expect(monitor).to_contain_text("round trips")

    # Central's own clock and the clocks that are right carry no warning.
    central = page.locator('#clock-table tr[data-kind="central"]')
    await expect(central).to_contain_text("Central (this)")
    await expect(central).not_to_have_class(WARN)
    await expect(page.locator("#clock-table tbody tr").first).to_have_attribute(
        "data-kind", "central"
    )
    for kind, cp_id in (("monitor", "CP002"), ("engine", "CP001"), ("engine", "CP002")):
        row = clock_row(page, kind, cp_id)
        await offset_within(row, -1.0, 1.0)
        await expect(row).not_to_have_class(WARN)
    await expect(banner).not_to_contain_text(re.compile(r"\+\d+ more"))  # the only one off

    hops = page.locator("#hop-table tbody tr")
    await expect(hops).to_have_count(4)
    await expect(hops.first).to_contain_text("driver → Central")
