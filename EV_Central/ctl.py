"""`python -m EV_Central ctl`: send one admin command to a running Central."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from EV_Central.admin_api import AdminCommand
from shared.settings import EnvArgumentParser, host_port


def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(prog="EV_Central ctl", description="Stop or resume CPs.")
    parser.add_option(
        "--central",
        type=host_port,
        default=host_port("127.0.0.1:8002"),
        help="Central's admin HOST:HTTP_PORT",
    )
    parser.add_option(
        "--timeout",
        type=float,
        default=10.0,
        env="EV_CTL_TIMEOUT",
        help="seconds to wait for the result",
    )
    parser.add_argument("action", choices=["stop", "resume"])
    parser.add_argument("target", help="a CP id, or 'all'")
    return parser


async def send_command(
    host: str, port: int, command: AdminCommand, wait_s: float
) -> dict[str, Any]:
    async with asyncio.timeout(wait_s):
        async with connect(f"ws://{host}:{port}/ws", open_timeout=wait_s) as ws:
            await ws.send(command.model_dump_json())
            async for raw in ws:
                reply = json.loads(raw)
                if reply.get("type") == "result" and reply.get("ref") == command.ref:
                    return dict(reply)
    raise ConnectionError("Central closed the connection without answering")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    host, port = args.central
    command = AdminCommand(action=args.action, target=args.target, ref="ctl")
    try:
        reply = asyncio.run(send_command(host, port, command, args.timeout))
    except (OSError, TimeoutError, WebSocketException) as exc:
        print(
            f"error: cannot reach Central at {host}:{port}: {exc or 'timed out'}", file=sys.stderr
        )
        return 1
    if not reply.get("ok"):
        print(f"error: {reply.get('detail')}", file=sys.stderr)
        return 1
    print(f"ok: {reply.get('detail')} ({', '.join(reply.get('cps', []))})")
    return 0
