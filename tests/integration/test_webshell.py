"""The dashboards' shared web shell (shared.webshell), on real sockets with a real client.

A small app plugs into the shell as a dashboard would: logins checked by a callable, one
role on /ws, a route for another role, echoes of what a browser sends. No broker is needed.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response

from helpers import scaled, wait_for
from shared.web import json_response
from shared.webapp import (
    HttpRequest,
    Limits,
    Listen,
    LoginOutcome,
    Logins,
    Refusal,
    Route,
    WebApp,
    WebClient,
)
from shared.websession import WebLogin, WebSession
from shared.webshell import WebShell

COOKIE = "test_session"


class EchoApp(WebApp):
    web_name = "test shell"
    static_package = "EV_Driver"
    server_header = "test"

    def __init__(self) -> None:
        self.outcome: LoginOutcome | None = None  # what the next login answers, if set
        self.backed = True
        self.refusals: list[Refusal] = []
        self.logouts: list[str] = []

    async def on_connect(self, client: WebClient) -> None:
        user = client.session.user_id if client.session else None
        client.push({"type": "hello", "user": user})

    async def on_message(self, client: WebClient, data: str | bytes) -> None:
        client.push({"type": "echo", "data": data if isinstance(data, str) else "binary"})

    async def check_login(self, form: WebLogin, peer: str) -> LoginOutcome:
        if self.outcome is not None:
            return self.outcome
        if form.password == "right":
            return LoginOutcome(True, form.user, "driver")
        return LoginOutcome(False, form.user, reason="wrong user or password")

    def session_backed(self, session: WebSession) -> bool:
        return self.backed

    async def on_refusal(self, refusal: Refusal) -> None:
        self.refusals.append(refusal)

    async def on_logout(self, session: WebSession, peer: str) -> None:
        self.logouts.append(session.user_id)


async def admins_secret(request: HttpRequest) -> Response:
    assert request.session is not None
    return json_response({"secret": 42, "user": request.session.user_id})


class Running:
    def __init__(self, shell: WebShell, app: EchoApp) -> None:
        self.shell = shell
        self.app = app

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.shell.port}"

    def ws(self, cookie: str | None = None, origin: str | None = None, **kw: Any) -> Any:
        headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
        return connect(
            f"ws://{self.base}/ws",
            additional_headers=headers,
            origin=origin,  # type: ignore[arg-type]
            **kw,
        )

    async def get(self, path: str, cookie: str | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(f"http://{self.base}{path}")
        if cookie:
            request.add_header("Cookie", f"{COOKIE}={cookie}")

        def fetch() -> tuple[int, dict[str, str], bytes]:
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    return resp.status, dict(resp.headers), resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, dict(exc.headers), exc.read()

        return await asyncio.to_thread(fetch)

    async def login(self, user: str, password: str) -> dict[str, Any]:
        async with connect(f"ws://{self.base}/login") as ws:
            await ws.send(json.dumps({"type": "login", "user": user, "password": password}))
            return await reply(ws)

    async def session(self, user: str = "ann") -> str:
        """Log in and redeem the grant: the session token from the cookie."""
        answer = await self.login(user, "right")
        status, headers, _ = await self.get(f"/session?grant={answer['grant']}")
        assert status == 204, headers
        cookie = headers["Set-Cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie
        return cookie.split(";")[0].partition("=")[2]


async def reply(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(scaled(10)):
        message = await ws.recv()
    data: dict[str, Any] = json.loads(message)
    return data


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    app = EchoApp()
    shell = WebShell(
        app,
        Listen("127.0.0.1", 0),
        Limits(4096, 10, 16),
        routes={"/api/secret": Route(admins_secret, frozenset({"admin"}), "admins only")},
        logins=Logins(COOKIE, frozenset({"driver"}), "the test socket", 60.0),
    )
    await shell.start()
    try:
        yield Running(shell, app)
    finally:
        await shell.stop()


async def test_no_cookie_is_401_and_a_foreign_origin_403_and_audited(running: Running) -> None:
    for cookie, origin, status in [
        (None, None, 401),
        ("never-issued-by-this-shell-00000", None, 401),
        (None, "http://evil.example", 403),
    ]:
        with pytest.raises(InvalidStatus) as refused:
            async with running.ws(cookie, origin):
                pass
        assert refused.value.response.status_code == status, (cookie, origin)
    for path in ("/api/whoami", "/api/secret", "/api/unknown"):
        status, _, body = await running.get(path)
        assert status == 401 and json.loads(body) == {"error": "log in first"}, path
    # Reported once per client host in 10 s: the first refusal only.
    await wait_for(lambda: running.app.refusals, 5, message="no refusal reported")
    assert [r.why for r in running.app.refusals] == ["no session"]
    assert running.app.refusals[0].path == "/ws"


async def test_login_session_ws_and_logout_close_the_socket(running: Running) -> None:
    token = await running.session("ann")
    status, _, body = await running.get("/api/whoami", token)
    assert status == 200 and json.loads(body)["user"] == "ann"
    status, _, body = await running.get("/api/secret", token)
    assert status == 403 and json.loads(body) == {"error": "admins only"}
    async with running.ws(token) as ws:
        assert await reply(ws) == {"type": "hello", "user": "ann"}
        await ws.send("ping")
        assert await reply(ws) == {"type": "echo", "data": "ping"}
        status, headers, _ = await running.get("/logout", token)
        assert status == 204 and "Max-Age=0" in headers["Set-Cookie"]
        with pytest.raises(ConnectionClosed) as closed:
            await reply(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    assert running.app.logouts == ["ann"]
    await wait_for(lambda: running.shell.client_count == 0, 5)


async def test_a_session_whose_backing_ends_closes_its_socket(running: Running) -> None:
    token = await running.session("bob")
    async with running.ws(token) as ws:
        assert (await reply(ws))["type"] == "hello"
        running.app.backed = False  # e.g. the driver's key at Central expired
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(scaled(10)):
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    assert len(running.shell.sessions) == 0


async def test_retry_after_is_carried_as_a_number(running: Running) -> None:
    running.app.outcome = LoginOutcome(
        False, "ann", reason="account locked, try again in 299 s", retry_after=298.6
    )
    answer = await running.login("ann", "right")
    assert answer == {
        "type": "login_result",
        "ok": False,
        "reason": "account locked, try again in 299 s",
        "retry_after": 299,
    }
    running.app.outcome = None
    answer = await running.login("ann", "wrong")
    assert answer["ok"] is False and "retry_after" not in answer


async def test_a_slow_client_is_disconnected_and_only_it() -> None:
    app = EchoApp()
    shell = WebShell(app, Listen("127.0.0.1", 0), Limits(4096, 10, 4))
    await shell.start()
    url = f"ws://127.0.0.1:{shell.port}/ws"
    blob = "x" * 100_000
    limit = 1000  # 100 MB at most: far more than the socket buffers of a client not reading
    try:
        async with (
            connect(url, max_size=None) as fast,
            # No compression: the pushes must really take room in the socket buffers.
            connect(url, max_size=None, max_queue=1, compression=None) as slow,
        ):
            assert (await reply(fast))["type"] == "hello"
            await wait_for(lambda: shell.client_count == 2, 5)
            sent = 0
            while shell.client_count == 2 and sent < limit:
                shell.broadcast({"type": "blob", "i": sent, "data": blob})
                message = await reply(fast)  # the fast one keeps up, one at a time
                assert message["i"] == sent
                sent += 1
            assert shell.client_count == 1, "the slow client was not disconnected"
            got = 0
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(scaled(10)):
                    while True:
                        await slow.recv()
                        got += 1
            assert closed.value.rcvd is None  # aborted, no close frame
            assert got < sent
            await fast.send("still here")
            assert await reply(fast) == {"type": "echo", "data": "still here"}
    finally:
        await shell.stop()
        await shell.stop()  # idempotent
    assert not shell.running


async def test_stop_cancels_every_task_it_owns() -> None:
    app = EchoApp()
    shell = WebShell(app, Listen("127.0.0.1", 0), Limits(4096, 10, 4))
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    await shell.start(forever)
    await asyncio.wait_for(started.wait(), scaled(5))
    before = set(asyncio.all_tasks())
    await shell.stop()
    leftover = {t for t in before if not t.done() and t is not asyncio.current_task()}
    assert not [t for t in leftover if t.get_name().startswith("web")], leftover

    async def never() -> None:
        raise AssertionError("ran after stop()")

    shell.spawn(never(), "late")  # a stopped shell starts nothing
    await asyncio.sleep(0)
