"""FramedConnection over real sockets: ACKs, retries, and ending cleanly."""

from __future__ import annotations

import asyncio

import pytest

from shared.errors import ConnectionLost, DeliveryFailed
from shared.framed import FramedConnection, open_framed, serve_framed
from shared.framing import ACK_BYTE, NACK_BYTE, encode_frame
from shared.messages import MONITOR_TO_CENTRAL, Heartbeat, MonitorToCentral, encode


async def test_closing_while_frames_arrive_ends_receive_and_does_not_raise() -> None:
    """Regression: answering a frame on a closing socket raised out of close()."""
    results: asyncio.Queue[BaseException | None] = asyncio.Queue()

    async def handler(conn: FramedConnection[MonitorToCentral]) -> None:
        await asyncio.sleep(0.3)  # the client's frames are now in, acknowledged
        try:
            await conn.close()  # we close first...
            with pytest.raises(ConnectionLost):
                while True:  # ...and receive() ends after what had arrived
                    await asyncio.wait_for(conn.receive(), 5)
            await conn.close()  # closing twice is harmless
        except BaseException as exc:
            await results.put(exc)
        else:
            await results.put(None)

    server = await serve_framed(handler, "127.0.0.1", 0, MONITOR_TO_CENTRAL, name="server")
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        frame = encode_frame(encode(Heartbeat(cp_id="CP001", engine_ok=True)))
        writer.write(frame)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(1), 5) == ACK_BYTE
        assert await asyncio.wait_for(results.get(), 10) is None
        with pytest.raises((ConnectionError, OSError)):
            for _ in range(20):  # the server has closed: writing soon fails
                writer.write(frame)
                await writer.drain()
                await asyncio.sleep(0.05)
        writer.close()
    finally:
        await server.close()


async def test_send_waits_for_the_ack_and_receive_validates() -> None:
    received: asyncio.Queue[object] = asyncio.Queue()

    async def handler(conn: FramedConnection[MonitorToCentral]) -> None:
        await received.put(await conn.receive())

    server = await serve_framed(handler, "127.0.0.1", 0, MONITOR_TO_CENTRAL, name="server")
    port = server.sockets[0].getsockname()[1]
    try:
        client = await open_framed("127.0.0.1", port, MONITOR_TO_CENTRAL)
        await client.send(Heartbeat(cp_id="CP001", engine_ok=False, seq=7))  # returns on ACK
        message = await asyncio.wait_for(received.get(), 5)
        assert isinstance(message, Heartbeat) and message.seq == 7 and not message.engine_ok
        await client.close()
    finally:
        await server.close()


async def test_a_nack_is_retried_and_silence_fails_the_send() -> None:
    """The sender repeats a frame answered NACK, and gives up after its tries of silence."""
    frames: asyncio.Queue[bytes] = asyncio.Queue()
    answers = [NACK_BYTE, ACK_BYTE]

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.readuntil(b"\x03") + await reader.readexactly(1)
            await frames.put(data)
            if answers:
                writer.write(answers.pop(0))
                await writer.drain()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await open_framed(
            "127.0.0.1", port, MONITOR_TO_CENTRAL, ack_timeout=0.2, retries=3
        )
        await client.send(Heartbeat(cp_id="CP001", engine_ok=True, seq=1))
        first, second = await frames.get(), await frames.get()
        assert first == second  # sent again after the NACK, then acknowledged
        with pytest.raises(DeliveryFailed):
            await client.send(Heartbeat(cp_id="CP001", engine_ok=True, seq=2))  # no answers
        assert frames.qsize() == 3  # three tries of the unanswered frame
        await client.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_sender_waiting_for_its_ack_learns_at_once_that_the_peer_went_away() -> None:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\x03")
        writer.close()  # takes the frame, never answers, hangs up

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await open_framed("127.0.0.1", port, MONITOR_TO_CENTRAL, ack_timeout=5)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ConnectionLost):
            await client.send(Heartbeat(cp_id="CP001", engine_ok=True))
        assert asyncio.get_running_loop().time() - started < 2  # not the 3 x 5 s of tries
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
