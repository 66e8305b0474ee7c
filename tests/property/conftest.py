"""Fixtures of the property tests: one real deployment for the whole package.

See property_stack.py for what it runs and how each property checks that nothing changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from property_stack import (
    CONNECTED_CP,
    LOGIN_TABLES,
    SPARE_CP,
    CentralSnapshot,
    Stack,
    dashboard,
    healthy,
    name_spare_engine,
    own_broker,
    web_login,
)

from helpers import free_port, wait_for
from procs import Deployment


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("property")
    with own_broker(workdir / "kafka") as bootstrap:
        system = Deployment(bootstrap, workdir)
        driver_port, site_port = free_port(), free_port()

        async def start() -> Stack:
            await system.start_central()
            driver = dashboard(system, "EV_Driver", driver_port)
            site = dashboard(system, "EV_CP_M", site_port)
            system.start_engine(SPARE_CP)
            system.start_engine(CONNECTED_CP)
            system.start_monitor(CONNECTED_CP)
            built = Stack(system, driver, driver_port, site, site_port)
            built.admin_cookie = await asyncio.to_thread(
                web_login, system.http_port, "admin", "admin"
            )

            def connected() -> bool:
                return built.state(CONNECTED_CP) == "ACTIVADO"

            await wait_for(connected, 30, interval=0.3, message=f"{CONNECTED_CP} not ACTIVADO")
            await healthy(driver, driver_port)
            await healthy(site, site_port)
            return built

        try:
            built = asyncio.run(start())
            name_spare_engine(built)
            yield built
        finally:
            system.stop_all()


def _watched(stack: Stack, may_change: frozenset[str]) -> Iterator[CentralSnapshot]:
    before = stack.snapshot()
    yield before
    stack.assert_central_unchanged(before, may_change)
    stack.assert_all_running()
    stack.assert_no_tracebacks()


@pytest.fixture
def central_before(stack: Stack) -> Iterator[CentralSnapshot]:
    """Central's state before a test; afterwards: unchanged, nothing crashed."""
    yield from _watched(stack, frozenset())


@pytest.fixture
def central_before_logins(stack: Stack) -> Iterator[CentralSnapshot]:
    """The same for tests that send logins, which count their failures (LOGIN_TABLES)."""
    yield from _watched(stack, LOGIN_TABLES)
