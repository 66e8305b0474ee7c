"""The driver dashboard's WebSocket and HTTP edge, with a raw `websockets` client.

The dashboard runs in this process against a real broker; no Central runs, so nothing can
log in: everything here is what the server refuses, and that it stays up doing so.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from EV_Driver.dashboard import DriverDashboard
from EV_Driver.dashboard_config import DashboardSettings
from helpers import scaled, wait_for
from shared.lifecycle import Shutdown
from shared.web import CSP

pytestmark = [pytest.mark.kafka]


class Running:
    def __init__(self, dashboard: DriverDashboard) -> None:
        self.dashboard = dashboard

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.dashboard.port}"

    def ws(self) -> Any:
        return connect(f"ws://{self.base}/ws", max_size=None)

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.base}{path}", timeout=5) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
async def running(kafka_bootstrap: str) -> AsyncIterator[Running]:
    settings = DashboardSettings(
        broker=kafka_bootstrap, http_port=0, listen_host="127.0.0.1", reply_timeout=1.0
    )
    dashboard = DriverDashboard(settings)
    shutdown = Shutdown()
    task = asyncio.create_task(dashboard.run(shutdown))
    await wait_for(lambda: dashboard.ready or task.done(), 60, message="dashboard not ready")
    assert not task.done(), task
    try:
        yield Running(dashboard)
    finally:
        shutdown.request()
        async with asyncio.timeout(scaled(15)):
            await task


async def reply(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(scaled(10)):
        message = await ws.recv()
    assert isinstance(message, str)
    data: dict[str, Any] = json.loads(message)
    return data


async def expect_error(ws: ClientConnection, sent: str | bytes, fragment: str) -> None:
    await ws.send(sent)
    answer = await reply(ws)
    assert answer["type"] == "error", answer
    assert fragment in answer["detail"], answer


@pytest.mark.parametrize(
    "command",
    [
        {"type": "request", "cp_id": "CP001"},
        {"type": "stop"},
        {"type": "run_file", "name": "f.txt", "text": "CP001\n"},
        {"type": "cancel_run"},
        {"type": "refresh"},
        {"type": "logout"},
    ],
)
async def test_commands_before_login_are_refused(running: Running, command: dict[str, Any]) -> None:
    async with running.ws() as ws:
        await expect_error(ws, json.dumps(command), "log in first")
    assert running.dashboard.rooms == {}


async def test_invalid_messages_get_an_error_and_change_nothing(running: Running) -> None:
    async with running.ws() as ws:
        await expect_error(ws, "{not json", "invalid")
        await expect_error(ws, json.dumps({"type": "launch_rockets"}), "type")
        await expect_error(ws, json.dumps({"cp_id": "CP001"}), "type")
        await expect_error(ws, json.dumps(["login"]), "invalid")
        await expect_error(
            ws,
            json.dumps({"type": "login", "driver_id": "user1", "password": "x", "admin": True}),
            "admin",
        )
        await expect_error(
            ws, json.dumps({"type": "login", "driver_id": "../etc", "password": "x"}), "driver_id"
        )
        await expect_error(
            ws, json.dumps({"type": "login", "driver_id": "u" * 33, "password": "x"}), "driver_id"
        )
        await expect_error(
            ws, json.dumps({"type": "login", "driver_id": "user1", "password": ""}), "password"
        )
        await expect_error(ws, json.dumps({"type": "request", "cp_id": "<img src=x>"}), "cp_id")
        await expect_error(ws, b'{"type":"stop"}', "binary")
        # Still the same, working connection.
        await expect_error(ws, json.dumps({"type": "stop"}), "log in first")
    assert running.dashboard.rooms == {}


async def test_login_without_central_says_so(running: Running) -> None:
    async with running.ws() as ws:
        await ws.send(json.dumps({"type": "login", "driver_id": "user1", "password": "pass1"}))
        answer = await reply(ws)
        assert answer == {
            "type": "login_result",
            "ok": False,
            "reason": "Central did not answer; is it running?",
        }
        await expect_error(ws, json.dumps({"type": "stop"}), "log in first")
    assert running.dashboard.rooms == {}


async def test_oversized_message_closes_only_that_connection(running: Running) -> None:
    async with running.ws() as bystander:
        async with running.ws() as ws:
            await ws.send(json.dumps({"type": "run_file", "name": "big", "text": "C" * 70_000}))
            with pytest.raises(ConnectionClosed) as closed:
                await reply(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await expect_error(bystander, json.dumps({"type": "refresh"}), "log in first")
    status, _, body = await asyncio.to_thread(running.get, "/healthz")
    assert status == 200, body
    assert json.loads(body)["broker"] is True


async def test_pages_carry_the_csp_and_unknown_paths_are_404(running: Running) -> None:
    status, headers, body = await asyncio.to_thread(running.get, "/")
    assert status == 200
    assert headers["Content-Security-Policy"] == CSP
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b'id="login-form"' in body and b'id="reconnecting"' in body
    assert b"<script>" not in body and b"style=" not in body
    for name in ("driver.js", "driver.css", "ev.js", "ev.css"):
        status, headers, _ = await asyncio.to_thread(running.get, f"/static/{name}")
        assert status == 200, name
        assert "Content-Security-Policy" in headers
    for path in ("/static/../dashboard.py", "/static/.hidden.js", "/nope", "/static/x.py"):
        status, _, _ = await asyncio.to_thread(running.get, path)
        assert status == 404, path
