"""EV_W's connection to Central: logged in as the weather account, on the admin WebSocket.

The login is the admin page's and `ctl`'s (docs/web-auth.md; EV_Central/ctl.py does it): a
password on /login, the grant exchanged for a session cookie, then /ws with that cookie. A
session of role "weather" may send only the messages of shared/weather_api.py; Central pushes
it nothing but the results, one per message, matched here by `ref`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
from types import TracebackType
from typing import Any

from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection, connect

from EV_Central.ctl import admin_login
from shared.errors import EVError

MAX_RESULT_BYTES = 1024 * 1024  # the list of places of a very large network


class CentralRefused(EVError):
    """Central answered a message with ok: false."""


class CentralLink:
    """One logged-in /ws connection; `request` sends a message and returns its result."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str,
        *,
        wait_s: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = f"{host}:{port}"
        self._host, self._port = host, port
        self._user, self._password = user, password
        self._wait_s = wait_s
        self._tls = tls
        self._ws: ClientConnection | None = None
        self._refs = itertools.count(1)

    async def __aenter__(self) -> CentralLink:
        cookie = await admin_login(
            self._host, self._port, self._user, self._password, self._wait_s, self._tls
        )
        scheme = "wss" if self._tls else "ws"
        self._ws = await connect(
            f"{scheme}://{self.address}/ws",
            open_timeout=self._wait_s,
            additional_headers={"Cookie": cookie},
            max_size=MAX_RESULT_BYTES,
            ssl=self._tls,
        )
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    def next_ref(self) -> str:
        return f"w{next(self._refs)}"

    async def request(self, message: BaseModel) -> dict[str, Any]:
        """Send `message` (its `ref` set); its result, or CentralRefused with Central's reason."""
        ws = self._ws
        if ws is None:
            raise RuntimeError("not connected")
        ref = getattr(message, "ref", "")
        await ws.send(message.model_dump_json())
        async with asyncio.timeout(self._wait_s):
            while True:
                reply = json.loads(await ws.recv())
                if isinstance(reply, dict) and reply.get("type") == "result":
                    if reply.get("ref", ref) == ref:
                        break
        if not reply.get("ok"):
            raise CentralRefused(str(reply.get("detail") or "refused"))
        return reply
