"""Central's admin WebSocket and HTTP answers, with a real Central, broker and WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError

from helpers import scaled
from procs import Deployment

pytestmark = [pytest.mark.kafka]

STATES = {"ACTIVADO", "SUMINISTRANDO", "PARADO", "AVERIADO", "DESCONECTADO"}


@pytest.fixture
async def system(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[Deployment]:
    """A real Central (its own database) with CP001 connected and ACTIVADO."""
    deployment = Deployment(kafka_bootstrap, tmp_path)
    try:
        await deployment.start_central()
        await deployment.start_cp("CP001")
        yield deployment
    finally:
        deployment.stop_all()


def ws_url(system: Deployment) -> str:
    return f"ws://127.0.0.1:{system.http_port}/ws"


async def admin_ws(system: Deployment, **options: Any) -> connect:
    """The admin WebSocket, opened with a fresh admin session's cookie."""
    cookie = await system.admin_cookie()
    return connect(ws_url(system), additional_headers={"Cookie": cookie}, **options)


async def receive(ws: ClientConnection, kind: str, **match: Any) -> dict[str, Any]:
    """The next message of type `kind` whose fields equal `match` (pushes in between skipped)."""
    async with asyncio.timeout(scaled(10)):
        while True:
            message = json.loads(await ws.recv())
            if message.get("type") == kind and all(message.get(k) == v for k, v in match.items()):
                return dict(message)


async def cp_table(system: Deployment) -> dict[str, tuple[str, bool]]:
    return {cp["id"]: (cp["state"], cp["in_service"]) for cp in await system.api("/api/cps")}


