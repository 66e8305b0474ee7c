"""FramedConnection over real sockets: ACKs, retries, and ending cleanly."""

from __future__ import annotations

import asyncio

import pytest

from shared.errors import ConnectionLost
from shared.framed import FramedConnection, open_framed
from shared.framing import encode_frame
from shared.messages import MONITOR_TO_CENTRAL, Heartbeat, encode


async def test_a_frame_arriving_after_our_own_close_does_not_leak_an_error() -> None:
    """Regression: the reader failed writing an ACK on a closing socket, and close() raised."""
    results: asyncio.Queue[BaseException | None] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)  # the client's frame is now buffered, unread
        writer.close()  # we close first...
        conn = FramedConnection(reader, writer, MONITOR_TO_CENTRAL, name="server")
        conn.start()  # ...then the reader finds the frame and cannot ACK it
        try:
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(conn.receive(), 5)
            await conn.close()
        except BaseException as exc:
            await results.put(exc)
        else:
            await results.put(None)

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode_frame(encode(Heartbeat(cp_id="CP001", engine_ok=True))))
        await writer.drain()
        assert await asyncio.wait_for(results.get(), 10) is None
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_send_waits_for_the_ack_and_receive_validates() -> None:
    received: asyncio.Queue[object] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with FramedConnection(reader, writer, MONITOR_TO_CENTRAL, name="server") as conn:
            await received.put(await conn.receive())

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await open_framed("127.0.0.1", port, MONITOR_TO_CENTRAL)
        await client.send(Heartbeat(cp_id="CP001", engine_ok=False, seq=7))  # returns on ACK
        message = await asyncio.wait_for(received.get(), 5)
        assert isinstance(message, Heartbeat) and message.seq == 7 and not message.engine_ok
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
