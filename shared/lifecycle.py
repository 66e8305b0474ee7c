"""Service lifecycle: SIGINT/SIGTERM ask for shutdown; errors become one clear line.

`run_service` runs the service coroutine until it returns or a signal arrives, then cancels it
and waits for its clean-up with a timeout. Exit codes: 0 clean stop, 1 anything else (2 for bad
arguments comes from argparse).

Services run on uvloop, a libuv-based event loop that does asyncio's socket work in C, when it
is installed (it is a dependency on Linux and macOS); `EV_EVENT_LOOP=asyncio` chooses the
standard library's loop instead, `EV_EVENT_LOOP=uvloop` insists on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from shared.errors import EVError

log = logging.getLogger(__name__)

EVENT_LOOP_ENV = "EV_EVENT_LOOP"
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(environ: dict[str, str] | None = None) -> LoopFactory | None:
    """The event loop EV_EVENT_LOOP asks for: uvloop's, or None for asyncio's own."""
    choice = (os.environ if environ is None else environ).get(EVENT_LOOP_ENV, "auto").lower()
    if choice not in ("auto", "uvloop", "asyncio"):
        raise EVError(f"{EVENT_LOOP_ENV} must be auto, uvloop or asyncio, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise EVError(f"{EVENT_LOOP_ENV}=uvloop but uvloop is not installed") from None
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run(MAIN) on the event loop that EV_EVENT_LOOP chooses."""
    try:
        factory = loop_factory()
    except EVError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


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
        run_loop(_supervise(factory, grace))
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


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real failure inside a task group (cancellations are not failures)."""
    for failure in group.exceptions:
        if isinstance(failure, BaseExceptionGroup):
            return first_error(failure)
        if not isinstance(failure, asyncio.CancelledError):
            return failure
    return group
