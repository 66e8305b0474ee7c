"""The audit log in a running Central: console commands recorded, /api/audit, WebSocket pushes."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from helpers import scaled
from procs import REPO_ROOT, Deployment

pytestmark = [pytest.mark.kafka]


def get(url: str, cookie: str = "") -> tuple[int, Any, str]:
    """GET with an optional Cookie header: status, JSON body (or None), Set-Cookie."""
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(request, timeout=scaled(5)) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body else None, resp.headers["Set-Cookie"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null"), ""


async def admin_cookie(system: Deployment) -> str:
    """Log in as the demo admin the way the page does; return the Cookie header value."""
    async with connect(f"ws://127.0.0.1:{system.http_port}/login") as ws:
        await ws.send(json.dumps({"type": "login", "user": "admin", "password": "admin"}))
        async with asyncio.timeout(scaled(10)):
            result = json.loads(await ws.recv())
    assert result.get("ok"), result
    status, _, set_cookie = await asyncio.to_thread(
        get, system.url(f"/session?grant={result['grant']}")
    )
    assert status == 204 and set_cookie, status
    return set_cookie.split(";")[0]


async def next_audit(ws: ClientConnection, action: str) -> dict[str, Any]:
    """The next pushed audit entry with this action (other pushes skipped)."""
    async with asyncio.timeout(scaled(10)):
        while True:
            message = json.loads(await ws.recv())
            if message.get("type") == "audit" and message["entry"]["action"] == action:
                return dict(message["entry"])


async def test_console_commands_are_recorded_served_pushed_and_verified(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    system = Deployment(kafka_bootstrap, tmp_path)
    try:
        central = await system.start_central()
        cookie = await admin_cookie(system)
        async with connect(
            f"ws://127.0.0.1:{system.http_port}/ws", additional_headers={"Cookie": cookie}
        ) as ws:
            async with asyncio.timeout(scaled(10)):
                snapshot = json.loads(await ws.recv())
            assert snapshot["type"] == "snapshot"
            # The admin's own login is in the log already.
            login = next(e for e in snapshot["audit"] if e["action"] == "login")
            assert (login["actor"], login["outcome"]) == ("admin", "ok")
            assert login["source"].startswith("127.0.0.1")

            central.send("stop CP002")
            stop = await next_audit(ws, "stop")
            central.send("resume CP999")
            resume = await next_audit(ws, "resume")

        assert {k: stop[k] for k in ("actor", "source", "outcome", "detail")} == {
            "actor": "console",
            "source": "console",
            "outcome": "ok",
            "detail": "CP002: CP002",
        }
        assert resume["outcome"] == "failed" and "unknown CP 'CP999'" in resume["detail"]
        assert resume["id"] == stop["id"] + 1 and len(stop["hash"]) == 64

        status, newest, _ = await asyncio.to_thread(get, system.url("/api/audit?limit=2"), cookie)
        assert status == 200 and newest == [resume, stop]
        status, body, _ = await asyncio.to_thread(get, system.url("/api/audit?limit=0"), cookie)
        assert status == 400 and "limit" in json.dumps(body)
        status, _, _ = await asyncio.to_thread(get, system.url("/api/audit"))
        assert status == 401  # the log is for admins only
    finally:
        system.stop_all()

    # The log Central wrote verifies, key and all.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "EV_Central", "audit", "verify", "--db", str(system.db_path)),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert "(hashes, links and MACs checked)" in out.decode()
