"""The admin panel of a Central pair (--ha), in a real headless Chromium.

The active Central's panel says it is the active one and shows the Kafka cluster; the
standby's page says it is the standby and links to the active one's panel. On the session's
single broker: the pair runs there too, with one copy of everything.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest
from playwright.async_api import Page, expect
from test_admin_page import ms, open_panel

from helpers import wait_for
from procs import Deployment, http_get

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.kafka]


async def test_the_panel_shows_the_role_and_the_cluster_and_the_standby_points_to_it(
    page: Page, kafka_bootstrap: str, tmp_path: Path
) -> None:
    key = secrets.token_bytes(32).hex() + "\n"
    a, b = (
        Deployment(kafka_bootstrap, tmp_path / name, ha=True, advertise="127.0.0.1")
        for name in ("a", "b")
    )
    for central in (a, b):
        central.workdir.mkdir()
        central.db_path.with_name("central.db.audit-key").write_text(key)

    async def role(central: Deployment) -> str | None:
        try:
            status, body = await asyncio.to_thread(http_get, central.url("/healthz"), 2)
        except OSError:
            return None
        return body.get("role") if status == 200 else None

    async def active(central: Deployment) -> bool:
        return await role(central) == "active"

    try:
        await a.start_central()
        await wait_for(lambda: active(a), 30, message="A never active")
        await b.start_central()
        assert await role(b) == "standby"

        await open_panel(page, a)
        await expect(page.locator("#status-role")).to_be_visible()
        await expect(page.locator("#role-text")).to_have_text("Active Central")
        await expect(page.locator("#status-role")).to_have_attribute("data-ok", "true")
        cluster = page.locator("#cluster-text")
        await expect(cluster).to_have_text(
            "1 brokers · 0 under-replicated · 2 Centrals", timeout=ms(15)
        )
        # One broker is not a cluster that survives a failure: shown as partial.
        await expect(page.locator("#status-cluster")).to_have_attribute("data-ok", "partial")

        await page.goto(b.url("/"))
        await expect(page.locator("#role")).to_contain_text("This Central is the hot standby")
        link = page.locator("#role a")
        await expect(link).to_have_text(f"127.0.0.1:{a.http_port}")
        await link.click()
        await expect(page.locator("#role-text")).to_have_text("Active Central", timeout=ms(10))
    finally:
        a.stop_all()
        b.stop_all()
