"""Fixtures of the property tests: one real deployment for the whole package.

See property_stack.py for what it runs and how each property checks that nothing changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from property_stack import (
    CONNECTED_CP,
    SPARE_CP,
    CentralSnapshot,
    Stack,
    healthy,
    name_spare_engine,
    own_broker,
    site_dashboard,
)

from helpers import free_port
from procs import Deployment


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("property")
    with own_broker(workdir / "kafka") as bootstrap:
        system = Deployment(bootstrap, workdir)
        site_port = free_port()

        async def start() -> Stack:
            await system.start_central()
            site = site_dashboard(system, site_port)
            system.start_engine(SPARE_CP)
            await system.start_cp(CONNECTED_CP)
            driver = await system.start_dashboard()
            await healthy(site, site_port)
            return Stack(
                system,
                driver,
                system.dashboard_port,
                site,
                site_port,
                admin_cookie=await system.admin_cookie(),
            )

        try:
            built = asyncio.run(start())
            name_spare_engine(built)
            yield built
        finally:
            system.stop_all()


@pytest.fixture
def central_before(stack: Stack, request: pytest.FixtureRequest) -> Iterator[CentralSnapshot]:
    """Central's state before a test; afterwards: unchanged, nothing crashed. Tables a test
    changes on purpose (its `may_change` mark) are left out."""
    before = stack.snapshot(getattr(request.function, "may_change", frozenset()))
    yield before
    stack.assert_central_unchanged(before)
    stack.assert_all_running()
    stack.assert_no_tracebacks()
