"""How the registry reaches Central: its admin web, as `ctl` does (EV_Central/ctl.py).

The registry keeps no records and writes no database: Central stays the one owner of its
SQLite file. An admin's login is Central's (the same accounts, and the same slowing down and
blocking of sources that guess); the bearer token the registry hands out is the token of the
admin's session at Central, and every call sends one admin command over Central's admin
WebSocket with that session. Central checks the session and the role, carries out the command
and audits it, naming the registry's HTTP caller ("CALLER via REGISTRY"). A CP's enrolment
needs no session: it goes to Central's public /enrol WebSocket with the CP's one-time token.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

from pydantic import BaseModel, ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from EV_Central.admin_api import ADMIN_COOKIE, ENROL_PATH, EnrolRequest, EnrolResult
from EV_Central.ctl import LoginRefused, admin_login, send_command
from shared.errors import EVError
from shared.tls import describe_failure
from shared.websession import TOKEN_PATTERN

MAX_ANSWER = 64 * 1024  # bytes of Central's answer on /enrol
# What "Central did not answer" looks like (TimeoutError and ConnectionError are OSErrors).
UNREACHABLE = (OSError, WebSocketException)

__all__ = ["CentralClient", "CentralUnreachable", "LoginRefused", "SessionRefused"]


class CentralUnreachable(EVError):
    """Central did not answer (down, wrong address, TLS refused, too slow)."""


class SessionRefused(EVError):
    """Central refused the admin session (ended, expired, or not an admin's): `status` is
    its HTTP answer, 401 or 403."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class CentralClient:
    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None, timeout: float) -> None:
        self.host, self.port, self.tls, self.timeout = host, port, tls, timeout

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def login(self, user: str, password: str) -> str:
        """Log in at Central; the new session's token. LoginRefused when Central says no."""
        try:
            cookie = await admin_login(self.host, self.port, user, password, self.timeout, self.tls)
        except UNREACHABLE as exc:
            raise self._unreachable(exc) from None
        return cookie.partition("=")[2]

    async def command(self, token: str, command: BaseModel) -> dict[str, Any]:
        """Send one admin command with the session of `token`; Central's result."""
        if not TOKEN_PATTERN.match(token):  # not one of Central's session tokens
            raise SessionRefused(401, "not a session token")
        cookie = f"{ADMIN_COOKIE}={token}"
        try:
            return await send_command(self.host, self.port, command, self.timeout, cookie, self.tls)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                why = "log in first" if status == 401 else "for admins only"
                raise SessionRefused(status, why) from None
            raise CentralUnreachable(f"Central answered HTTP {status}") from None
        except UNREACHABLE as exc:
            raise self._unreachable(exc) from None

    async def enrol(self, request: EnrolRequest) -> EnrolResult:
        """Redeem a CP's one-time token at Central's /enrol (no session needed)."""
        scheme = "wss" if self.tls else "ws"
        try:
            async with asyncio.timeout(self.timeout):
                async with connect(
                    f"{scheme}://{self.address}{ENROL_PATH}",
                    open_timeout=self.timeout,
                    max_size=MAX_ANSWER,
                    ssl=self.tls,
                ) as ws:
                    await ws.send(request.model_dump_json())
                    raw = await ws.recv()
            return EnrolResult.model_validate(json.loads(raw))
        except (ValidationError, ValueError):
            raise CentralUnreachable("Central answered the enrolment with nonsense") from None
        except UNREACHABLE as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: BaseException) -> CentralUnreachable:
        reason = describe_failure(exc) or str(exc) or "timed out"
        return CentralUnreachable(f"cannot reach Central at {self.address}: {reason}")
