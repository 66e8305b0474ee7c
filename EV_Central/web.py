"""Central's admin web server: JSON read API, health, and the admin WebSocket.

Served by the `websockets` library: process_request answers plain GETs (/healthz, /api/...,
the page), and /ws upgrades to a WebSocket that pushes state and takes admin commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from EV_Central.admin_api import ADMIN_REQUEST, MAX_COMMAND_BYTES, AdminCommand, RegisterCP
from EV_Central.db import session_api
from EV_Central.metrics import render
from EV_Central.registry import ChargingPoint
from EV_Central.service import Central, CentralEvent
from shared.messages import STATE_COLOURS
from shared.web import (
    bound_port,
    error_response,
    json_response,
    response,
    split_path,
    static_response,
)

log = logging.getLogger(__name__)

MAX_CLIENTS = 200
CLIENT_QUEUE = 256


class AdminWeb:
    def __init__(self, central: Central, host: str, port: int) -> None:
        self.central = central
        self.host = host
        self.port = port
        self._server: Server | None = None
        self._clients: dict[ServerConnection, asyncio.Queue[str]] = {}
        self._health_cache: tuple[float, bool] = (0.0, False)
        self._sessions_dirty = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None
        central.cp_listeners.append(self._on_cps_changed)
        central.event_listeners.append(self._on_event)
        central.session_listeners.append(self._sessions_dirty.set)

    async def start(self) -> None:
        self._server = await serve(
            self._ws_handler,
            self.host,
            self.port,
            process_request=self._process_request,
            max_size=MAX_COMMAND_BYTES,
            server_header="EV_Central",
        )
        self.port = bound_port(self._server.sockets, self.port)
        self._refresher = asyncio.create_task(self._refresh(), name="admin-refresh")
        log.info("admin web on http://%s:%d/", self.host, self.port)

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
        if path == "/ws":
            return None  # continue with the WebSocket handshake
        try:
            if path == "/healthz":
                return await self._healthz()
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
            if path in ("/", "/index.html"):
                return static_response("EV_Central", "index.html")
            if path.startswith("/static/"):
                return static_response("EV_Central", path.removeprefix("/static/"))
        except ValueError as exc:
            return error_response(400, str(exc))
        return error_response(404, f"no such resource: {path}")

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
        last_status = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sessions_dirty.wait(), 2.0)
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

    def _on_event(self, event: CentralEvent) -> None:
        if self._clients:
            self._broadcast({"type": "event", "event": event.as_api()})

    async def _ws_handler(self, conn: ServerConnection) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            await conn.close(1013, "too many clients")
            return
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
                    "colours": {state.value: colour for state, colour in STATE_COLOURS.items()},
                },
                ensure_ascii=False,
            )
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                sender = tasks.create_task(self._pump(conn, queue))
                await self._read_commands(conn)
                sender.cancel()
        except* ConnectionClosed:
            pass
        finally:
            self._clients.pop(conn, None)

    async def _pump(self, conn: ServerConnection, queue: asyncio.Queue[str]) -> None:
        while True:
            await conn.send(await queue.get())

    async def _execute(self, command: AdminCommand | RegisterCP) -> dict[str, Any]:
        try:
            if isinstance(command, RegisterCP):
                cp = await self.central.register_cp(
                    command.id, command.location, command.price_eur_kwh, command.max_kw
                )
                return {
                    "type": "result",
                    "ref": command.ref,
                    "ok": True,
                    "detail": f"registered {cp.id}",
                    "cps": [cp.id],
                }
            affected = await self.central.set_service(
                command.target, in_service=command.action == "resume"
            )
        except (LookupError, ValueError) as exc:
            return {"type": "result", "ref": command.ref, "ok": False, "detail": str(exc)}
        return {
            "type": "result",
            "ref": command.ref,
            "ok": True,
            "detail": f"{command.action} {command.target}",
            "cps": affected,
        }

    async def _read_commands(self, conn: ServerConnection) -> None:
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
            reply = await self._execute(command)
            with contextlib.suppress(ConnectionClosed):
                await conn.send(json.dumps(reply))
