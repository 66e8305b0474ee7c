"""Browser tests: Debian's chromium, headless, driven by Playwright (no downloaded browser)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from helpers import cannot_run, need_tool
from procs import REPO_ROOT

SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"

# The closed network refuses Chromium's background connections; these flags stop it trying.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str:
    """EV_CHROMIUM, or Debian's chromium on the PATH; without it the test is skipped."""
    path = os.environ.get("EV_CHROMIUM")
    if path is None:
        return need_tool("chromium", "browser tests", "chromium")
    if not Path(path).exists():
        cannot_run(f"browser tests need chromium, but EV_CHROMIUM={path} does not exist")
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before the test's fixtures start a broker and services that it could not use.
    if "browser" in item.fixturenames:
        chromium_path()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        instance = await p.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield instance
        finally:
            await instance.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    tab = await context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("dialog", lambda dialog: errors.append(f"dialog opened: {dialog.message}"))
    try:
        yield tab
    finally:
        await context.close()
    assert not errors, f"the page raised: {errors}"


async def screenshot(page: Page, name: str) -> Path:
    """Save a full-page screenshot under docs/screenshots/ (shown in the README)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
