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
from importlib import resources
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from EV_Central.admin_api import ADMIN_COMMAND, MAX_COMMAND_BYTES
from EV_Central.db import session_api
from EV_Central.registry import ChargingPoint
from EV_Central.service import Central, CentralEvent
from shared.messages import STATE_COLOURS
from shared.web import error_response, json_response, response, split_path

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
        central.cp_listeners.append(self._on_cps_changed)
        central.event_listeners.append(self._on_event)

    async def start(self) -> None:
        self._server = await serve(
            self._ws_handler,
            self.host,
            self.port,
            process_request=self._process_request,
            max_size=MAX_COMMAND_BYTES,
            server_header="EV_Central",
        )
        for sock in self._server.sockets:
            self.port = sock.getsockname()[1]
            break
        log.info("admin web on http://%s:%d/", self.host, self.port)

    async def stop(self) -> None:
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
            if path == "/api/stats":
                return json_response({"messages": dict(self.central.counters)})
            if path == "/api/events":
                return json_response([e.as_api() for e in self.central.events])
            if path in ("/", "/index.html"):
                return self._page()
        except ValueError as exc:
            return error_response(400, str(exc))
        return error_response(404, f"no such resource: {path}")

    async def _healthz(self) -> Response:
        database = await self.central.db.ping()
        checked_at, broker = self._health_cache
        if time.monotonic() - checked_at > 1.0:
            broker = await self.central.bus.ping()
            self._health_cache = (time.monotonic(), broker)
        ok = database and broker
        monitors = sum(1 for cp in self.central.registry.cps.values() if cp.connected)
        return json_response(
            {
                "status": "ok" if ok else "degraded",
                "broker": broker,
                "database": database,
                "monitors_connected": monitors,
                "websocket_clients": self.client_count,
            },
            200 if ok else 503,
        )

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

    def _page(self) -> Response:
        try:
            body = resources.files("EV_Central").joinpath("static/index.html").read_bytes()
        except FileNotFoundError:
            return error_response(404, "admin page not installed")
        return response(200, body, "text/html; charset=utf-8")

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

    async def _read_commands(self, conn: ServerConnection) -> None:
        async for raw in conn:
            try:
                command = ADMIN_COMMAND.validate_json(raw)
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
            try:
                affected = await self.central.set_service(
                    command.target, in_service=command.action == "resume"
                )
            except LookupError as exc:
                reply = {"type": "result", "ref": command.ref, "ok": False, "detail": str(exc)}
            else:
                reply = {
                    "type": "result",
                    "ref": command.ref,
                    "ok": True,
                    "detail": f"{command.action} {command.target}",
                    "cps": affected,
                }
            with contextlib.suppress(ConnectionClosed):
                await conn.send(json.dumps(reply))
