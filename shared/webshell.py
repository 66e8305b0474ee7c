"""The web shell the three dashboards share: one `websockets` server with logins and pushes.

A `WebShell` serves the page and the static files of a package (with the CSP, shared/web.py),
over TLS when given a context, and /ws, the WebSocket each browser talks over: a bounded queue
of pushes per browser (shared/webapp.py, `WebClient`), aborted when the browser cannot keep up.
With `Logins` it also owns the login flow of docs/web-auth.md (/login, /session, /logout,
/api/whoami), the Origin and cookie checks on every upgrade, and the closing of WebSockets
whose session ended. Every task it starts is its own: stop() cancels and awaits them all.

A dashboard plugs in only what is its own, as a `WebApp` (shared/webapp.py): how a login is
checked and which roles may open /ws, its extra HTTP routes, what a browser gets on
connecting, what its messages do, and the hooks that audit refusals and logouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from shared.abuse import ConnectionCap
from shared.errors import MessageError
from shared.lifecycle import Shutdown, first_error
from shared.tls import HANDSHAKE_TIMEOUT
from shared.web import bound_port, error_response, json_response, split_path, static_response
from shared.webapp import (
    HttpRequest,
    Limits,
    Listen,
    Logins,
    Refusal,
    Route,
    WebApp,
    WebClient,
    dumps,
    host_of,
    peer_of,
)
from shared.websession import (
    SessionStore,
    WebSession,
    cookie_value,
    login_ok,
    login_refused,
    logout_response,
    origin_allowed,
    parse_login,
    redeem_response,
)

log = logging.getLogger(__name__)

LOGIN_WAIT = 30.0  # seconds a /login connection may take to send its one message
MAX_LOGINS = 100  # /login connections open at once
LOGINS_PER_HOST = 8  # of which from one client host
OPEN_TIMEOUT = 10.0  # seconds a connection has to send its whole HTTP request (or handshake)
SESSION_CHECK = 2.0  # seconds between checks that each browser's session is still alive
REFUSAL_AUDIT_INTERVAL = 10.0  # a refused upgrade is reported once per client host in this
MAX_REFUSAL_HOSTS = 10_000
CLOSE_TIMEOUT = 5.0  # seconds stop() waits for the connections to close


# --- the server ---------------------------------------------------------------------------------


class WebShell:
    def __init__(
        self,
        app: WebApp,
        listen: Listen,
        limits: Limits,
        *,
        routes: Mapping[str, Route] | None = None,
        logins: Logins | None = None,
    ) -> None:
        self.app = app
        self.host, self.port, self.ssl_context = listen.host, listen.port, listen.ssl_context
        self.limits = limits
        self.logins = logins
        self.sessions = SessionStore(ttl=logins.session_ttl if logins else 8 * 3600.0)
        self._allowed_origins = frozenset(logins.allowed_origins if logins else ())
        self.routes = dict(routes or {})
        self._server: Server | None = None
        self._clients: set[WebClient] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._upgrades: weakref.WeakKeyDictionary[ServerConnection, WebSession] = (
            weakref.WeakKeyDictionary()
        )
        self._logins_open = 0
        self._logins_by_host = ConnectionCap(LOGINS_PER_HOST)
        self._per_address = ConnectionCap(limits.per_address)
        self._refusals_reported: dict[str, float] = {}

    @property
    def tls(self) -> bool:
        """True when served over TLS (HTTPS, WSS; session cookies are then Secure)."""
        return self.ssl_context is not None

    @property
    def client_count(self) -> int:
        return len(self._clients)

    @property
    def watched(self) -> bool:
        """True when an open WebSocket takes the broadcasts (a service's does not): whether
        a push is worth building."""
        return any(client.watching for client in self._clients)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self, *background: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Listen (the port the OS chose when asked for 0 is then in `port`); run `background`
        coroutines, and with Logins the session check, until stop() (idempotent)."""
        if self._server is not None:
            return
        self._server = await serve(
            self._serve_ws,
            self.host,
            self.port,
            process_request=self._process_request,
            max_size=self.limits.max_message,
            max_queue=self.limits.max_queue,
            server_header=self.app.server_header,
            ssl=self.ssl_context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.ssl_context else None,
            open_timeout=OPEN_TIMEOUT,
            create_connection=_capped(self._per_address),
        )
        self.port = bound_port(self._server.sockets, self.port)
        if self.logins is not None:
            self.spawn(self._check_sessions(), "web-sessions")
        for run in background:
            self.spawn(run(), _name(run))
        scheme = "https" if self.tls else "http"
        log.info("%s on %s://%s:%d/", self.app.web_name, scheme, self.host, self.port)

    async def stop(self) -> None:
        """Stop the owned tasks, close every connection and the server (idempotent)."""
        server, self._server = self._server, None  # from now on spawn() starts nothing
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # failures were logged
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await server.wait_closed()

    async def run(
        self, shutdown: Shutdown, *tasks: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        """Serve, and run `tasks` alongside, until shutdown is requested; then stop.

        The first task to fail stops the others and is raised."""
        await self.start()
        try:
            async with asyncio.TaskGroup() as group:
                running = [group.create_task(task(), name=_name(task)) for task in tasks]
                await shutdown.wait()
                for task in running:
                    task.cancel()
        except BaseExceptionGroup as failures:
            raise first_error(failures) from None
        finally:
            await self.stop()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run `coro` as a task the shell owns: failures are logged, stop() cancels it."""
        if self._server is None:
            coro.close()  # stopped (or never started): nothing runs after stop()
            return
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("web task %s failed", task.get_name(), exc_info=task.exception())

    def broadcast(self, payload: Mapping[str, Any]) -> None:
        """Push to every open WebSocket (a slow one is disconnected, the others go on)."""
        if self.watched:
            self.broadcast_text(dumps(payload))

    def broadcast_text(self, text: str) -> None:
        for client in list(self._clients):
            if client.watching:
                client.send_text(text)

    # --- HTTP -------------------------------------------------------------------------------

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path, query = split_path(request.path)
        if path == "/ws" or (path == "/login" and self.logins is not None):
            return self._check_upgrade(conn, request, path)
        if path in self.app.one_shot_paths:
            return self._check_one_shot(conn, request, path)
        if self.logins is not None:
            if path == "/session":
                return await self._redeem(conn, query)
            if path == "/logout":
                return self._logout(conn, request)
            if path == "/api/whoami":
                session = self._session(request)
                if session is None:
                    return error_response(401, "log in first")
                return json_response(session.as_api(self.sessions.now()))
        route = self.routes.get(path)
        if route is None:
            if path in ("/", "/index.html"):
                return static_response(self.app.static_package, "index.html")
            if path.startswith("/static/"):
                return static_response(self.app.static_package, path.removeprefix("/static/"))
            if self.logins is not None and path.startswith("/api/"):
                if self._session(request) is None:  # no session learns which paths exist
                    return error_response(401, "log in first")
            return error_response(404, f"no such resource: {path}")
        session = None
        if route.roles is not None:
            session = self._session(request)
            if session is None:
                return error_response(401, "log in first")
            if session.role not in route.roles:
                return error_response(403, route.forbidden)
        try:
            return await route.handler(
                HttpRequest(path, query, request.headers, peer_of(conn), session)
            )
        except ValueError as exc:  # a bad query parameter
            return error_response(400, str(exc))

    def _session(self, request: Request) -> WebSession | None:
        if self.logins is None:
            return None
        return self.sessions.get(cookie_value(request.headers, self.logins.cookie))

    # --- sessions: upgrade checks, login, cookie, logout ---------------------------------------

    def _check_upgrade(
        self, conn: ServerConnection, request: Request, path: str
    ) -> Response | None:
        """Let a WebSocket handshake go on, or refuse it (bad Origin, no session, wrong role)."""
        logins = self.logins
        if logins is None:
            return None  # a public dashboard: anyone may watch
        origin = request.headers.get("Origin")
        if not origin_allowed(request.headers, self._allowed_origins):
            log.warning(
                "refused a WebSocket on %s from %s: Origin %r not allowed",
                path,
                peer_of(conn),
                origin,
            )
            self._refused(conn, path, f"Origin {origin!r}")
            return error_response(403, logins.origin_forbidden)
        if path == "/login":
            return self._one_shot_room(conn)
        session = self._session(request)
        if session is None:
            self._refused(conn, path, "no session")
            return error_response(401, "log in first")
        if session.role not in logins.ws_roles:
            self._refused(conn, path, f"role {session.role}", actor=session.user_id)
            return error_response(403, logins.role_forbidden)
        self._upgrades[conn] = session
        return None

    def _check_one_shot(
        self, conn: ServerConnection, request: Request, path: str
    ) -> Response | None:
        """A one-shot path of the app's: no session, but the Origin and the logins' caps."""
        if not origin_allowed(request.headers, self._allowed_origins):
            return error_response(403, f"this page's origin may not use {path}")
        return self._one_shot_room(conn)

    def _one_shot_room(self, conn: ServerConnection) -> Response | None:
        """None when another one-message connection (/login or a one-shot path) may open."""
        if (
            self._logins_open >= MAX_LOGINS
            or self._logins_by_host.count(host_of(peer_of(conn))) >= LOGINS_PER_HOST
        ):
            return error_response(503, "too many logins at once; try again in a moment")
        return None

    def _refused(self, conn: ServerConnection, path: str, why: str, *, actor: str = "") -> None:
        """Report a refused upgrade to the audit hook, at most once per client host in 10 s."""
        if self.logins is None:
            return
        source = peer_of(conn)
        host = host_of(source)
        now = time.monotonic()
        if now - self._refusals_reported.get(host, -1e9) < REFUSAL_AUDIT_INTERVAL:
            return
        if len(self._refusals_reported) > MAX_REFUSAL_HOSTS:
            self._refusals_reported.clear()
        self._refusals_reported[host] = now
        self.spawn(self.app.on_refusal(Refusal(source, path, why, actor)), "web-audit")

    async def _redeem(self, conn: ServerConnection, query: dict[str, str]) -> Response:
        """GET /session?grant=CODE: a grant from /login becomes the session cookie."""
        assert self.logins is not None
        grant = query.get("grant", "")
        answer, session = redeem_response(self.sessions, grant, self.logins.cookie, self.tls)
        if session is not None:
            await self.app.session_made(session)  # kept before the cookie leaves, where kept
            log.info(
                "session started for %s (%s) from %s", session.user_id, session.role, peer_of(conn)
            )
        return answer

    def _logout(self, conn: ServerConnection, request: Request) -> Response:
        """GET /logout: end the session (and its WebSockets) and clear the cookie."""
        assert self.logins is not None
        session = self.sessions.end(cookie_value(request.headers, self.logins.cookie))
        if session is not None:
            log.info("%s (%s) logged out", session.user_id, session.role)
            self.spawn(self.app.on_logout(session, peer_of(conn)), "web-audit")
            self.close_ended()
        return logout_response(self.logins.cookie, self.tls)

    async def _serve_one(
        self,
        conn: ServerConnection,
        answer: Callable[[str | bytes], Coroutine[Any, Any, Mapping[str, Any]]],
    ) -> None:
        """One message in, one answer out, closed: /login and the app's one-shot paths."""
        host = host_of(peer_of(conn))
        self._logins_open += 1
        self._logins_by_host.open(host)
        try:
            try:
                async with asyncio.timeout(LOGIN_WAIT):
                    raw = await conn.recv()
            except TimeoutError:
                await conn.close(1008, "no message")
                return
            await conn.send(dumps(await answer(raw)))
        finally:
            self._logins_open -= 1
            self._logins_by_host.close(host)

    async def _login_answer(self, conn: ServerConnection, raw: str | bytes) -> dict[str, Any]:
        """A login message checked: a one-time grant, or the refusal."""
        try:
            form = parse_login(raw)
        except MessageError as exc:
            return login_refused(str(exc))
        outcome = await self.app.check_login(form, peer_of(conn))
        if outcome.ok and outcome.role is not None:
            grant = self.sessions.grant(outcome.user_id, outcome.role)
            return login_ok(grant, outcome.user_id, outcome.role)
        return login_refused(outcome.reason, outcome.retry_after)

    def close_ended(self) -> None:
        """Close the WebSockets whose session ended (logout, expiry, backing gone)."""
        for client in list(self._clients):
            session = client.session
            if session is None:
                continue
            if not self.app.session_backed(session):
                self.sessions.end_user(session.user_id)
            if self.sessions.valid(session):
                self.sessions.touch(session)  # an open page is in use
            else:
                client.ended.set()

    async def _check_sessions(self) -> None:
        while True:
            await asyncio.sleep(SESSION_CHECK)
            self.close_ended()
            self.sessions.prune()

    # --- WebSocket ----------------------------------------------------------------------------

    async def _serve_ws(self, conn: ServerConnection) -> None:
        path = split_path(conn.request.path)[0] if conn.request is not None else ""
        if path in self.app.one_shot_paths or (path == "/login" and self.logins is not None):
            peer = peer_of(conn)

            async def answer(raw: str | bytes) -> Mapping[str, Any]:
                if path == "/login":
                    return await self._login_answer(conn, raw)
                return await self.app.one_shot(path, raw, peer)

            with contextlib.suppress(ConnectionClosed):
                await self._serve_one(conn, answer)
            return
        session = self._upgrades.pop(conn, None)
        if self.logins is not None and session is None:  # no /ws gets through without one
            await conn.close(1008, "log in first")
            return
        if len(self._clients) >= self.limits.max_clients:
            await conn.close(1013, self.limits.too_many)
            return
        client = WebClient(conn, session, self.limits.client_queue)
        self._clients.add(client)
        try:
            async with asyncio.TaskGroup() as group:
                pump = group.create_task(client.pump(), name="browser-pump")
                closer = group.create_task(client.close_when_ended(), name="browser-end")
                await self.app.on_connect(client)
                await self._read(client)
                pump.cancel()
                closer.cancel()
        except* ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            await self.app.on_disconnect(client)

    async def _read(self, client: WebClient) -> None:
        async for data in client.conn:
            if client.session is not None and not self.sessions.valid(client.session):
                await client.conn.close(4001, "session ended")  # logged out or expired
                return
            await self.app.on_message(client, data)


def _capped(cap: ConnectionCap) -> type[ServerConnection]:
    """websockets' server connection, counted against its address's share of `cap` from the
    moment it arrives until it is gone: one over its share is dropped before a byte is read."""

    class CappedConnection(ServerConnection):
        _host: str | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            if cap.open(host):
                self._host = host
            else:
                log.debug("refused a connection from %s: it has its share open", host)
                self.transport.abort()  # the handshake then fails at once, quietly

        def connection_lost(self, exc: Exception | None) -> None:
            if self._host is not None:
                cap.close(self._host)
                self._host = None
            super().connection_lost(exc)

    return CappedConnection


def _name(task: Callable[..., object]) -> str:
    return f"web{getattr(task, '__name__', '-task')}"
