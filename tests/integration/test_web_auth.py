"""People logging in (docs/web-auth.md), against a real Central and a real driver dashboard.

One deployment for the whole module (a Central blocking a source after 4 failures for 3 s,
and a dashboard process), reached with raw HTTP and WebSocket clients: every way in without
the right session must fail, and the right session must work.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from helpers import scaled, wait_for
from procs import Deployment

pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

LOCK_AFTER = 4
LOCK_SECONDS = 3
ADMIN_COOKIE = "ev_admin_session"
DRIVER_COOKIE = "ev_driver_session"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    deployment = Deployment(
        kafka_bootstrap,
        tmp_path_factory.mktemp("web-auth"),
        lockout_after=LOCK_AFTER,
        lockout_seconds=LOCK_SECONDS,
    )
    try:
        await deployment.start_central()
        yield deployment
    finally:
        deployment.stop_all()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def dashboard(system: Deployment) -> int:
    """The driver dashboard's port (the process belongs to the module's deployment)."""
    await system.start_dashboard("--reply-timeout", "10")
    return int(system.dashboard_port)


# --- raw clients ---------------------------------------------------------------------------


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, http.client.HTTPMessage, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=scaled(5))
    try:
        conn.request("GET", path, headers=headers)
        answer = conn.getresponse()
        body = answer.read()
    finally:
        conn.close()
    data = json.loads(body) if body and "json" in answer.headers.get("Content-Type", "") else body
    return answer.status, answer.headers, data


async def get(
    port: int, path: str, cookie: str | None = None, **headers: str
) -> tuple[int, http.client.HTTPMessage, Any]:
    """GET `path` with the session `cookie` ("name=token") and any other headers."""
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if cookie:
        sent["Cookie"] = cookie
    return await asyncio.to_thread(_get, port, path, sent)


async def ask_login(
    port: int, user: str, password: str, origin: str | None = None, source: str = "127.0.0.1"
) -> dict[str, Any]:
    """The login_result /login answers to a login message sent from the address `source`."""
    async with connect(
        f"ws://127.0.0.1:{port}/login",
        origin=origin,  # type: ignore[arg-type]
        local_addr=(source, 0),
    ) as ws:
        await ws.send(json.dumps({"type": "login", "user": user, "password": password}))
        async with asyncio.timeout(scaled(20)):
            answer: dict[str, Any] = json.loads(await ws.recv())
    assert answer["type"] == "login_result", answer
    return answer


async def log_in(port: int, user: str, password: str, name: str) -> str:
    """The whole flow: /login, then GET /session; the session cookie as "name=token"."""
    answer = await ask_login(port, user, password)
    assert answer["ok"] is True, answer
    status, headers, _ = await get(port, f"/session?grant={answer['grant']}")
    assert status == 204
    pair = headers["Set-Cookie"].split(";")[0]
    assert pair.startswith(f"{name}="), pair
    return pair


def ws(port: int, cookie: str | None = None, origin: str | None = None) -> Any:
    headers = {"Cookie": cookie} if cookie else {}
    return connect(
        f"ws://127.0.0.1:{port}/ws",
        additional_headers=headers,
        origin=origin,  # type: ignore[arg-type]
        max_size=None,
    )


async def refused(port: int, cookie: str | None = None, origin: str | None = None) -> int:
    """The HTTP status a /ws handshake is refused with (fails if it is accepted)."""
    with pytest.raises(InvalidStatus) as refusal:
        async with ws(port, cookie, origin):
            pass
    return refusal.value.response.status_code


async def next_of(conn: ClientConnection, kind: str, timeout: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(scaled(timeout)):
        while True:
            message: dict[str, Any] = json.loads(await conn.recv())
            if message.get("type") == kind:
                return message


async def admin(system: Deployment) -> str:
    return await log_in(system.http_port, "admin", "admin", ADMIN_COOKIE)


# --- Central's admin web (:8002) ------------------------------------------------------------

API = ["/api/cps", "/api/sessions", "/api/events", "/api/stats", "/api/drivers", "/api/audit"]


async def test_the_api_needs_a_session_and_public_paths_stay_public(system: Deployment) -> None:
    port = system.http_port
    for path in [*API, "/api/whoami", "/api/sessions?driver_id=user1"]:
        for cookie in (None, f"{ADMIN_COOKIE}=forged-token-that-was-never-issued-xx"):
            status, _, body = await get(port, path, cookie)
            assert status == 401, (path, cookie, status, body)
            assert body == {"error": "log in first"}
    # Healthchecks and Prometheus need no login (and carry no personal data); nor the page.
    for path in ("/healthz", "/metrics", "/", "/static/admin.js", "/static/ev.auth.js"):
        status, _, _ = await get(port, path)
        assert status == 200, path
    cookie = await admin(system)
    for path in API:
        status, _, body = await get(port, path, cookie)
        assert status == 200, (path, body)
    status, _, body = await get(port, "/api/whoami", cookie)
    assert status == 200 and body["user"] == "admin" and body["role"] == "admin", body
    assert 0 < body["expires_in"] <= 8 * 3600


async def test_a_driver_session_is_no_admin_and_reads_only_its_own(system: Deployment) -> None:
    port = system.http_port
    cookie = await log_in(port, "user1", "pass1", ADMIN_COOKIE)
    status, _, who = await get(port, "/api/whoami", cookie)
    assert status == 200 and (who["user"], who["role"]) == ("user1", "driver")
    for path in ["/api/cps", "/api/events", "/api/stats", "/api/drivers", "/api/audit"]:
        status, _, body = await get(port, path, cookie)
        assert status == 403, (path, status, body)
    for other in ("user2", "admin", "USER1", "user1%00"):
        status, _, body = await get(port, f"/api/sessions?driver_id={other}", cookie)
        assert status == 403, (other, status, body)
    # Its own sessions: also what it gets without naming itself.
    with contextlib.closing(sqlite3.connect(system.db_path, timeout=5)) as db, db:
        for session_id, driver_id in (("auth-s1", "user1"), ("auth-s2", "user2")):
            db.execute(
                "INSERT INTO sessions (id, cp_id, driver_id, origin, status, requested_at)"
                " VALUES (?, 'CP010', ?, 'driver', 'DENIED', ?)",
                (session_id, driver_id, time.time()),
            )
    for path in ("/api/sessions", "/api/sessions?driver_id=user1"):
        status, _, rows = await get(port, path, cookie)
        assert status == 200 and [r["id"] for r in rows] == ["auth-s1"], (path, rows)
    # The admin WebSocket, and so every command, is for admins only.
    assert await refused(port, cookie) == 403


async def test_the_websocket_needs_a_session_and_an_allowed_origin(system: Deployment) -> None:
    port = system.http_port
    assert await refused(port) == 401
    assert await refused(port, f"{ADMIN_COOKIE}=not-a-session-token-of-this-central") == 401
    cookie = await admin(system)
    foreign = ["http://evil.example", "null", f"http://127.0.0.1:{port + 1}", "file://x"]
    for bad in foreign:
        assert await refused(port, cookie, bad) == 403, bad
    with pytest.raises(InvalidStatus) as login_refused:
        await ask_login(port, "admin", "admin", origin="http://evil.example")
    assert login_refused.value.response.status_code == 403
    # The page's own origin, and clients without an Origin (ctl, scripts), are let in.
    for origin in (f"http://127.0.0.1:{port}", None):
        async with ws(port, cookie, origin) as conn:
            snapshot = await next_of(conn, "snapshot")
            assert "cps" in snapshot


async def test_cookie_attributes_single_use_grants_and_logout(system: Deployment) -> None:
    port = system.http_port
    answer = await ask_login(port, "admin", "admin")
    assert answer["ok"] is True and answer["role"] == "admin" and answer["grant"]
    status, headers, _ = await get(port, f"/session?grant={answer['grant']}")
    assert status == 204
    attributes = [part.strip() for part in headers["Set-Cookie"].split(";")]
    name, _, token = attributes[0].partition("=")
    assert name == ADMIN_COOKIE and len(token) >= 40
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes), attributes
    assert f"Max-Age={8 * 3600}" in attributes
    assert "Secure" not in attributes  # plain HTTP here; over TLS it is added
    cookie = attributes[0]
    # A grant works once; a used, forged or missing one gives nothing.
    for grant in (answer["grant"], "A" * 32, "", "../etc"):
        status, headers, body = await get(port, f"/session?grant={grant}")
        assert status == 400 and "Set-Cookie" not in headers, (grant, status)
    status, _, _ = await get(port, "/api/whoami", cookie)
    assert status == 200

    async with ws(port, cookie) as conn:
        await next_of(conn, "snapshot")
        status, headers, _ = await get(port, "/logout", cookie)
        assert status == 204
        assert "Max-Age=0" in headers["Set-Cookie"] and ADMIN_COOKIE in headers["Set-Cookie"]
        # The open panel of that session is closed with it.
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(scaled(6)):
                while True:
                    await conn.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    status, _, _ = await get(port, "/api/whoami", cookie)
    assert status == 401
    assert await refused(port, cookie) == 401

    async def audited() -> bool:
        rows = system.query("SELECT action, actor FROM audit_log")
        return ("logout", "admin") in rows and any(a == "ws_rejected" for a, _ in rows)

    await wait_for(audited, 5, message="the logout and the refused WebSocket were not audited")


async def test_guessing_slows_and_blocks_the_guesser_not_the_admin(system: Deployment) -> None:
    port = system.http_port
    attacker = "127.0.0.2"  # another address of the loopback: another machine to Central
    took = []
    answers = []
    for attempt in range(6):
        started = time.monotonic()
        answers.append(await ask_login(port, "admin", f"guess{attempt}", source=attacker))
        took.append(time.monotonic() - started)
    assert not any(answer["ok"] for answer in answers), answers
    # Each failure is answered later than the one before (0.2 s, 0.4 s, 0.8 s...) ...
    assert [a["reason"] for a in answers[: LOCK_AFTER - 1]] == ["wrong user or password"] * 3
    assert took[1] > took[0] + 0.1 and took[2] > took[1] + 0.25, took
    # ... then the guesser is blocked, and told for how long.
    for answer in answers[LOCK_AFTER - 1 :]:
        assert answer["reason"].startswith("too many failed logins; try again in"), answer
        assert 1 <= answer["retry_after"] <= LOCK_SECONDS
    blocked_at = time.monotonic()
    # The same words for an account that does not exist: nothing tells them apart.
    unknown = await ask_login(port, "nobody", "guess", source=attacker)
    assert unknown["reason"] == "wrong user or password"

    # The real admin, from elsewhere, gets in at once; the guesser does not, even with it.
    started = time.monotonic()
    assert (await ask_login(port, "admin", "admin"))["ok"] is True
    assert time.monotonic() - started < scaled(1.5)
    right = await ask_login(port, "admin", "admin", source=attacker)
    assert right["ok"] is False and "grant" not in right and right["retry_after"] >= 1, right
    audited = system.query(
        "SELECT action, outcome, source FROM audit_log WHERE actor = 'admin' ORDER BY id"
    )
    guesses = [(a, o) for a, o, src in audited if src == attacker]
    # Every checked failure and the block are audited; the refusals while blocked are not.
    assert guesses == [("login", "failed")] * LOCK_AFTER + [("throttle", "blocked")], guesses
    assert ("login", "ok", "127.0.0.1") in audited

    # Once the block has run out, the guesser's address may try again.
    await asyncio.sleep(max(0.0, LOCK_SECONDS + 0.2 - (time.monotonic() - blocked_at)))
    again = await ask_login(port, "admin", "admin", source=attacker)
    assert again["ok"] is True and again["role"] == "admin", again


async def test_ctl_logs_in_first(system: Deployment, tmp_path: Path) -> None:
    before = system.query("SELECT in_service FROM charging_points WHERE id = 'CP004'")
    out = await system.ctl("stop", "CP004", password="", check=False)
    assert "error: no password" in out and "--password-file" in out, out
    out = await system.ctl("stop", "CP004", password="not-the-password", check=False)
    assert "refused the login of admin: wrong user or password" in out, out
    assert system.query("SELECT in_service FROM charging_points WHERE id = 'CP004'") == before

    secret_file = tmp_path / "admin-password"
    secret_file.write_text("admin\n")
    os.chmod(secret_file, 0o600)
    out = await system.ctl(
        "--password-file", str(secret_file), "register", "CP044",
        "--location", "Alicante - Test", "--price", "0.31", "--max-kw", "11",
    )  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "ok: registered CP044 (CP044)", out
    assert lines[1].startswith("secret of CP044: ") and len(lines[1].split()[-1]) >= 24
    assert "--secret" in lines[2] and "EV_CP_SECRET" in lines[2]
    out = await system.ctl("stop", "CP044")
    assert out.startswith("ok: stop CP044")
    assert system.query("SELECT in_service FROM charging_points WHERE id = 'CP044'") == [(0,)]
    actions = system.query(
        "SELECT action, outcome, actor FROM audit_log WHERE detail LIKE 'CP044%' ORDER BY id"
    )
    assert ("cp_registered", "ok", "admin") in actions and ("stop", "ok", "admin") in actions


# --- the driver dashboard (:8001) -----------------------------------------------------------


async def test_dashboard_needs_a_session_and_an_allowed_origin(
    system: Deployment, dashboard: int
) -> None:
    assert await refused(dashboard) == 401
    assert await refused(dashboard, f"{DRIVER_COOKIE}=never-issued-token-of-this-dashboard") == 401
    status, _, _ = await get(dashboard, "/api/whoami")
    assert status == 401
    # An admin session at Central is no session here (another server, another cookie).
    assert await refused(dashboard, await admin(system)) == 401
    cookie = await log_in(dashboard, "user1", "pass1", DRIVER_COOKIE)
    assert await refused(dashboard, cookie, "http://evil.example:8001") == 403
    with pytest.raises(InvalidStatus) as bad_login:
        await ask_login(dashboard, "user1", "pass1", origin="null")
    assert bad_login.value.response.status_code == 403
    wrong = await ask_login(dashboard, "user1", "not-pass1")
    assert wrong["ok"] is False and "grant" not in wrong
    status, _, who = await get(dashboard, "/api/whoami", cookie)
    assert status == 200 and (who["user"], who["role"]) == ("user1", "driver")


async def test_a_driver_sees_only_its_own_and_cannot_speak_for_another(
    system: Deployment, dashboard: int
) -> None:
    one = await log_in(dashboard, "user1", "pass1", DRIVER_COOKIE)
    two = await log_in(dashboard, "user2", "pass2", DRIVER_COOKIE)
    async with ws(dashboard, one) as first, ws(dashboard, two) as second:
        assert (await next_of(first, "session"))["driver_id"] == "user1"
        assert (await next_of(second, "session"))["driver_id"] == "user2"
        # No command names a driver: the connection's session does. Trying is an error,
        # as is anything else malformed, and the connection stays usable.
        for raw, fragment in (
            ({"type": "request", "cp_id": "CP009", "driver_id": "user2"}, "driver_id"),
            ({"type": "stop", "driver_id": "user2"}, "driver_id"),
            ({"type": "login", "user": "user2", "password": "pass2"}, "invalid message"),
            ({"type": "logout"}, "invalid message"),
            ({"type": "request", "cp_id": "<img src=x>"}, "cp_id"),
            ("{not json", "invalid message"),
            (b'{"type":"refresh"}', "binary"),
        ):
            await first.send(raw if isinstance(raw, str | bytes) else json.dumps(raw))
            answer = await next_of(first, "error")
            assert fragment in answer["detail"], (raw, answer)

        # user2 asks for a supply (CP009 has no monitor: denied). Only user2 hears of it.
        await second.send(json.dumps({"type": "request", "cp_id": "CP009"}))
        denied = None
        async with asyncio.timeout(scaled(20)):
            while denied is None:
                push = json.loads(await second.recv())
                if push["type"] == "supply" and (push["supply"] or {}).get("phase") == "denied":
                    denied = push
        heard: list[dict[str, Any]] = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(scaled(1.5)):
                while True:
                    heard.append(json.loads(await first.recv()))
        leaked = [p for p in heard if p["type"] in ("supply", "ticket", "run", "progress")]
        assert not leaked and "user2" not in json.dumps(heard), heard
    rows = system.query("SELECT driver_id, cp_id, status FROM sessions WHERE cp_id = 'CP009'")
    assert rows == [("user2", "CP009", "DENIED")], rows


async def test_dashboard_logout_closes_the_page_and_lockout_reaches_drivers(
    system: Deployment, dashboard: int
) -> None:
    cookie = await log_in(dashboard, "user3", "pass3", DRIVER_COOKIE)
    async with ws(dashboard, cookie) as conn:
        await next_of(conn, "session")
        status, headers, _ = await get(dashboard, "/logout", cookie)
        assert status == 204 and "Max-Age=0" in headers["Set-Cookie"]
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(scaled(6)):
                while True:
                    await conn.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    assert await refused(dashboard, cookie) == 401

    # Guessing a driver's password through the dashboard, from one browser host, blocks that
    # host at Central (the dashboard logs each host in with a key of its own) ...
    for attempt in range(6):
        answer = await ask_login(dashboard, "user4", f"guess{attempt}", source="127.0.0.3")
        assert answer["ok"] is False, answer
    blocked = await ask_login(dashboard, "user4", "pass4", source="127.0.0.3")
    assert blocked["ok"] is False and "too many failed logins" in blocked["reason"], blocked
    assert blocked.get("retry_after"), blocked
    # ... not the driver on another host of the same dashboard, nor in its own app.
    started = time.monotonic()
    assert (await ask_login(dashboard, "user4", "pass4"))["ok"] is True
    assert time.monotonic() - started < scaled(3)
    app = system.start_driver(
        "user4",
        "--password",
        "pass4",
        "--token-file",
        str(system.workdir / "user4.token"),
        name="user4-login",
        command="login",
    )
    assert await app.wait_exit(30) == 0, app.output
    sources = {
        src
        for (src,) in system.query(
            "SELECT source FROM audit_log WHERE actor = 'user4' AND action = 'throttle'"
        )
    }
    assert len(sources) == 1 and next(iter(sources)).startswith("login key "), sources
