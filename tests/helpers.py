"""Small shared helpers for the test suite (imported by conftest.py and tests)."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import socket
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import pytest


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def scaled(seconds: float) -> float:
    """Scale a timeout by EV_TEST_TIMEOUT_SCALE (e.g. 3 on slow CI machines)."""
    return seconds * float(os.environ.get("EV_TEST_TIMEOUT_SCALE") or 1)


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float,
    interval: float = 0.1,
    message: str = "",
) -> Any:
    """Poll a sync or async predicate until it returns something truthy and return that.

    Raises AssertionError with `message` once the scaled timeout has passed.
    """
    loop = asyncio.get_running_loop()
    limit = scaled(timeout)
    deadline = loop.time() + limit
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(message or f"condition not met within {limit:.1f}s")
        await asyncio.sleep(interval)


# --- tests that need a tool of the machine ------------------------------------------------------

# Set by CI (.ci/run): a test that cannot run here fails instead of being skipped, so that a
# missing tool never passes for a green run.
REQUIRE_ALL = "EV_TEST_REQUIRE_ALL"


def cannot_run(reason: str) -> NoReturn:
    """Skip the test with `reason` (shown in pytest's -ra summary), or fail it under CI's
    EV_TEST_REQUIRE_ALL=1."""
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ALL}=1: every test must run)", pytrace=False)
    pytest.skip(reason)


def missing_tool(tool: str, purpose: str, package: str) -> NoReturn:
    """The test cannot run without `tool`; `package` is the Debian package that installs it."""
    cannot_run(f"{purpose} need {tool}, which is not installed (apt-get install {package})")


def need_tool(tool: str, purpose: str, package: str) -> str:
    """The path of `tool` on the PATH; without it the test is skipped (see cannot_run)."""
    path = shutil.which(tool)
    if path is None:
        missing_tool(tool, purpose, package)
    return path


def need_root(purpose: str) -> None:
    """Network namespaces and the like: without root the test is skipped (see cannot_run)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        cannot_run(f"{purpose} need root")
