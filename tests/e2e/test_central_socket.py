"""Bad input on Central's :5000 socket gets NACK or a rejection and harms nobody else."""

from __future__ import annotations

import asyncio

import pytest

from helpers import scaled
from procs import Deployment
from shared.framed import open_framed
from shared.framing import ACK, NACK, encode_frame, lrc
from shared.messages import CENTRAL_TO_MONITOR, AuthResult, Heartbeat, MonitorAuth, encode

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]


async def read_some(reader: asyncio.StreamReader, wait: float = 3.0) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(4096), scaled(wait))
    except TimeoutError:
        return b""


async def test_bad_input_is_refused_and_others_keep_being_served(system: Deployment) -> None:
    await system.start_central()
    port = system.central_port
    # A well-behaved monitor for CP002, kept alive with heartbeats throughout.
    good = await open_framed("127.0.0.1", port, CENTRAL_TO_MONITOR)
    await good.send(MonitorAuth(cp_id="CP002", secret=system.secret("CP002")))
    reply = await good.receive()
    assert isinstance(reply, AuthResult) and reply.accepted
    stop = asyncio.Event()

    async def heartbeats() -> None:
        seq = 0
        while not stop.is_set():
            await good.send(Heartbeat(cp_id="CP002", engine_ok=True, seq=seq))
            seq += 1
            await asyncio.sleep(0.5)

    beating = asyncio.create_task(heartbeats())
    try:
        await system.wait_state("CP002", "ACTIVADO")

        # 1. Garbage bytes: NACK.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello, is anybody there?\r\n")
        await writer.drain()
        assert NACK in await read_some(reader)
        writer.close()

        # 2. A frame with a bad LRC: NACK; the same frame with the right LRC: ACK.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = encode(MonitorAuth(cp_id="CP003", secret=system.secret("CP003")))
        writer.write(b"\x02" + data + b"\x03" + bytes([lrc(data) ^ 0xFF]))
        await writer.drain()
        assert await read_some(reader) == bytes([NACK])
        writer.write(encode_frame(data))
        await writer.drain()
        answer = await read_some(reader)
        while answer and b"\x03" not in answer:
            answer += await read_some(reader)
        assert answer[:1] == bytes([ACK]) and b'"accepted":true' in answer
        writer.close()

        # 3. A 10 MB frame: the server closes the connection long before 10 MB are read
        # (a NACK first, which the reset of the unread data may overtake).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x02" + b"x" * (10 * 1024 * 1024) + b"\x03\x00")
        closed = False
        try:
            await asyncio.wait_for(writer.drain(), scaled(10))
            rest = await read_some(reader, 5)
            assert rest in (b"", bytes([NACK]))
            closed = rest == b"" or await read_some(reader, 5) == b""
        except ConnectionError:
            closed = True
        assert closed
        writer.close()

        # 4. An unknown CP: a clear rejection.
        bad = await open_framed("127.0.0.1", port, CENTRAL_TO_MONITOR)
        await bad.send(MonitorAuth(cp_id="CP999"))
        rejection = await bad.receive()
        assert isinstance(rejection, AuthResult) and not rejection.accepted
        assert "unknown CP" in (rejection.reason or "")
        await bad.close()

        # 5. Invalid JSON in a valid frame: NACK.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode_frame(b'{"type": "auth", "cp_id": 42'))
        await writer.drain()
        assert await read_some(reader) == bytes([NACK])
        writer.close()

        # Central kept serving: the good monitor is still connected and ACTIVADO, and the
        # API answers.
        assert beating.done() is False
        assert (await system.cp_states())["CP002"] == "ACTIVADO"
        health = await system.api("/healthz")
        assert health["status"] == "ok"
    finally:
        stop.set()
        await beating
        await good.close()
    # With its monitor gone, CP002 is DESCONECTADO: the server noticed the close.
    await system.wait_state("CP002", "DESCONECTADO", timeout=5)


async def test_heartbeats_resuming_on_a_silent_connection_reconnect_the_cp(
    system: Deployment,
) -> None:
    """Regression: a connection that went silent (DESCONECTADO) and beats again is back."""
    await system.start_central()
    monitor = await open_framed("127.0.0.1", system.central_port, CENTRAL_TO_MONITOR)
    try:
        await monitor.send(MonitorAuth(cp_id="CP004", secret=system.secret("CP004")))
        assert (await monitor.receive()).accepted
        await monitor.send(Heartbeat(cp_id="CP004", engine_ok=True))
        await system.wait_state("CP004", "ACTIVADO")
        await system.wait_state("CP004", "DESCONECTADO", timeout=5)  # silence > 3 s
        await monitor.send(Heartbeat(cp_id="CP004", engine_ok=True, seq=1))
        await system.wait_state("CP004", "ACTIVADO", timeout=3)
    finally:
        await monitor.close()
