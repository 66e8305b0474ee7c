"""Reading commands from standard input, a line at a time, without blocking the loop."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator

MAX_LINE = 1024


async def stdin_lines() -> AsyncIterator[str]:
    """Yield stripped lines from stdin (terminal, pipe or file) until end of input."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0:
        return
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd)):
        # Files and /dev/null cannot be watched by the event loop; they are local and small.
        text = await asyncio.to_thread(sys.stdin.read, 1_000_000)
        for line in text.splitlines():
            yield line.strip()[:MAX_LINE]
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE * 4)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb", buffering=0)
    )
    try:
        while True:
            try:
                raw = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # an over-long line is dropped, not fatal
            if not raw:
                return
            yield raw.decode("utf-8", "replace").strip()[:MAX_LINE]
    finally:
        transport.close()
