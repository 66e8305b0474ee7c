"""Browser sessions for the dashboards' web shell (shared/webshell.py), without I/O.

The flow (docs/web-auth.md), the same on Central's admin web and the driver dashboard:

1. the page opens a WebSocket on /login and sends `{"type": "login", "user", "password"}`;
   the server checks the password and answers with a one-time grant (30 s, single use);
2. the page calls `GET /session?grant=CODE`: the answer sets the session cookie (random token,
   HttpOnly, SameSite=Strict), which no script in the page can read;
3. the page opens /ws: the server accepts the upgrade only with a live session cookie and an
   allowed Origin, and binds the session's user and role to the connection.

The `websockets` server parses only GET, which is why the cookie is set by a GET exchange and
not by the login itself. Tokens are looked up by their SHA-256, so a lookup never compares a
secret byte by byte; the server keeps no token, only its digest.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from websockets.datastructures import Headers
from websockets.http11 import Response

from shared.messages import Identifier, decode
from shared.settings import EnvArgumentParser, seconds
from shared.web import error_response, response

DEFAULT_TTL = 8 * 3600.0  # a session lasts a working day at most
DEFAULT_IDLE = 1800.0  # and ends after half an hour without any use
GRANT_TTL = 30.0
MAX_SESSIONS = 10_000
MAX_GRANTS = 1_000
MAX_LOGIN_BYTES = 1024

TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")

Role = Literal["driver", "admin"]


def digest(secret: str) -> str:
    """The key a token or grant is kept under: its SHA-256, never the secret itself."""
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


@dataclass
class WebSession:
    """One logged-in browser (or `ctl`): who, with which role, until when."""

    key: str  # digest of the token: names the session in logs and maps without the secret
    user_id: str
    role: str
    created_at: float
    expires_at: float  # absolute end, whatever the activity
    last_seen: float

    def as_api(self, now: float) -> dict[str, Any]:
        return {
            "user": self.user_id,
            "role": self.role,
            "expires_in": max(0, round(self.expires_at - now)),
        }


@dataclass(frozen=True)
class _Grant:
    user_id: str
    role: str
    expires_at: float


class SessionStore:
    """Sessions and one-time grants, in memory (a restart logs everybody out).

    `clock` is monotonic time; tests pass their own. A service that keeps sessions elsewhere
    too (Central with --ha: its database, replicated to the standby) sets `changed`, which is
    told of every session made (the session) and ended (None, with its key), and gives them
    back with `restore`.
    """

    def __init__(
        self,
        *,
        ttl: float = DEFAULT_TTL,
        idle: float = DEFAULT_IDLE,
        grant_ttl: float = GRANT_TTL,
        max_sessions: int = MAX_SESSIONS,
        max_grants: int = MAX_GRANTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or idle <= 0 or grant_ttl <= 0:
            raise ValueError("session and grant lifetimes must be positive")
        self.ttl = ttl
        self.idle = min(idle, ttl)
        self.grant_ttl = grant_ttl
        self.max_sessions = max_sessions
        self.max_grants = max_grants
        self._clock = clock
        self._sessions: dict[str, WebSession] = {}
        self._grants: dict[str, _Grant] = {}
        self.changed: Callable[[str, WebSession | None], None] | None = None

    def wall_time(self, at: float) -> float:
        """A time of this store's clock as seconds since the epoch."""
        return at - self._clock() + time.time()

    def restore(self, key: str, user_id: str, role: str, expires_at_wall: float) -> None:
        """Take back a session kept elsewhere (its token's digest, its absolute end)."""
        now = self._clock()
        expires_at = expires_at_wall - time.time() + now
        if expires_at > now and len(self._sessions) < self.max_sessions:
            self._sessions[key] = WebSession(key, user_id, role, now, expires_at, now)

    def _ended(self, key: str) -> None:
        if self.changed is not None:
            self.changed(key, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def now(self) -> float:
        return self._clock()

    # --- grants --------------------------------------------------------------------------

    def grant(self, user_id: str, role: str) -> str:
        """A one-time code that `redeem` turns into a session for `user_id`."""
        now = self._clock()
        if len(self._grants) >= self.max_grants:
            self._grants = {k: g for k, g in self._grants.items() if g.expires_at > now}
            while len(self._grants) >= self.max_grants:  # the oldest make room
                del self._grants[next(iter(self._grants))]
        code = secrets.token_urlsafe(24)
        self._grants[digest(code)] = _Grant(user_id, role, now + self.grant_ttl)
        return code

    def redeem(self, code: str) -> tuple[str, WebSession] | None:
        """Use a grant (once): the new session's token and the session, or None."""
        if not TOKEN_PATTERN.match(code):
            return None
        found = self._grants.pop(digest(code), None)
        now = self._clock()
        if found is None or found.expires_at <= now:
            return None
        return self.create(found.user_id, found.role)

    # --- sessions ------------------------------------------------------------------------

    def create(self, user_id: str, role: str) -> tuple[str, WebSession]:
        """A new session; returns its token (shown once, to be put in a cookie)."""
        now = self._clock()
        if len(self._sessions) >= self.max_sessions:
            self.prune()
            if len(self._sessions) >= self.max_sessions:
                idlest = min(self._sessions.values(), key=lambda s: s.last_seen)
                del self._sessions[idlest.key]
                self._ended(idlest.key)
        token = secrets.token_urlsafe(32)
        session = WebSession(
            key=digest(token),
            user_id=user_id,
            role=role,
            created_at=now,
            expires_at=now + self.ttl,
            last_seen=now,
        )
        self._sessions[session.key] = session
        if self.changed is not None:
            self.changed(session.key, session)
        return token, session

    def get(self, token: str | None) -> WebSession | None:
        """The live session of `token` (and mark it used), or None."""
        if not token or not TOKEN_PATTERN.match(token):
            return None
        session = self._sessions.get(digest(token))
        if session is None or not self.valid(session):
            return None
        session.last_seen = self._clock()
        return session

    def valid(self, session: WebSession) -> bool:
        """True while `session` is in the store and neither expired nor idle too long."""
        now = self._clock()
        if self._sessions.get(session.key) is not session:
            return False
        if now >= session.expires_at or now - session.last_seen >= self.idle:
            del self._sessions[session.key]
            self._ended(session.key)
            return False
        return True

    def touch(self, session: WebSession) -> None:
        """Count an open connection as use (it keeps an idle session alive)."""
        if self.valid(session):
            session.last_seen = self._clock()

    def end(self, token: str | None) -> WebSession | None:
        """Log out: forget the session of `token`; return it when there was one."""
        if not token or not TOKEN_PATTERN.match(token):
            return None
        ended = self._sessions.pop(digest(token), None)
        if ended is not None:
            self._ended(ended.key)
        return ended

    def end_user(self, user_id: str) -> int:
        """Forget every session of `user_id`; return how many there were."""
        keys = [k for k, s in self._sessions.items() if s.user_id == user_id]
        for key in keys:
            del self._sessions[key]
            self._ended(key)
        return len(keys)

    def prune(self) -> int:
        """Forget expired sessions and grants; return how many sessions went."""
        now = self._clock()
        self._grants = {k: g for k, g in self._grants.items() if g.expires_at > now}
        gone = [
            k
            for k, s in self._sessions.items()
            if now >= s.expires_at or now - s.last_seen >= self.idle
        ]
        for key in gone:
            del self._sessions[key]
            self._ended(key)
        return len(gone)


# --- cookies -----------------------------------------------------------------------------


def session_cookie(name: str, token: str, max_age: int, secure: bool) -> str:
    """The Set-Cookie value that hands a session token to the browser, out of scripts' reach."""
    cookie = f"{name}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max(0, int(max_age))}"
    return cookie + ("; Secure" if secure else "")


def clear_cookie(name: str, secure: bool) -> str:
    """The Set-Cookie value that makes the browser forget the session cookie."""
    return session_cookie(name, "", 0, secure)


def cookie_value(headers: Headers, name: str) -> str | None:
    """The value of cookie `name` in the request's Cookie header(s), or None."""
    for header in headers.get_all("Cookie"):
        for part in header.split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                return value.strip().strip('"')
    return None


# --- Origin ------------------------------------------------------------------------------

DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_origin(value: str) -> str:
    """`scheme://host:port` of an origin, lower-case, with the port always written.

    Raises ValueError for anything that is not an http(s) origin (a path, user info, "null").
    """
    parts = urlsplit(value.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"not an http(s) origin: {value!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in origin {value!r}") from None
    host = (parts.hostname or "").lower()
    if not host or parts.username or parts.password or parts.path not in ("", "/"):
        raise ValueError(f"not an origin (scheme://host[:port]): {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"not an origin (scheme://host[:port]): {value!r}")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or DEFAULT_PORTS[scheme]}"


def origin_list(value: str) -> list[str]:
    """A flag's value: comma-separated origins, each normalised to scheme://host:port."""
    try:
        return [normalise_origin(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _host_with_port(host_header: str, scheme: str) -> str | None:
    parts = urlsplit(f"{scheme}://{host_header.strip()}")
    try:
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if not host or parts.path or parts.username:
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port or DEFAULT_PORTS[scheme]}"


def origin_allowed(headers: Headers, allowed: set[str] | frozenset[str]) -> bool:
    """May a request with these headers open a WebSocket here?

    Yes without an Origin header (not a browser: `ctl`, scripts, tests), when the Origin is
    this server itself (its host and port are the request's Host), or when it is in `allowed`
    (normalised origins). "null", malformed and foreign origins are refused.
    """
    origins = headers.get_all("Origin")
    if not origins:
        return True
    if len(origins) > 1:
        return False
    try:
        origin = normalise_origin(origins[0])
    except ValueError:
        return False
    if origin in allowed:
        return True
    hosts = headers.get_all("Host")
    if len(hosts) != 1:
        return False
    scheme, _, netloc = origin.partition("://")
    return _host_with_port(hosts[0], scheme) == netloc


# --- the login message (browser or ctl -> server, on /login) --------------------------------


class WebLogin(BaseModel):
    """The one message a client sends on /login."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["login"]
    user: Identifier
    password: Annotated[str, Field(min_length=1, max_length=256)]


WEB_LOGIN: TypeAdapter[WebLogin] = TypeAdapter(WebLogin)


def parse_login(data: str | bytes) -> WebLogin:
    """Validate a login message; raise MessageError with the reason."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return decode(WEB_LOGIN, raw, MAX_LOGIN_BYTES)


def login_ok(grant: str, user_id: str, role: str) -> dict[str, Any]:
    return {"type": "login_result", "ok": True, "grant": grant, "user": user_id, "role": role}


def login_refused(reason: str, retry_after: float | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"type": "login_result", "ok": False, "reason": reason}
    if retry_after is not None:
        answer["retry_after"] = max(1, round(retry_after))
    return answer


# --- the pieces every web server with logins shares ------------------------------------------


def redeem_response(
    store: SessionStore, grant: str, cookie: str, secure: bool
) -> tuple[Response, WebSession | None]:
    """GET /session?grant=CODE: the answer that sets the session cookie, and the session."""
    redeemed = store.redeem(grant)
    if redeemed is None:
        return error_response(400, "unknown, used or expired grant; log in again"), None
    token, session = redeemed
    answer = response(204, b"", "text/plain; charset=utf-8")
    answer.headers["Set-Cookie"] = session_cookie(cookie, token, int(store.ttl), secure)
    return answer, session


def logout_response(cookie: str, secure: bool) -> Response:
    """GET /logout: the answer that makes the browser forget its session cookie."""
    answer = response(204, b"", "text/plain; charset=utf-8")
    answer.headers["Set-Cookie"] = clear_cookie(cookie, secure)
    return answer


def add_session_options(parser: EnvArgumentParser, pages: str) -> None:
    """--session-ttl and --allowed-origin, for a server whose `pages` people log in to."""
    parser.add_option(
        "--session-ttl",
        type=seconds,
        default=8 * 3600.0,
        metavar="S",
        help=f"seconds a login to {pages} lasts at most",
    )
    parser.add_option(
        "--allowed-origin",
        type=origin_list,
        action="extend",
        default=[],
        metavar="ORIGIN",
        help=f"another origin (scheme://host:port) whose pages may use {pages}' WebSocket; "
        "repeatable or comma-separated (default: the page's own origin only)",
    )
