"""Framed message connections over asyncio streams (Central :5000, monitor <-> engine).

The codec lives in shared.framing; this is the thin I/O layer around it. Each received frame
is answered ACK or NACK; each sent frame waits for its ACK and is retried on NACK or silence
a bounded number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter

from shared import framing
from shared.errors import ConnectionLost, DeliveryFailed, MessageError
from shared.messages import Message, decode, encode

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_CHUNK = 4096
MAX_BAD_INPUTS = 5


class FramedConnection(Generic[T]):
    """One framed connection: `send()` waits for ACK, `receive()` yields validated messages.

    The connection owns one reader task; `close()` cancels and awaits it.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        inbound: TypeAdapter[T],
        *,
        max_frame: int = framing.DEFAULT_MAX_FRAME,
        ack_timeout: float = 1.0,
        retries: int = 3,
        name: str = "peer",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._inbound = inbound
        self._decoder = framing.FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._ack_timeout = ack_timeout
        self._retries = retries
        self.name = name
        self._inbox: asyncio.Queue[T | ConnectionLost] = asyncio.Queue(maxsize=256)
        self._acks: asyncio.Queue[bool] = asyncio.Queue()
        self._send_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.bad_inputs = 0
        self.close_reason: str | None = None
        # Optional synchronous handler for the commonest messages (Central's heartbeats):
        # it returns True when it handled the message, which then skips the inbox. Used only
        # while the inbox is empty, so messages are still handled in the order they came.
        self.fast_path: Callable[[T], bool] | None = None

    @property
    def peer(self) -> Any:
        return self._writer.get_extra_info("peername")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._read_loop(), name=f"framed-reader-{self.name}"
            )

    async def __aenter__(self) -> FramedConnection[T]:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, message: Message) -> None:
        """Send one message and wait for its ACK; raise DeliveryFailed or ConnectionLost."""
        frame = framing.encode_frame(encode(message), self._max_frame)
        async with self._send_lock:
            for attempt in range(1, self._retries + 1):
                self._drain_stale_acks()
                self._write(frame)
                with contextlib.suppress(ConnectionError):
                    await self._writer.drain()
                try:
                    acked = await asyncio.wait_for(self._acks.get(), self._ack_timeout)
                except TimeoutError:
                    acked = False
                    if self._closed:
                        raise ConnectionLost(f"{self.name}: connection closed") from None
                if acked:
                    return
                log.debug("%s: frame not acknowledged (try %d)", self.name, attempt)
            raise DeliveryFailed(f"{self.name}: no ACK after {self._retries} tries")

    async def receive(self) -> T:
        """The next valid message; raises ConnectionLost when the peer goes away."""
        item = await self._inbox.get()
        if isinstance(item, ConnectionLost):
            self._inbox.put_nowait(item)  # later callers see the same end
            raise item
        return item

    async def close(self) -> None:
        self._closed = True
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            # The reader's own ending (cancelled, or failed) is no concern of whoever closes.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    def _drain_stale_acks(self) -> None:
        while not self._acks.empty():
            self._acks.get_nowait()

    def _write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionLost(f"{self.name}: connection closed")
        self._writer.write(data)

    def _reject(self, why: str) -> None:
        self.bad_inputs += 1
        log.warning("%s: NACK (%s)", self.name, why)
        with contextlib.suppress(ConnectionLost):
            self._write(framing.NACK_BYTE)

    async def _read_loop(self) -> None:
        reason = "peer closed the connection"
        try:
            while True:
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    break
                stop = self._handle(self._decoder.feed(chunk))
                if stop:
                    reason = stop
                    break
                with contextlib.suppress(ConnectionError):
                    await self._writer.drain()
        except (ConnectionError, OSError, ConnectionLost) as exc:
            # ConnectionLost: an ACK or NACK could not be written because we closed first.
            reason = f"connection error: {exc}"
        finally:
            self._closed = True
            self.close_reason = reason
            self._put_end(ConnectionLost(f"{self.name}: {reason}"))
            self._writer.close()

    def _handle(self, events: list[framing.FrameEvent]) -> str | None:
        """React to decoded events; return a reason when the connection must close."""
        for event in events:
            if isinstance(event, framing.Frame):
                try:
                    message = decode(self._inbound, event.data, self._max_frame)
                except MessageError as exc:
                    self._reject(str(exc))
                else:
                    self._write(framing.ACK_BYTE)
                    fast = self.fast_path
                    if fast is not None and self._inbox.empty() and fast(message):
                        continue
                    if self._inbox.full():
                        return "peer is sending faster than it is read"
                    self._inbox.put_nowait(message)
            elif isinstance(event, framing.Ack):
                self._acks.put_nowait(True)
            elif isinstance(event, framing.Nack):
                self._acks.put_nowait(False)
            elif isinstance(event, framing.BadFrame):
                self._reject(event.reason)
            elif isinstance(event, framing.Garbage):
                self._reject(f"{event.count} stray bytes outside a frame")
            elif isinstance(event, framing.Oversized):
                self._reject(f"frame larger than {self._max_frame} bytes")
                return f"oversized frame ({event.size} bytes so far)"
            if self.bad_inputs >= MAX_BAD_INPUTS:
                return f"{self.bad_inputs} bad inputs"
        return None

    def _put_end(self, end: ConnectionLost) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait(end)
        if self._inbox.full():
            # Make room so receive() always learns that the connection ended.
            with contextlib.suppress(asyncio.QueueEmpty):
                self._inbox.get_nowait()
            self._inbox.put_nowait(end)


async def open_framed(
    host: str,
    port: int,
    inbound: TypeAdapter[T],
    *,
    connect_timeout: float = 3.0,
    ssl_context: ssl.SSLContext | None = None,
    **kwargs: Any,
) -> FramedConnection[T]:
    """Connect to HOST:PORT and return a started FramedConnection.

    With `ssl_context` the connection is TLS, verified as the context says against HOST; the
    handshake counts within `connect_timeout`.
    """
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ssl_context), connect_timeout
    )
    connection: FramedConnection[T] = FramedConnection(reader, writer, inbound, **kwargs)
    connection.start()
    return connection