async def raw_get(port: int, target: str, cookie: str = "") -> tuple[int, dict[str, str], bytes]:
    """GET `target` exactly as written (no client-side path normalisation)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        extra = f"Cookie: {cookie}\r\n" if cookie else ""
        request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n"
        writer.write(request.encode())
        async with asyncio.timeout(scaled(5)):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()
    return int(lines[0].split()[1]), headers, body


async def test_snapshot_then_pushes_for_a_command(system: Deployment) -> None:
    async with await admin_ws(system) as watcher, await admin_ws(system) as admin:
        snapshot = await receive(watcher, "snapshot")
        assert set(snapshot) >= {"cps", "events", "sessions", "drivers", "status", "colours"}
        assert len(snapshot["cps"]) == 10
        assert {cp["state"] for cp in snapshot["cps"]} <= STATES
        cp001 = next(cp for cp in snapshot["cps"] if cp["id"] == "CP001")
        assert cp001["state"] == "ACTIVADO"
        assert set(cp001) >= {"id", "location", "price_eur_kwh", "max_kw", "state"}
        assert snapshot["colours"] == {
            "ACTIVADO": "green",
            "SUMINISTRANDO": "green",
            "PARADO": "orange",
            "AVERIADO": "red",
            "DESCONECTADO": "grey",
        }
        assert {d["id"] for d in snapshot["drivers"]} >= {"user1", "user2"}
        assert snapshot["status"]["monitors_connected"] == 1
        assert any("CP001" in e["text"] for e in snapshot["events"])
        await receive(admin, "snapshot")

        await admin.send(json.dumps({"type": "command", "action": "stop", "target": "CP001"}))
        # Without a ref the result still comes back, to the sender only.
        result = await receive(admin, "result")
        assert result["ok"] is True and result["cps"] == ["CP001"], result
        # The watcher is told both, in whatever order: the new state and the event. A push of
        # CP001's earlier state may still come first (it was marked changed just before).
        seen: dict[str, dict[str, Any]] = {}
        async with asyncio.timeout(scaled(10)):
            while len(seen) < 2:
                message = json.loads(await watcher.recv())
                if (
                    message["type"] == "cps"
                    and any(cp["state"] == "PARADO" for cp in message["cps"])
                ) or (message["type"] == "event" and "stopped" in message["event"]["text"]):
                    seen[message["type"]] = message
                assert message["type"] != "result", "a result went to another client"
        assert [(cp["id"], cp["state"]) for cp in seen["cps"]["cps"]] == [("CP001", "PARADO")]
        assert seen["event"]["event"]["text"] == "stopped CP001"
        assert (await system.cp_states())["CP001"] == "PARADO"

        await admin.send(
            json.dumps({"type": "command", "action": "resume", "target": "all", "ref": "r1"})
        )
        result = await receive(admin, "result", ref="r1")
        assert result["ok"] is True and len(result["cps"]) == 10
        assert (await system.cp_states())["CP001"] == "ACTIVADO"


INVALID = [
    ("{not json", "invalid command"),
    ("[]", "invalid command"),
    (b'{"type": "command", "action": "stop", "target": "all", "ref": "\xff"}', "invalid command"),
    (json.dumps({"type": "reboot", "target": "all"}), "invalid command"),
    (json.dumps({"type": "command", "action": "explode", "target": "all"}), "action"),
    (json.dumps({"type": "command", "action": "stop"}), "target"),
    (json.dumps({"type": "command", "action": "stop", "target": "all", "x": 1}), "x"),
    (json.dumps({"type": "command", "action": "stop", "target": "../CP001"}), "target"),
    (json.dumps({"type": "command", "action": "stop", "target": "all", "ref": "r" * 65}), "ref"),
    (
        json.dumps({"type": "register_cp", "id": "CP020", "location": "x", "price_eur_kwh": -1}),
        "invalid command",
    ),
]


async def test_invalid_commands_are_refused_and_change_nothing(system: Deployment) -> None:
    before = await cp_table(system)
    async with await admin_ws(system) as ws:
        await receive(ws, "snapshot")
        for raw, detail in INVALID:
            await ws.send(raw)
            result = await receive(ws, "result")
            assert result["ok"] is False, (raw, result)
            assert "invalid command" in result["detail"], (raw, result)
            assert detail in result["detail"], (raw, result)
        # An unknown CP is refused by Central itself, and the connection is still usable.
        await ws.send(json.dumps({"type": "command", "action": "stop", "target": "CP404"}))
        unknown = await receive(ws, "result")
        assert unknown["ok"] is False and "unknown CP" in unknown["detail"], unknown
    assert await cp_table(system) == before
    assert (await system.cp_states())["CP001"] == "ACTIVADO"


async def test_a_message_over_the_size_limit_closes_with_1009(system: Deployment) -> None:
    before = await cp_table(system)
    # A valid "stop all", padded past the 4 KB limit: it must not be executed.
    padded = json.dumps({"type": "command", "action": "stop", "target": "all", "ref": "x" * 10_000})
    async with await admin_ws(system, max_size=None) as ws:
        await receive(ws, "snapshot")
        await ws.send(padded)
        with pytest.raises(ConnectionClosedError) as closed:
            async with asyncio.timeout(scaled(10)):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert await cp_table(system) == before
    # Central goes on serving other clients.
    async with await admin_ws(system) as ws:
        await receive(ws, "snapshot")


async def test_register_cp_and_refuse_an_existing_id(system: Deployment) -> None:
    async with await admin_ws(system) as ws:
        await receive(ws, "snapshot")
        register = {
            "type": "register_cp",
            "id": "CP011",
            "location": "Alicante <b>Puerto</b>",
            "price_eur_kwh": 0.4,
            "max_kw": 22,
            "ref": "new",
        }
        await ws.send(json.dumps(register))
        result = await receive(ws, "result", ref="new")
        assert result["ok"] is True and result["cps"] == ["CP011"], result
        assert isinstance(result["secret"], str) and len(result["secret"]) >= 24, result
        cps = {cp["id"]: cp for cp in await system.api("/api/cps")}
        assert cps["CP011"]["state"] == "DESCONECTADO"
        assert cps["CP011"]["location"] == "Alicante <b>Puerto</b>"

        before = await cp_table(system)
        await ws.send(json.dumps({**register, "id": "CP001", "location": "elsewhere"}))
        again = await receive(ws, "result", ref="new")
        assert again["ok"] is False and "already registered" in again["detail"], again
        assert await cp_table(system) == before
        cp001 = next(cp for cp in await system.api("/api/cps") if cp["id"] == "CP001")
        assert cp001["location"] != "elsewhere"


async def test_key_commands_issue_a_secret_once_and_are_audited(system: Deployment) -> None:
    async with await admin_ws(system) as ws, await admin_ws(system) as watcher:
        await receive(ws, "snapshot")
        await receive(watcher, "snapshot")
        await ws.send(json.dumps({"type": "reset_secret", "target": "CP001", "ref": "reset"}))
        result = await receive(ws, "result", ref="reset")
        assert result["ok"] is True and result["cps"] == ["CP001"], result
        secret = result["secret"]
        assert len(secret) >= 24 and secret != system.secret("CP001")
        for target in ("CP404", "all"):
            await ws.send(json.dumps({"type": "revoke_key", "target": target, "ref": "bad"}))
            refused = await receive(ws, "result", ref="bad")
            assert refused["ok"] is False and "unknown CP" in refused["detail"], refused
        await ws.send(json.dumps({"type": "revoke_key", "target": "CP001", "ref": "revoke"}))
        revoked = await receive(ws, "result", ref="revoke")
        assert revoked["ok"] is True and "secret" not in revoked, revoked
        # Another admin's panel hears of the change, never of the secret.
        heard = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(scaled(1)):
                while True:
                    heard.append(await watcher.recv())
        assert heard and not any(secret in str(m) for m in heard)
    audit = system.query("SELECT action, outcome, actor, detail FROM audit_log ORDER BY id")
    assert ("secret_reset", "ok", "admin", "CP001") in audit, audit
    assert ("key_revoked", "failed", "admin", "CP404: unknown CP 'CP404'") in audit, audit
    assert not any(secret in row[3] for row in audit)

    # The old secret no longer lets CP001's monitor in; the new one does (the CP's engine and
    # monitor both get it: the engine checks its monitor with it).
    await system.wait_state("CP001", "DESCONECTADO", timeout=15)
    system.monitors["CP001"].stop()
    system.engines["CP001"].stop()
    system.cp_secrets["CP001"] = secret
    system.start_engine("CP001")
    system.start_monitor("CP001")
    # Two processes start again and connect to Kafka and Central: allow a busy machine time.
    await system.wait_state("CP001", "ACTIVADO", timeout=30)


async def test_http_answers_carry_the_content_security_policy(system: Deployment) -> None:
    cookie = await system.admin_cookie()
    for path in ("/", "/index.html", "/static/admin.js", "/static/ev.css", "/api/cps", "/healthz"):
        status, headers, body = await raw_get(system.http_port, path, cookie)
        assert status == 200, (path, body[:200])
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp, (path, csp)
        assert "unsafe-inline" not in csp
        assert headers["x-content-type-options"] == "nosniff"


async def test_the_page_needs_nothing_the_policy_forbids(system: Deployment) -> None:
    status, headers, body = await raw_get(system.http_port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    for asset, kind in [
        ("/static/ev.js", "text/javascript"),
        ("/static/ev.auth.js", "text/javascript"),
        ("/static/admin.js", "text/javascript"),
        ("/static/ev.css", "text/css"),
        ("/static/admin.css", "text/css"),
    ]:
        assert f'"{asset}"' in page, asset
        status, headers, _ = await raw_get(system.http_port, asset)
        assert status == 200 and headers["content-type"].startswith(kind), asset
    # No inline script, style or handler, and nothing from another site.
    assert page.count("<script") == page.count("<script src=")
    assert "<style" not in page and "style=" not in page
    assert not re.search(r"\son[a-z]+\s*=", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    for name in ("admin.js", "ev.js", "ev.auth.js"):
        script = (await raw_get(system.http_port, f"/static/{name}"))[2].decode()
        assert "innerHTML" not in script and "insertAdjacentHTML" not in script, name


async def test_paths_outside_the_static_files_are_404(system: Deployment) -> None:
    cookie = await system.admin_cookie()  # /api/... answers 401 before 404 without one
    for path in [
        "/static/../web.py",
        "/static/../../shared/web.py",
        "/static/..%2fweb.py",
        "/static/%2e%2e/web.py",
        "/static/..\\web.py",
        "/static/.hidden.js",
        "/static/nope.js",
        "/static/admin.py",
        "/static/",
        "/nowhere",
        "/api/nothing",
    ]:
        status, headers, body = await raw_get(system.http_port, path, cookie)
        assert status == 404, (path, status, body[:200])
        assert b"import" not in body, path
        assert "content-security-policy" in headers, path
