"""What a dashboard plugs into the shared web shell (shared/webshell.py), and how it sees a browser.

`WebApp` is the dashboard's side: what a browser gets on connecting, what its messages do, and
the login hooks (how a login is checked, what backs a session, auditing refusals and logouts).
`Logins` turns the login flow on (docs/web-auth.md); `Route` adds a GET route for some roles;
`Listen` and `Limits` say where the server listens and how much it takes. `WebClient` is one
browser's WebSocket with its bounded queue of pushes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypedDict

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Response

from shared.kafka_access import KafkaLogin
from shared.settings import EnvArgumentParser, take_kafka_login
from shared.tls import optional_server_context
from shared.websession import WebLogin, WebSession

log = logging.getLogger(__name__)


# --- what a dashboard plugs in --------------------------------------------------------------


class LoginAnswer(Protocol):
    """The outcome of one login check (EV_Central.auth.LoginOutcome is one)."""

    @property
    def ok(self) -> bool: ...
    @property
    def user_id(self) -> str: ...
    @property
    def role(self) -> str | None: ...
    @property
    def reason(self) -> str: ...
    @property
    def retry_after(self) -> float | None: ...


@dataclass(frozen=True)
class LoginOutcome:
    """A LoginAnswer: `role` is the account's when ok; `retry_after` seconds while locked."""

    ok: bool
    user_id: str = ""
    role: str | None = None
    reason: str = ""
    retry_after: float | None = None


@dataclass(frozen=True)
class Refusal:
    """A refused WebSocket upgrade, as the audit hook gets it."""

    peer: str
    path: str
    why: str
    actor: str = ""


@dataclass(frozen=True)
class Listen:
    """Where the shell listens, and its TLS context (HTTPS and WSS when set, docs/tls.md)."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None


PER_ADDRESS = 32  # connections open at once from one address, by default


def add_connection_options(parser: EnvArgumentParser) -> None:
    """--max-connections-per-address (EV_MAX_CONNECTIONS_PER_ADDRESS) of a web server."""
    parser.add_option(
        "--max-connections-per-address",
        type=connection_share,
        default=PER_ADDRESS,
        help="connections open at once from one address (HTTP, WebSocket, and those still "
        "in their handshake, which has 10 s); more are refused on arrival",
    )


def connection_share(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 10_000:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 10000, got {value!r}")
    return int(value)


class ServerFields(TypedDict):
    """The settings every dashboard takes from the same flags (add_server_options,
    add_connection_options, add_kafka_login_options and add_common_options): its broker and
    login there, where it listens, TLS, how many connections an address may open, logs."""

    broker: str
    kafka: KafkaLogin | None
    http_port: int
    listen_host: str
    log_level: str
    log_json: bool
    tls_cert: str | None
    tls_key: str | None
    max_connections_per_address: int


def server_fields(args: argparse.Namespace) -> ServerFields:
    """Those settings from parsed flags; bad TLS files are a ConfigError now, not later."""
    tls_cert, tls_key = args.tls_cert or None, args.tls_key or None
    optional_server_context(tls_cert, tls_key)
    return {
        "broker": args.broker,
        "kafka": take_kafka_login(args),
        "http_port": args.http_port,
        "listen_host": args.listen_host,
        "log_level": args.log_level,
        "log_json": args.log_json,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "max_connections_per_address": args.max_connections_per_address,
    }


@dataclass(frozen=True)
class Limits:
    max_message: int  # bytes of one WebSocket message from a browser
    max_clients: int  # open /ws at once; more are closed with 1013 `too_many`
    client_queue: int  # pushes waiting for one browser before it is disconnected
    max_queue: int = 16  # messages read ahead from one browser (websockets' max_queue)
    too_many: str = "too many clients"
    per_address: int = PER_ADDRESS  # connections open at once from one address, of any kind


@dataclass(frozen=True)
class Logins:
    """Logins on: `cookie` names the session, sessions of `ws_roles` may open /ws.

    `what` names the WebSocket in refusals ("the admin WebSocket", "the dashboard")."""

    cookie: str
    ws_roles: frozenset[str]
    what: str
    session_ttl: float
    allowed_origins: Iterable[str] = ()  # normalised (shared.websession.origin_list)
    who: str = ""  # who may open it, in refusals ("admins and the weather service")

    @property
    def origin_forbidden(self) -> str:
        return f"this page's origin may not use {self.what}"

    @property
    def role_forbidden(self) -> str:
        return f"{self.what} is for {self.who or ' and '.join(sorted(self.ws_roles)) + 's'} only"


@dataclass(frozen=True)
class HttpRequest:
    path: str
    query: dict[str, str]
    headers: Headers
    peer: str
    session: WebSession | None  # checked against the route's roles already


@dataclass(frozen=True)
class Route:
    """An extra GET route: public when `roles` is None, else for sessions of those roles."""

    handler: Callable[[HttpRequest], Awaitable[Response]]
    roles: frozenset[str] | None = None
    forbidden: str = "not for your role"  # the 403 text for another role


class WebApp(ABC):
    """What a dashboard plugs into the shell: its WebSocket's behaviour and its login hooks."""

    web_name: ClassVar[str]  # for the logs: "admin web", "driver dashboard", ...
    static_package: ClassVar[str]  # whose static/ folder (and index.html) is served
    server_header: ClassVar[str]
    # Public WebSocket paths that take one message and give one answer, as /login does (the
    # admin web's /enrol): they share the caps of logins, and no session is needed.
    one_shot_paths: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    async def on_connect(self, client: WebClient) -> None:
        """A browser opened /ws: push what it needs first (a snapshot)."""

    @abstractmethod
    async def on_message(self, client: WebClient, data: str | bytes) -> None:
        """One message from a browser (its session, if any, is still live)."""

    async def on_disconnect(self, client: WebClient) -> None:
        """A browser's /ws closed."""
        return None  # nothing by default

    async def check_login(self, form: WebLogin, peer: str) -> LoginAnswer:
        """Check one login (only asked when the shell has Logins)."""
        return LoginOutcome(False, form.user, reason="no logins here")

    async def one_shot(self, path: str, data: str | bytes, peer: str) -> Mapping[str, Any]:
        """The answer to the one message of a one-shot path (`one_shot_paths`)."""
        return {"type": "error", "detail": f"{path} takes nothing here"}

    async def session_made(self, session: WebSession) -> None:
        """A login became a session; its cookie goes out when this returns."""
        return None  # kept in memory only, by default

    def session_backed(self, session: WebSession) -> bool:
        """False when what backs a user's sessions is gone (they are then ended)."""
        return True

    async def on_refusal(self, refusal: Refusal) -> None:
        """A WebSocket upgrade was refused (reported once per client host in 10 s)."""
        return None  # nothing by default

    async def on_logout(self, session: WebSession, peer: str) -> None:
        """`session` logged out from `peer`."""
        return None  # nothing by default


