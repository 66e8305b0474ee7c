"""Framed message connections (Central :5000, monitor <-> engine), as asyncio protocols.

The codec lives in shared.framing; this is the thin I/O layer around it. Each received frame
is answered ACK or NACK; each sent frame waits for its ACK and is retried on NACK or silence
a bounded number of times.

A connection is an `asyncio.Protocol`: the event loop hands it the bytes as they arrive and it
decodes, acknowledges and queues them in that call, with no reader task and no stream buffer
in between. Central serves ten thousand monitors this way (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

from pydantic import TypeAdapter

from shared import framing
from shared.errors import ConnectionLost, DeliveryFailed, MessageError
from shared.messages import Message, decode, encode

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BAD_INPUTS = 5
CLOSE_TIMEOUT = 1.0  # a peer that does not take our last bytes is cut off after this long


class FramedConnection(asyncio.Protocol, Generic[T]):
    """One framed connection: `send()` waits for ACK, `receive()` yields validated messages.

    Made by `open_framed()` (client) or `serve_framed()` (server); `close()` ends it.
    """

    def __init__(
        self,
        inbound: TypeAdapter[T],
        *,
        max_frame: int = framing.DEFAULT_MAX_FRAME,
        ack_timeout: float = 1.0,
        retries: int = 3,
        name: str = "peer",
    ) -> None:
        self._inbound = inbound
        self._decoder = framing.FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._ack_timeout = ack_timeout
        self._retries = retries
        self.name = name
        self._transport: asyncio.Transport | None = None
        self._inbox: asyncio.Queue[T | ConnectionLost] = asyncio.Queue(maxsize=256)
        self._acks: asyncio.Queue[bool] = asyncio.Queue()
        self._send_lock = asyncio.Lock()
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writable: asyncio.Future[None] | None = None  # set while the peer is not reading
        self._closed = False
        self.bad_inputs = 0
        self.close_reason: str | None = None
        # Optional synchronous handler for the commonest messages (Central's heartbeats):
        # it returns True when it handled the message, which then skips the inbox. Used only
        # while the inbox is empty, so messages are still handled in the order they came.
        self.fast_path: Callable[[T], bool] | None = None
        # Called once the connection is up (after the TLS handshake, when there is one).
        self.on_made: Callable[[FramedConnection[T]], None] | None = None

    @property
    def peer(self) -> Any:
        return None if self._transport is None else self._transport.get_extra_info("peername")

    async def send(self, message: Message) -> None:
        """Send one message and wait for its ACK; raise DeliveryFailed or ConnectionLost."""
        frame = framing.encode_frame(encode(message), self._max_frame)
        async with self._send_lock:
            for attempt in range(1, self._retries + 1):
                self._drain_stale_acks()
                self._write(frame)
                await self._drain()
                try:
                    acked = await asyncio.wait_for(self._acks.get(), self._ack_timeout)
                except TimeoutError:
                    acked = False
                if acked:
                    return
                if self._closed:
                    raise ConnectionLost(f"{self.name}: connection closed")
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
        """Close (what is written still goes out) and wait until the connection has ended."""
        self._closed = True
        transport = self._transport
        if transport is None:
            return
        if self.close_reason is None:
            self.close_reason = "closed by us"
        transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._ended), CLOSE_TIMEOUT)
        except TimeoutError:
            transport.abort()  # the peer does not read what is left: drop it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._ended), CLOSE_TIMEOUT)

    def abort(self) -> None:
        """Drop the connection at once, without sending what is left."""
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    async def __aenter__(self) -> FramedConnection[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            stop = self._handle(self._decoder.feed(data))
        except ConnectionLost:
            stop = "connection closed while answering"
        if stop:
            self.close_reason = stop
            self._closed = True
            assert self._transport is not None
            self._transport.close()

    def eof_received(self) -> bool | None:
        return False  # the peer is done sending: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self.close_reason is None:
            self.close_reason = (
                f"connection error: {exc}" if exc is not None else "peer closed the connection"
            )
        self._put_end(ConnectionLost(f"{self.name}: {self.close_reason}"))
        self._acks.put_nowait(False)  # a sender waiting for its ACK learns at once
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)
        if not self._ended.done():
            self._ended.set_result(None)

    def pause_writing(self) -> None:
        # The peer does not read our ACKs and frames: stop reading its input until it does.
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    # --- inside -------------------------------------------------------------------------------

    async def _drain(self) -> None:
        if self._writable is not None:
            await asyncio.shield(self._writable)

    def _drain_stale_acks(self) -> None:
        while not self._acks.empty():
            self._acks.get_nowait()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionLost(f"{self.name}: connection closed")
        transport.write(data)

    def _reject(self, why: str) -> None:
        self.bad_inputs += 1
        log.warning("%s: NACK (%s)", self.name, why)
        with contextlib.suppress(ConnectionLost):
            self._write(framing.NACK_BYTE)

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
    """Connect to HOST:PORT and return a FramedConnection.

    With `ssl_context` the connection is TLS, verified as the context says against HOST; the
    handshake counts within `connect_timeout`.
    """
    loop = asyncio.get_running_loop()
    _, connection = await asyncio.wait_for(
        loop.create_connection(
            lambda: FramedConnection(inbound, **kwargs), host, port, ssl=ssl_context
        ),
        connect_timeout,
    )
    return connection


class FramedServer(Generic[T]):
    """A listening socket whose connections are FramedConnections, each served by a handler.

    The handler runs in its own task and owns its connection: the connection is closed when
    the handler returns. `close()` stops listening, cancels the handlers and waits for them.
    """

    def __init__(
        self,
        handler: Callable[[FramedConnection[T]], Awaitable[None]],
        inbound: TypeAdapter[T],
        name: str,
        admit: Callable[[FramedConnection[T]], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        self._handler = handler
        self._admit = admit
        self._inbound = inbound
        self._name = name
        self._kwargs = kwargs
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def sockets(self) -> tuple[Any, ...]:
        return () if self._server is None else tuple(self._server.sockets)

    async def listen(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
    ) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            self._connection,
            host,
            port,
            ssl=ssl_context,
            ssl_handshake_timeout=ssl_handshake_timeout if ssl_context else None,
        )

    def _connection(self) -> FramedConnection[T]:
        conn: FramedConnection[T] = FramedConnection(self._inbound, name=self._name, **self._kwargs)
        conn.on_made = self._start
        return conn

    def _start(self, conn: FramedConnection[T]) -> None:
        conn.name = f"{self._name} {conn.peer}"
        if self._admit is not None and not self._admit(conn):
            # Refused on arrival (too many from its address, or a blocked one): nothing read.
            conn.close_reason = "refused on arrival"
            conn.abort()
            return
        task = asyncio.get_running_loop().create_task(self._serve(conn), name=conn.name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: FramedConnection[T]) -> None:
        try:
            await self._handler(conn)
        except asyncio.CancelledError:
            if not self._closing:
                raise
        except Exception:  # a connection boundary: log it, keep serving the others
            log.exception("%s: connection handler failed", conn.name)
        finally:
            await conn.close()

    async def close(self) -> None:
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()


async def serve_framed(
    handler: Callable[[FramedConnection[T]], Awaitable[None]],
    host: str,
    port: int,
    inbound: TypeAdapter[T],
    *,
    name: str = "peer",
    ssl_context: ssl.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    admit: Callable[[FramedConnection[T]], bool] | None = None,
    **kwargs: Any,
) -> FramedServer[T]:
    """Listen on HOST:PORT; run `handler(connection)` for each framed connection that comes
    and that `admit` (when given) lets in: one it refuses is dropped on arrival."""
    server: FramedServer[T] = FramedServer(handler, inbound, name, admit, **kwargs)
    await server.listen(host, port, ssl_context, ssl_handshake_timeout)
    return server
