"""Floods that must not starve real users (docs/security.md, "Abuse"), against real processes.

Bounded in count and time, on the loopback only: the attackers use other loopback addresses
(127.0.0.2, 127.0.0.3...), which the servers see as other machines. While idle connections
and failed authentications pour in on :5000, real CPs keep their heartbeats and a new one still
gets in, and the audit log grows by a handful of rows; while idle connections pile up on the
site dashboard, a real browser's WebSocket is still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

import procs
from helpers import free_port, scaled
from procs import Deployment
from shared.framing import encode_frame
from shared.messages import MonitorAuth, encode

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

CPS = ("CP001", "CP002", "CP003")
IDLE = 300  # connections that send nothing
CAP = 100  # --max-unauthenticated for this Central
FLOOD_S = 5.0  # seconds of failed authentications ...
FLOOD_RATE = 100  # ... this many a second


async def idle_connection(
    port: int, source: str
) -> tuple[asyncio.StreamReader, asyncio.Task[bool]]:
    """Connect from `source` and send nothing; the task says whether the server closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))

    async def closed_by_server() -> bool:
        try:
            return await reader.read(1024) == b""
        except ConnectionError:
            return True
        finally:
            writer.close()

    return reader, asyncio.create_task(closed_by_server())


async def wrong_secret(port: int, source: str, answers: list[bytes]) -> None:
    """One failed authentication from `source`: a monitor with a made-up secret."""
    frame = encode_frame(encode(MonitorAuth(cp_id="CP001", secret="not-the-secret")))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        return
    try:
        writer.write(frame)
        async with asyncio.timeout(scaled(6)):
            answers.append(await reader.read())  # the ACK, the answer, then the close
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()


async def watch_states(system: Deployment, seen: set[str], stop: asyncio.Event) -> None:
    """Every state the real CPs show while the flood lasts."""
    while not stop.is_set():
        states = await system.cp_states()
        seen.update(f"{cp}={states[cp]}" for cp in CPS)
        await asyncio.sleep(0.2)


async def test_a_flood_on_5000_starves_no_real_cp_and_audits_a_few_rows(
    system: Deployment,
) -> None:
    system.central_flags["max_unauthenticated"] = CAP
    await system.start_central()
    for cp_id in CPS:
        system.start_engine(cp_id)
    for cp_id in CPS:
        system.start_monitor(cp_id)
    for cp_id in CPS:
        await system.wait_state(cp_id, "ACTIVADO", timeout=30)
    audit_rows = len(system.query("SELECT id FROM audit_log"))
    port = system.central_port
    seen: set[str] = set()
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_states(system, seen, stop))
    idle = [await idle_connection(port, "127.0.0.2") for _ in range(IDLE)]
    answers: list[bytes] = []
    started = time.monotonic()
    flood = []
    try:
        # The idle ones: beyond the cap they are refused at once, the rest closed in 5 s.
        await asyncio.sleep(1.0)
        refused_at_once = sum(task.done() and task.result() for _, task in idle)
        assert refused_at_once >= IDLE - CAP, refused_at_once
        # ~100 failed authentications a second from another address, for 5 s; meanwhile a
        # new real CP authenticates.
        system.start_engine("CP004")
        system.start_monitor("CP004")
        for n in range(int(FLOOD_S * FLOOD_RATE)):
            flood.append(asyncio.create_task(wrong_secret(port, "127.0.0.3", answers)))
            await asyncio.sleep(max(0.0, started + (n + 1) / FLOOD_RATE - time.monotonic()))
        await asyncio.gather(*flood)
        await system.wait_state("CP004", "ACTIVADO", timeout=10)
        closed = await asyncio.wait_for(asyncio.gather(*(task for _, task in idle)), scaled(10))
        assert all(closed), "an idle connection outlived the time to authenticate"
    finally:
        stop.set()
        await watcher
        for _, task in idle:
            task.cancel()
        for task in flood:
            task.cancel()
        await asyncio.gather(*(t for _, t in idle), *flood, return_exceptions=True)

    # No real CP lost its link: every state seen was ACTIVADO.
    assert seen == {f"{cp}=ACTIVADO" for cp in CPS}, seen
    # Only the first failures were answered; the address was then refused on arrival.
    refusals = [a for a in answers if b"unknown CP or wrong secret" in a]
    assert 20 <= len(refusals) < 100, len(refusals)
    # The audit log: one row for the first failure, the blocks, and no row per failure.
    rows = system.query(
        "SELECT action, outcome, source FROM audit_log WHERE id > ? ORDER BY id", audit_rows
    )
    from_attacker = [r for r in rows if r[2].startswith("127.0.0.3")]
    assert from_attacker[0][:2] == ("cp_auth", "failed"), from_attacker
    assert ("throttle", "blocked", "127.0.0.3") in from_attacker
    assert len(from_attacker) <= 8, from_attacker
    assert len(rows) <= 16, rows  # CP004's authentication and key are the rest
    assert system.central is not None
    assert "Traceback" not in system.central.output

    # What was counted but not written is summarised at the latest when Central stops.
    system.central.stop()
    summary = system.query(
        "SELECT detail FROM audit_log WHERE source = '127.0.0.3' AND detail LIKE '%summarised%'"
    )
    assert summary and int(summary[0][0].split()[0]) >= 1, summary


@contextlib.asynccontextmanager
async def site_dashboard(broker: str, workdir: Path, *flags: str) -> AsyncIterator[int]:
    port = free_port()
    proc = procs.ServiceProcess(
        "site-dashboard",
        ["-m", "EV_CP_M", "dashboard", "--broker", broker, "--http-port", str(port)]
        + ["--listen-host", "127.0.0.1", *flags],
        workdir,
    ).start()
    await procs.wait_healthy(proc, port)
    try:
        yield port
    finally:
        proc.stop()
    assert "Traceback" not in proc.output


async def test_idle_connections_cannot_crowd_out_a_real_browser_on_a_dashboard(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    share = 20
    flags = ("--max-connections-per-address", str(share))
    async with site_dashboard(kafka_bootstrap, tmp_path, *flags) as port:
        # One address opens 200 connections and sends nothing: all but its share are dropped
        # at once, and the rest when their handshake time (10 s) runs out.
        idle = [await idle_connection(port, "127.0.0.2") for _ in range(200)]
        # Another opens real WebSockets and leaves them idle: it gets its share only.
        sockets = []
        refused = 0
        for _ in range(share + 10):
            try:
                sockets.append(
                    await connect(f"ws://127.0.0.1:{port}/ws", local_addr=("127.0.0.4", 0))
                )
            except (InvalidHandshake, OSError, TimeoutError):
                refused += 1
        try:
            assert len(sockets) == share and refused == 10, (len(sockets), refused)
            await asyncio.sleep(1.0)
            assert sum(task.done() for _, task in idle) >= 200 - share
            # A real browser, elsewhere, is served at once: a snapshot, then pushes.
            started = time.monotonic()
            async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
                async with asyncio.timeout(scaled(5)):
                    assert json.loads(await ws.recv())["type"] == "snapshot"
                    assert json.loads(await ws.recv())["type"] == "site"
            assert time.monotonic() - started < scaled(3)
            closed = await asyncio.wait_for(asyncio.gather(*(task for _, task in idle)), scaled(15))
            assert all(closed), "an idle connection outlived the handshake time"
        finally:
            await asyncio.gather(*(sock.close() for sock in sockets))
            for _, task in idle:
                task.cancel()
            await asyncio.gather(*(t for _, t in idle), return_exceptions=True)
