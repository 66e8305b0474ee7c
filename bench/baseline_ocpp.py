"""The baseline: a charger server built the common Python way (`ocpp` over `websockets`).

`python -m bench.baseline_ocpp server --port P` runs an OCPP 1.6 central system answering
Heartbeat and MeterValues; `python -m bench.baseline_ocpp clients --url ws://... --chargers N`
runs N chargers in one process, each sending a Heartbeat every second and, for the supplying
share, MeterValues every second. The server counts what it handled and prints it on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import random
import signal
import sys
import time
import uuid
from pathlib import Path

import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call_result
from ocpp.v16.enums import Action
from websockets.typing import Subprotocol

HANDLED = {"heartbeat": 0, "meter_values": 0}
CONNECTED: list[int] = []
MEASURING = False


class BaselineChargePoint(ChargePoint):  # type: ignore[misc]
    @on(Action.heartbeat)  # type: ignore[untyped-decorator]
    async def on_heartbeat(self) -> call_result.Heartbeat:
        HANDLED["heartbeat"] += 1
        return call_result.Heartbeat(current_time=datetime.datetime.now(datetime.UTC).isoformat())

    @on(Action.meter_values)  # type: ignore[untyped-decorator]
    async def on_meter_values(
        self, connector_id: int, meter_value: list[object], **_: object
    ) -> object:
        HANDLED["meter_values"] += 1
        return call_result.MeterValues()


async def serve(port: int) -> dict[str, int]:
    async def handler(ws: websockets.ServerConnection) -> None:
        cp_id = (ws.request.path if ws.request else "/cp").strip("/")
        with contextlib.suppress(websockets.ConnectionClosed):
            await BaselineChargePoint(cp_id, ws).start()

    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with websockets.serve(
        handler,
        "127.0.0.1",
        port,
        subprotocols=[Subprotocol("ocpp1.6")],
        ping_interval=None,
        backlog=1024,
    ):
        with contextlib.suppress(asyncio.CancelledError):
            await stop
    return dict(HANDLED)


async def charger(
    url: str,
    index: int,
    supplying: bool,
    stop: asyncio.Event,
    rtts: list[float],
    limit: asyncio.Semaphore,
) -> None:
    async with limit:  # connect a few hundred at a time, as the fleet simulator does
        ws = await websockets.connect(
            f"{url}/CP{index:05d}",
            subprotocols=[Subprotocol("ocpp1.6")],
            ping_interval=None,
            open_timeout=60,
        )
    CONNECTED.append(index)
    async with ws:
        await asyncio.sleep(random.random())
        kwh = 0.0
        while not stop.is_set():
            start = time.perf_counter()
            await ws.send(json.dumps([2, uuid.uuid4().hex, "Heartbeat", {}]))
            await ws.recv()
            if MEASURING:
                rtts.append(time.perf_counter() - start)
            if supplying:
                kwh += 22 / 3600
                now = datetime.datetime.now(datetime.UTC).isoformat()
                await ws.send(
                    json.dumps(
                        [
                            2,
                            uuid.uuid4().hex,
                            "MeterValues",
                            {
                                "connectorId": 1,
                                "meterValue": [
                                    {
                                        "timestamp": now,
                                        "sampledValue": [{"value": f"{kwh * 1000:.1f}"}],
                                    }
                                ],
                            },
                        ]
                    )
                )
                await ws.recv()
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - start)))


async def clients(url: str, n: int, supplying: float, duration: float) -> dict[str, object]:
    stop = asyncio.Event()
    rtts: list[float] = []
    limit = asyncio.Semaphore(200)

    async def one(i: int) -> None:
        with contextlib.suppress(OSError, websockets.WebSocketException, TimeoutError):
            await charger(url, i, i < n * supplying, stop, rtts, limit)

    global MEASURING
    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    # Measure the steady state only, as the fleet does: connections up, a few seconds after.
    for _ in range(120):
        if len(CONNECTED) >= n:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(3)
    MEASURING = True
    print("steady", len(CONNECTED), flush=True)
    await asyncio.sleep(duration)
    MEASURING = False
    print("done", flush=True)
    stop.set()
    await asyncio.wait(tasks, timeout=10)
    for t in tasks:
        t.cancel()
    rtts.sort()
    return {
        "connected": len(CONNECTED),
        "heartbeats": len(rtts),
        "rtt_p50_ms": rtts[len(rtts) // 2] * 1000 if rtts else None,
        "rtt_p99_ms": rtts[int(len(rtts) * 0.99)] * 1000 if rtts else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baseline_ocpp")
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--stats", type=Path, required=True)
    c = sub.add_parser("clients")
    c.add_argument("--url", required=True)
    c.add_argument("--chargers", type=int, required=True)
    c.add_argument("--supplying", type=float, default=0.2)
    c.add_argument("--duration", type=float, default=30)
    c.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.mode == "server":
        a.stats.write_text(json.dumps(asyncio.run(serve(a.port))))
    else:
        result = asyncio.run(clients(a.url, a.chargers, a.supplying, a.duration))
        a.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
