"""Small shared helpers for the test suite (imported by conftest.py and tests)."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any


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
