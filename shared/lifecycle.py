"""Service lifecycle: SIGINT/SIGTERM ask for shutdown; errors become one clear line.

`run_service` runs the service coroutine until it returns or a signal arrives, then cancels it
and waits for its clean-up with a timeout. Exit codes: 0 clean stop, 1 anything else (2 for bad
arguments comes from argparse).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from shared.errors import EVError

log = logging.getLogger(__name__)


class Shutdown:
    """A stop request that any part of a service can wait for."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def request(self) -> None:
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> None:
        await self.event.wait()


async def _supervise(
    factory: Callable[[Shutdown], Coroutine[Any, Any, None]], grace: float
) -> None:
    shutdown = Shutdown()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, shutdown.request)
    main = asyncio.create_task(factory(shutdown), name="service")
    stopper = asyncio.create_task(shutdown.wait(), name="shutdown-wait")
    try:
        await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not main.done():
            # The service saw the shutdown event too; give it time to stop on its own.
            done, _ = await asyncio.wait({main}, timeout=grace)
            if not done:
                log.warning("service did not stop within %.0f s; cancelling", grace)
                main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main
    finally:
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopper


def run_service(
    factory: Callable[[Shutdown], Coroutine[Any, Any, None]], *, grace: float = 5.0
) -> int:
    """Run a service until it ends or is signalled; return the process exit code."""
    try:
        asyncio.run(_supervise(factory, grace))
    except KeyboardInterrupt:
        return 0
    except EVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the last boundary: one clear line, details in the log
        log.debug("unexpected error", exc_info=True)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