# --- one browser ------------------------------------------------------------------------------


class WebClient:
    """One browser's WebSocket: its session (with Logins) and a bounded queue of pushes."""

    def __init__(self, conn: ServerConnection, session: WebSession | None, size: int) -> None:
        self.conn = conn
        self.session = session
        self.peer = peer_of(conn)
        self.ended = asyncio.Event()  # set when the session ends: the connection closes
        # False for a client that is not a screen (a service on the admin WebSocket): it gets
        # answers to what it sends, never the broadcasts.
        self.watching = True
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=size)
        self._dropped = False

    def push(self, payload: Mapping[str, Any]) -> None:
        self.send_text(dumps(payload))

    def send_text(self, text: str) -> None:
        """Queue a message; a browser that lets its queue fill up is disconnected."""
        if self._dropped or self.ended.is_set():
            return
        if self._queue.full():
            log.warning("browser %s too slow; closing its connection", self.peer)
            self._dropped = True
            self.conn.transport.abort()
            return
        self._queue.put_nowait(text)

    async def pump(self) -> None:
        while True:
            await self.conn.send(await self._queue.get())

    async def close_when_ended(self) -> None:
        await self.ended.wait()
        await self.conn.close(4001, "session ended")


def dumps(payload: Mapping[str, Any]) -> str:
    """A push as compact JSON text (non-ASCII kept as is)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def host_of(peer: str) -> str:
    """The host of a "host:port" peer: where a client is, whatever port it used this time."""
    return peer.rpartition(":")[0] or peer


def peer_of(conn: ServerConnection) -> str:
    """The client's address as "host:port" (for logs and the audit log)."""
    address = conn.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address or "?")
