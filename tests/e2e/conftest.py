"""Fixtures for end-to-end tests: a deployment of real processes on a broker of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from procs import Deployment


@pytest.fixture
async def system(broker, tmp_path: Path) -> AsyncIterator[Deployment]:
    deployment = Deployment(broker.bootstrap, tmp_path)
    try:
        yield deployment
    finally:
        deployment.stop_all()
