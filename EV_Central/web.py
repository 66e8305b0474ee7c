"""Central's admin web server: JSON read API, health, and the admin WebSocket.

Served by the `websockets` library: process_request answers plain GETs (/healthz, /api/...,
the page), and /ws upgrades to a WebSocket that pushes state and takes admin commands.

People log in first (docs/web-auth.md): a WebSocket on /login checks the password
(EV_Central.auth) and answers a one-time grant; GET /session?grant= turns it into an HttpOnly,
SameSite=Strict session cookie; /api/... and /ws need that cookie. An admin may do everything;
a driver may read only its own sessions. /healthz and /metrics stay public for healthchecks
and Prometheus (they carry no personal data), as do the page and its static files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import weakref
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from EV_Central.admin_api import (
    ADMIN_COOKIE,
    ADMIN_REQUEST,
    MAX_COMMAND_BYTES,
    AdminCommand,
    AdminRequest,
    RegisterCP,
    ResetSecret,
    RevokeKey,
)
from EV_Central.db import session_api
from EV_Central.metrics import render
from EV_Central.registry import ChargingPoint
from EV_Central.service import Central, CentralEvent
from shared.errors import MessageError
from shared.messages import STATE_COLOURS
from shared.tls import HANDSHAKE_TIMEOUT
from shared.web import (
    bound_port,
    error_response,
    json_response,
    response,
    split_path,
    static_response,
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

# Refused WebSockets are audited at most once per client host in this many seconds.
REFUSAL_AUDIT_INTERVAL = 10.0
MAX_CLIENTS = 200
CLIENT_QUEUE = 256
COOKIE = ADMIN_COOKIE
LOGIN_WAIT = 30.0  # seconds a /login connection may take to send its one message
MAX_LOGINS = 100  # /login connections open at once
# What a driver's session may read on the admin web: its own sessions, and who it is.
DRIVER_PATHS = ("/api/sessions", "/api/whoami")


class AdminWeb:
    def __init__(
        self, central: Central, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.central = central
        self.host = host
        self.port = port
        self.ssl_context = ssl_context  # HTTPS and WSS when set (docs/tls.md)
        self._server: Server | None = None
        self._clients: dict[ServerConnection, asyncio.Queue[str]] = {}
        self._health_cache: tuple[float, bool] = (0.0, False)
        self._sessions_dirty = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None
        self.sessions = SessionStore(ttl=central.settings.session_ttl)
        self.allowed_origins = frozenset(central.settings.allowed_origin)
        # The session each /ws upgrade was accepted with, from the handshake to the handler.
        self._upgrades: weakref.WeakKeyDictionary[ServerConnection, WebSession] = (
            weakref.WeakKeyDictionary()
        )
        # Each open /ws: its session, and an event set when that session ends.
        self._sessions_of: dict[ServerConnection, tuple[WebSession, asyncio.Event]] = {}
        self._logins = 0
        self._audit_tasks: set[asyncio.Task[None]] = set()
        self._refusals_audited: dict[str, float] = {}
        central.cp_listeners.append(self._on_cps_changed)
        central.event_listeners.append(self._on_event)
        central.session_listeners.append(self._sessions_dirty.set)
        central.audit.listeners.append(self._on_audit)

    async def start(self) -> None:
        self._server = await serve(
            self._ws_handler,
            self.host,
            self.port,
            process_request=self._process_request,
            max_size=MAX_COMMAND_BYTES,
            server_header="EV_Central",
            ssl=self.ssl_context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.ssl_context else None,
        )
        self.port = bound_port(self._server.sockets, self.port)
        self._refresher = asyncio.create_task(self._refresh(), name="admin-refresh")
        scheme = "https" if self.tls else "http"
        log.info("admin web on %s://%s:%d/", scheme, self.host, self.port)

    @property
    def tls(self) -> bool:
        """True when the admin web is served over TLS (its cookies are then Secure)."""
        return self.ssl_context is not None

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # --- HTTP ---------------------------------------------------------------------------

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path, query = split_path(request.path)
        if path in ("/ws", "/login"):
            return self._check_upgrade(conn, request, path)
        try:
            if path == "/healthz":
                return await self._healthz()
            if path == "/session":
                return self._redeem(conn, query)
            if path == "/logout":
                return self._logout(conn, request)
            if path.startswith("/api/"):
                allowed = self._authorise(request, path, query)
                if isinstance(allowed, Response):
                    return allowed
                query = allowed
            if path == "/api/whoami":
                session = self.sessions.get(cookie_value(request.headers, COOKIE))
                assert session is not None  # checked by _authorise
                return json_response(session.as_api(self.sessions.now()))
            if path == "/api/cps":
                return json_response([cp.as_api() for cp in self.central.registry.sorted()])
            if path == "/api/sessions":
                return await self._sessions(query)
            if path == "/metrics":
                return await self._metrics()
            if path == "/api/stats":
                return json_response({"messages": dict(self.central.counters)})
            if path == "/api/events":
                return json_response([e.as_api() for e in self.central.events])
            if path == "/api/drivers":
                return json_response(await self._drivers())
            if path == "/api/audit":
                return await self._audit(query)
            if path in ("/", "/index.html"):
                return static_response("EV_Central", "index.html")
            if path.startswith("/static/"):
                return static_response("EV_Central", path.removeprefix("/static/"))
        except ValueError as exc:
            return error_response(400, str(exc))
        return error_response(404, f"no such resource: {path}")

    # --- people: login, session cookie, logout, access rules ----------------------------

    def _check_upgrade(
        self, conn: ServerConnection, request: Request, path: str
    ) -> Response | None:
        """Let a WebSocket handshake go on, or refuse it (bad Origin, no session, no admin)."""
        if not origin_allowed(request.headers, self.allowed_origins):
            log.warning(
                "refused a WebSocket on %s from %s: Origin %r not allowed",
                path,
                _peer(conn),
                request.headers.get("Origin"),
            )
            self._audit_refusal(conn, path, f"Origin {request.headers.get('Origin')!r}")
            return error_response(403, "this page's origin may not use the admin WebSocket")
        if path == "/login":
            if self._logins >= MAX_LOGINS:
                return error_response(503, "too many logins at once; try again in a moment")
            return None
        session = self.sessions.get(cookie_value(request.headers, COOKIE))
        if session is None:
            self._audit_refusal(conn, path, "no session")
            return error_response(401, "log in first")
        if session.role != "admin":
            self._audit_refusal(conn, path, f"role {session.role}", actor=session.user_id)
            return error_response(403, "the admin WebSocket is for admins only")
        self._upgrades[conn] = session
        return None

    def _authorise(
        self, request: Request, path: str, query: dict[str, str]
    ) -> Response | dict[str, str]:
        """The query to answer `path` with for this request's session, or why not (401/403)."""
        session = self.sessions.get(cookie_value(request.headers, COOKIE))
        if session is None:
            return error_response(401, "log in first")
        if session.role == "admin":
            return query
        if path not in DRIVER_PATHS:
            return error_response(403, "admins only")
        if path == "/api/sessions":
            if query.get("driver_id", session.user_id) != session.user_id:
                return error_response(403, "a driver may read only its own sessions")
            return {**query, "driver_id": session.user_id}
        return query

    def _redeem(self, conn: ServerConnection, query: dict[str, str]) -> Response:
        """GET /session?grant=CODE: a grant from /login becomes the session cookie."""
        answer, session = redeem_response(
            self.sessions, query.get("grant", ""), COOKIE, _secure(conn)
        )
        if session is not None:
            log.info(
                "session started for %s (%s) from %s", session.user_id, session.role, _peer(conn)
            )
        return answer

    def _logout(self, conn: ServerConnection, request: Request) -> Response:
        """GET /logout: end the session (and its WebSockets) and clear the cookie."""
        session = self.sessions.end(cookie_value(request.headers, COOKIE))
        if session is not None:
            log.info("%s logged out", session.user_id)
            self._audit_later("logout", "ok", actor=session.user_id, source=_peer(conn))
            self._close_ended()
        return logout_response(COOKIE, _secure(conn))

    def _audit_later(
        self, action: str, outcome: str, *, actor: str = "", source: str = "", detail: str = ""
    ) -> None:
        """Record in the audit log from a synchronous step (the record is written shortly)."""
        record = self.central.audit.record(
            action, outcome, actor=actor, source=source, detail=detail
        )
        task = asyncio.get_running_loop().create_task(record)
        self._audit_tasks.add(task)
        task.add_done_callback(self._audit_tasks.discard)

    def _audit_refusal(
        self, conn: ServerConnection, path: str, why: str, *, actor: str = ""
    ) -> None:
        """A refused WebSocket goes to the audit log, at most once per client host in 10 s."""
        source = _peer(conn)
        host = source.rpartition(":")[0] or source
        now = time.monotonic()
        if now - self._refusals_audited.get(host, -1e9) < REFUSAL_AUDIT_INTERVAL:
            return
        if len(self._refusals_audited) > 10_000:
            self._refusals_audited.clear()
        self._refusals_audited[host] = now
        self._audit_later(
            "ws_rejected", "refused", actor=actor, source=source, detail=f"{path}: {why}"
        )

    async def _serve_login(self, conn: ServerConnection) -> None:
        """One login per /login connection: a message in, a login_result out, closed."""
        self._logins += 1
        try:
            try:
                async with asyncio.timeout(LOGIN_WAIT):
                    raw = await conn.recv()
            except TimeoutError:
                await conn.close(1008, "no login message")
                return
            try:
                form = parse_login(raw)
            except MessageError as exc:
                await conn.send(json.dumps(login_refused(str(exc))))
                return
            outcome = await self.central.people.login(
                form.user, form.password, source=_peer(conn), channel="admin web"
            )
            if outcome.ok and outcome.role is not None:
                grant = self.sessions.grant(outcome.user_id, outcome.role)
                await conn.send(json.dumps(login_ok(grant, outcome.user_id, outcome.role)))
            else:
                await conn.send(json.dumps(login_refused(outcome.reason, outcome.retry_after)))
        finally:
            self._logins -= 1

    def _close_ended(self) -> None:
        """Close the WebSockets whose session ended (logout, expiry); keep the others alive."""
        for conn, (session, ended) in list(self._sessions_of.items()):
            if self.sessions.valid(session):
                self.sessions.touch(session)  # an open panel is in use
            else:
                self._clients.pop(conn, None)
                ended.set()

    async def _status(self) -> dict[str, Any]:
        database = await self.central.db.ping()
        checked_at, broker = self._health_cache
        if time.monotonic() - checked_at > 1.0:
            broker = await self.central.bus.ping()
            self._health_cache = (time.monotonic(), broker)
        ok = database and broker
        monitors = sum(1 for cp in self.central.registry.cps.values() if cp.connected)
        return {
            "status": "ok" if ok else "degraded",
            "broker": broker,
            "database": database,
            "monitors_connected": monitors,
            "cps_registered": len(self.central.registry.cps),
            "websocket_clients": self.client_count,
        }

    async def _healthz(self) -> Response:
        status = await self._status()
        return json_response(status, 200 if status["status"] == "ok" else 503)

    async def _metrics(self) -> Response:
        """Prometheus text format: CPs, sessions, messages, handler latency, lag, clients."""
        central = self.central
        cps_by_state = {state.value: 0 for state in STATE_COLOURS}
        monitors = 0
        for cp in central.registry.cps.values():
            cps_by_state[cp.state.value] += 1
            monitors += cp.connected
        sessions = {
            row[0]: int(row[1])
            for row in await central.db.read(
                "SELECT status, COUNT(*) FROM sessions GROUP BY status"
            )
        }
        outbox = await central.db.read("SELECT COUNT(*) FROM outbox")
        text = render(
            cps_by_state=cps_by_state,
            sessions_by_status=sessions,
            messages=dict(central.counters),
            handler_seconds=dict(central.handler_seconds),
            consumer_lag=dict(central.consumer_lag),
            monitors_connected=monitors,
            websocket_clients=self.client_count,
            outbox_pending=int(outbox[0][0]) if outbox else None,
            loop_lag=central.loop_lag,
            stage_seconds=dict(central.stage_seconds),
            gc_pauses=central.gc_pauses.by_generation,
        )
        return response(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    async def _drivers(self) -> list[dict[str, Any]]:
        rows = await self.central.db.read(
            "SELECT id, balance_cents FROM users WHERE role = 'driver' ORDER BY id"
        )
        return [{"id": row["id"], "balance_eur": row["balance_cents"] / 100} for row in rows]

    async def _recent_sessions(self) -> list[dict[str, Any]]:
        rows = await self.central.db.read(
            "SELECT * FROM sessions ORDER BY requested_at DESC, rowid DESC LIMIT 40"
        )
        return [session_api(row) for row in rows]

    async def _refresh(self) -> None:
        """Push sessions and balances when they change, and the system status every 2 s."""
        last_status = last_prune = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sessions_dirty.wait(), 2.0)
            self._close_ended()
            if time.monotonic() - last_prune >= 60.0:
                last_prune = time.monotonic()
                self.sessions.prune()
            if not self._clients:
                self._sessions_dirty.clear()
                continue
            try:
                if self._sessions_dirty.is_set():
                    await asyncio.sleep(0.1)  # coalesce a burst of changes
                    self._sessions_dirty.clear()
                    self._broadcast({"type": "sessions", "sessions": await self._recent_sessions()})
                    self._broadcast({"type": "drivers", "drivers": await self._drivers()})
                if time.monotonic() - last_status >= 2.0:
                    last_status = time.monotonic()
                    self._broadcast({"type": "status", "status": await self._status()})
            except Exception:
                log.exception("admin refresh failed")

    async def _audit(self, query: dict[str, str]) -> Response:
        """The audit log, newest first (docs/audit.md)."""
        limit_text = query.get("limit", "100")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
            raise ValueError("limit must be a number from 1 to 1000")
        return json_response(await self.central.audit.recent(int(limit_text)))

    async def _sessions(self, query: dict[str, str]) -> Response:
        limit_text = query.get("limit", "100")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
            raise ValueError("limit must be a number from 1 to 1000")
        params: list[Any] = []
        where = ""
        if "driver_id" in query:
            where = "WHERE driver_id = ?"
            params.append(query["driver_id"])
        rows = await self.central.db.read(
            f"SELECT * FROM sessions {where} ORDER BY requested_at DESC, rowid DESC LIMIT ?",
            [*params, int(limit_text)],
        )
        return json_response([session_api(row) for row in rows])

    # --- WebSocket ----------------------------------------------------------------------

    def _broadcast(self, payload: dict[str, Any]) -> None:
        text = json.dumps(payload, ensure_ascii=False)
        for conn, queue in list(self._clients.items()):
            if queue.full():
                log.warning("admin client %s too slow; closing it", conn.remote_address)
                self._clients.pop(conn, None)
                conn.transport.abort()
            else:
                queue.put_nowait(text)

    def _on_cps_changed(self, cps: list[ChargingPoint]) -> None:
        if self._clients:
            self._broadcast({"type": "cps", "cps": [cp.as_api() for cp in cps]})

    def _on_audit(self, entry: dict[str, Any]) -> None:
        if self._clients:
            self._broadcast({"type": "audit", "entry": entry})

    def _on_event(self, event: CentralEvent) -> None:
        if self._clients:
            self._broadcast({"type": "event", "event": event.as_api()})

    async def _ws_handler(self, conn: ServerConnection) -> None:
        if conn.request is not None and split_path(conn.request.path)[0] == "/login":
            with contextlib.suppress(ConnectionClosed):
                await self._serve_login(conn)
            return
        session = self._upgrades.pop(conn, None)
        if session is None:  # the handshake let no /ws through without a session
            await conn.close(1008, "log in first")
            return
        if len(self._clients) >= MAX_CLIENTS:
            await conn.close(1013, "too many clients")
            return
        ended = asyncio.Event()
        self._sessions_of[conn] = (session, ended)
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=CLIENT_QUEUE)
        self._clients[conn] = queue
        queue.put_nowait(
            json.dumps(
                {
                    "type": "snapshot",
                    "cps": [cp.as_api() for cp in self.central.registry.sorted()],
                    "events": [e.as_api() for e in self.central.events],
                    "sessions": await self._recent_sessions(),
                    "drivers": await self._drivers(),
                    "status": await self._status(),
                    "audit": await self.central.audit.recent(100),
                    "colours": {state.value: colour for state, colour in STATE_COLOURS.items()},
                },
                ensure_ascii=False,
            )
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                sender = tasks.create_task(self._pump(conn, queue))
                watcher = tasks.create_task(self._close_when(conn, ended))
                await self._read_commands(conn, session)
                sender.cancel()
                watcher.cancel()
        except* ConnectionClosed:
            pass
        finally:
            self._clients.pop(conn, None)
            self._sessions_of.pop(conn, None)

    @staticmethod
    async def _close_when(conn: ServerConnection, ended: asyncio.Event) -> None:
        await ended.wait()
        await conn.close(4001, "session ended")

    async def _pump(self, conn: ServerConnection, queue: asyncio.Queue[str]) -> None:
        while True:
            await conn.send(await queue.get())

    async def _execute(
        self, command: AdminRequest, session: WebSession, source: str
    ) -> dict[str, Any]:
        """Run one admin command for `session`'s user; audit it; build its result.

        A secret (register_cp, reset_secret) goes only into this result, to this connection,
        never into the audit log or a broadcast.
        """
        result: dict[str, Any] = {"type": "result", "ref": command.ref, "ok": True}
        match command:
            case RegisterCP():
                action, target = "cp_registered", command.id
                detail = f"{command.id} at {command.location}"
            case RevokeKey():
                action, target, detail = "key_revoked", command.target, command.target
            case ResetSecret():
                action, target, detail = "secret_reset", command.target, command.target
            case AdminCommand():
                action, target, detail = command.action, command.target, command.target
        try:
            match command:
                case RegisterCP():
                    cp, secret = await self.central.register_cp(
                        command.id, command.location, command.price_eur_kwh, command.max_kw
                    )
                    result.update(detail=f"registered {cp.id}", cps=[cp.id], secret=secret)
                case RevokeKey():
                    await self.central.revoke_key(command.target)
                    result.update(detail=f"revoked the keys of {target}", cps=[target])
                case ResetSecret():
                    secret = await self.central.reset_secret(command.target)
                    result.update(detail=f"new secret for {target}", cps=[target], secret=secret)
                case AdminCommand():
                    affected = await self.central.set_service(
                        command.target, in_service=command.action == "resume"
                    )
                    result.update(detail=f"{command.action} {command.target}", cps=affected)
        except (LookupError, ValueError) as exc:
            await self._record(action, "failed", session, source, f"{detail}: {exc}")
            return {"type": "result", "ref": command.ref, "ok": False, "detail": str(exc)}
        await self._record(action, "ok", session, source, detail)
        return result

    async def _record(
        self, action: str, outcome: str, session: WebSession, source: str, detail: str
    ) -> None:
        try:
            await self.central.audit.record(
                action, outcome, actor=session.user_id, source=source, detail=detail
            )
        except Exception:  # the command happened; a failing audit must not hide that
            log.exception("could not audit %s by %s", action, session.user_id)

    async def _read_commands(self, conn: ServerConnection, session: WebSession) -> None:
        async for raw in conn:
            try:
                command = ADMIN_REQUEST.validate_json(raw)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first["loc"]) or "message"
                await conn.send(
                    json.dumps(
                        {
                            "type": "result",
                            "ok": False,
                            "detail": f"invalid command at {where}: {first['msg']}",
                        }
                    )
                )
                continue
            if not self.sessions.valid(session):  # logged out or expired meanwhile
                await conn.close(4001, "session ended")
                break
            reply = await self._execute(command, session, _peer(conn))
            with contextlib.suppress(ConnectionClosed):
                await conn.send(json.dumps(reply))


def _peer(conn: ServerConnection) -> str:
    """The client's address as "host:port" (for logs and the audit log)."""
    address = conn.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address or "?")


def _secure(conn: ServerConnection) -> bool:
    """True when the connection is TLS: the cookie then gets the Secure attribute."""
    return conn.transport.get_extra_info("ssl_object") is not None
