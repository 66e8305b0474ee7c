"""The driver dashboard's WebSocket and HTTP edge, with a raw `websockets` client.

The dashboard runs in this process against a real broker; no Central runs, so nothing can
log in: everything here is what the server refuses, and that it stays up doing so. (Logged-in
browsers are tested against a real Central in test_web_auth.py.)
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

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

    def ws(self, cookie: str | None = None, origin: str | None = None) -> Any:
        headers = {"Cookie": cookie} if cookie else {}
        return connect(
            f"ws://{self.base}/ws",
            max_size=None,
            additional_headers=headers,
            origin=origin,  # type: ignore[arg-type]
        )

    def login(self, origin: str | None = None) -> Any:
        return connect(f"ws://{self.base}/login", max_size=None, origin=origin)  # type: ignore[arg-type]

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


async def login_answer(running: Running, raw: str | bytes) -> dict[str, Any]:
    """What /login answers to one message."""
    async with running.login() as ws:
        await ws.send(raw)
        return await reply(ws)


async def test_the_websocket_needs_a_session_and_an_allowed_origin(running: Running) -> None:
    for cookie, origin, status in [
        (None, None, 401),
        ("ev_driver_session=never-issued-by-this-dashboard-000", None, 401),
        ("ev_driver_session=", None, 401),
        (None, "http://evil.example", 403),
        (None, "null", 403),
    ]:
        with pytest.raises(InvalidStatus) as refused:
            async with running.ws(cookie, origin):
                pass
        assert refused.value.response.status_code == status, (cookie, origin)
    with pytest.raises(InvalidStatus) as refused:
        async with running.login(origin="http://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    status, _, body = await asyncio.to_thread(running.get, "/api/whoami")
    assert status == 401 and json.loads(body) == {"error": "log in first"}
    assert running.dashboard.rooms == {} and len(running.dashboard.web_sessions) == 0


async def test_invalid_logins_get_a_reason_and_change_nothing(running: Running) -> None:
    for raw, fragment in [
        ("{not json", "invalid message"),
        (json.dumps(["login"]), "invalid message"),
        (json.dumps({"type": "launch_rockets"}), "type"),
        (json.dumps({"type": "login", "user": "user1", "password": "x", "admin": True}), "admin"),
        (json.dumps({"type": "login", "user": "../etc", "password": "x"}), "user"),
        (json.dumps({"type": "login", "user": "u" * 33, "password": "x"}), "user"),
        (json.dumps({"type": "login", "user": "user1", "password": ""}), "password"),
        (json.dumps({"type": "login", "driver_id": "user1", "password": "x"}), "user"),
    ]:
        answer = await login_answer(running, raw)
        assert answer["type"] == "login_result" and answer["ok"] is False, (raw, answer)
        assert fragment in answer["reason"] and "grant" not in answer, (raw, answer)
    assert running.dashboard.rooms == {} and len(running.dashboard.web_sessions) == 0


async def test_login_without_central_says_so(running: Running) -> None:
    answer = await login_answer(
        running, json.dumps({"type": "login", "user": "user1", "password": "pass1"})
    )
    assert answer == {
        "type": "login_result",
        "ok": False,
        "reason": "Central did not answer; is it running?",
    }
    assert running.dashboard.rooms == {} and len(running.dashboard.web_sessions) == 0


async def test_grants_and_logout_without_a_session(running: Running) -> None:
    for grant in ("", "x" * 40, "../../etc/passwd"):
        status, headers, _ = await asyncio.to_thread(running.get, f"/session?grant={grant}")
        assert status == 400 and "Set-Cookie" not in headers, grant
    status, headers, _ = await asyncio.to_thread(running.get, "/logout")
    assert status == 204
    assert headers["Set-Cookie"].startswith("ev_driver_session=;")
    assert "Max-Age=0" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]


async def test_oversized_message_closes_only_that_connection(running: Running) -> None:
    async with running.login() as bystander:
        async with running.login() as ws:
            await ws.send(json.dumps({"type": "login", "user": "u", "password": "C" * 70_000}))
            with pytest.raises(ConnectionClosed) as closed:
                await reply(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await bystander.send("{}")
        answer = await reply(bystander)
        assert answer["ok"] is False and "type" in answer["reason"]
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
    for name in ("driver.js", "driver.css", "ev.js", "ev.auth.js", "ev.css"):
        status, headers, _ = await asyncio.to_thread(running.get, f"/static/{name}")
        assert status == 200, name
        assert "Content-Security-Policy" in headers
    for path in ("/static/../dashboard.py", "/static/.hidden.js", "/nope", "/static/x.py"):
        status, _, _ = await asyncio.to_thread(running.get, path)
        assert status == 404, path
