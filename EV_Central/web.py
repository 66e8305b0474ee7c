"""Central's admin web server: JSON read API, health, and the admin WebSocket.

The web side is the shared shell (shared/webshell.py): the page and its static files, the login
flow of docs/web-auth.md (/login, /session, /logout, /api/whoami), the Origin and cookie checks
on /ws, and the pushes. What is the admin web's own is here: a login is checked by Central
(EV_Central.auth) on the channel "admin web"; only admins open /ws; refused upgrades and
logouts go to the audit log; the /api/... routes (an admin may read everything, a driver only
its own sessions); the snapshot a panel gets on connecting; the admin commands; what is pushed.
/healthz and /metrics stay public for healthchecks and Prometheus (they carry no personal
data), as do the page and its static files.

What this reads and does in Central comes through its constructor: the shared `Context`
(store, registry, bus, feed, stats), `CPLinks` for the commands, `PeopleAuth` for logins and the
`AuditLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from websockets.http11 import Response

from EV_Central.admin_api import (
    ADMIN_COOKIE,
    ADMIN_REQUEST,
    ENROL_PATH,
    MAX_COMMAND_BYTES,
    AdminCommand,
    AdminRequest,
    DeregisterCP,
    EnrolRequest,
    EnrolResult,
    IssueEnrolment,
    ListCPs,
    RegisterCP,
    ResetSecret,
    RevokeKey,
    failure_code,
    source_of,
)
from EV_Central.audit import AuditLog
from EV_Central.auth import LoginOutcome, PeopleAuth
from EV_Central.clocks import PANEL_PEERS
from EV_Central.context import Context, Part
from EV_Central.cp_links import CPLinks
from EV_Central.enrolment import Enrolments
from EV_Central.feed import CentralEvent
from EV_Central.metrics import render
from EV_Central.registry import ChargingPoint
from EV_Central.weather_stops import WeatherStops
from shared.messages import STATE_COLOURS
from shared.weather_api import WEATHER_REQUEST, WEATHER_ROLE, PlacesQuery, WeatherRequest
from shared.web import error_response, json_response, response
from shared.webapp import (
    PER_ADDRESS,
    HttpRequest,
    Limits,
    Listen,
    Logins,
    Refusal,
    Route,
    WebApp,
    WebClient,
    host_of,
)
from shared.websession import WebLogin, WebSession
from shared.webshell import WebShell

log = logging.getLogger(__name__)

MAX_CLIENTS = 200
CLIENT_QUEUE = 256
COOKIE = ADMIN_COOKIE
RECENT_SESSIONS = 40  # sessions in a panel's snapshot and pushes
SESSIONS_PUSH_S = 1.0  # the panel's sessions and balances are pushed at most this often
ADMIN = frozenset({"admin"})
ANYONE = frozenset({"admin", "driver"})  # a driver reads its own sessions (and whoami)
# Who may open /ws: admins, and the weather service, which may only report the weather and
# is sent nothing but its results (docs/weather.md).
WS_ROLES = frozenset({"admin", WEATHER_ROLE})


class AdminWeb(WebApp, Part):
    web_name = "admin web"
    static_package = "EV_Central"
    server_header = "EV_Central"
    one_shot_paths = frozenset({ENROL_PATH})  # a CP's enrolment: no login, a token

    def __init__(
        self,
        context: Context,
        cp_links: CPLinks,
        people: PeopleAuth,
        audit: AuditLog,
        listen: Listen,
        *,
        session_ttl: float,
        allowed_origins: list[str],
        keep_sessions: bool = False,
        durable: Callable[[], Awaitable[bool]] | None = None,
        cluster: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        per_address: int = PER_ADDRESS,
        weather: WeatherStops | None = None,
    ) -> None:
        """`keep_sessions` (with --ha): logins are kept in the database, which the standby
        has too, so that a take-over does not log the admins out. `per_address`: connections
        open at once from one client address. `weather`: the weather service's reports."""
        Part.__init__(self, context)
        self._keep_sessions = keep_sessions
        self._durable = durable
        self._cluster = cluster  # with --ha: the Kafka cluster as the panel shows it
        self._cp_links = cp_links
        self._weather = weather
        # What the weather card last showed (WeatherStops.signature): pushed again on a change.
        self._weather_shown: tuple[int, tuple[bool, ...]] | None = None
        self._people = people
        self._audit_log = audit
        self._enrolments = Enrolments(context.store, cp_links, audit)
        self._health_cache: tuple[float, bool] = (0.0, False)
        self._sessions_dirty = asyncio.Event()
        admins_only = "admins only"
        self.shell = WebShell(
            self,
            listen,  # HTTPS and WSS when it has a TLS context (docs/tls.md)
            Limits(MAX_COMMAND_BYTES, MAX_CLIENTS, CLIENT_QUEUE, per_address=per_address),
            routes={
                "/healthz": Route(self._healthz),
                "/metrics": Route(self._metrics),
                "/api/cps": Route(self._cps, ADMIN, admins_only),
                "/api/sessions": Route(self._sessions, ANYONE, admins_only),
                "/api/stats": Route(self._message_counts, ADMIN, admins_only),
                "/api/events": Route(self._events, ADMIN, admins_only),
                "/api/drivers": Route(self._drivers_api, ADMIN, admins_only),
                "/api/audit": Route(self._audit, ADMIN, admins_only),
                "/api/status": Route(self._status_api, ADMIN, admins_only),
                "/api/weather": Route(self._weather_api, ADMIN, admins_only),
            },
            logins=Logins(
                COOKIE,
                WS_ROLES,
                "the admin WebSocket",
                session_ttl,
                allowed_origins,
                who="admins and the weather service",
            ),
        )
        self._feed.on_cps(self._on_cps_changed)
        self._feed.on_event(self._on_event)
        self._feed.on_sessions(self._sessions_dirty.set)
        audit.on_record(self._on_audit)
        if weather is not None:
            weather.on_change(self._push_weather)
        if keep_sessions:
            self.shell.sessions.changed = self._session_changed

    async def start(self) -> None:
        if self._keep_sessions:
            for row in await self._store.web_sessions(time.time()):
                self.shell.sessions.restore(
                    row["key"], row["user_id"], row["role"], row["expires_at"]
                )
        await self.shell.start(self._refresh)

    async def session_made(self, session: WebSession) -> None:
        """With --ha the cookie goes out once Kafka has the session (the standby too)."""
        if not self._keep_sessions:
            return
        expires_at = self.shell.sessions.wall_time(session.expires_at)
        await self._store.save_web_session(session.key, session.user_id, session.role, expires_at)
        if self._durable is not None and not await self._durable():
            log.warning("a new admin session is not in Kafka yet: a take-over now would end it")

    def _session_changed(self, key: str, session: WebSession | None) -> None:
        """Keep the database in step with the logins (in order: one writer at a time)."""
        if session is None:  # a new one is saved by session_made, before its cookie leaves
            self.shell.spawn(self._store.end_web_session(key), "web-session-end")

    async def stop(self) -> None:
        await self.shell.stop()

    @property
    def port(self) -> int:
        return self.shell.port

    # --- HTTP routes ------------------------------------------------------------------------

    async def _healthz(self, request: HttpRequest) -> Response:
        status = await self._status()
        return json_response(status, 200 if status["status"] == "ok" else 503)

    async def _sessions(self, request: HttpRequest) -> Response:
        """Sessions, newest first: all for an admin, a driver's own for a driver."""
        query, session = request.query, request.session
        assert session is not None  # the route is not public
        if session.role != "admin":
            if query.get("driver_id", session.user_id) != session.user_id:
                return error_response(403, "a driver may read only its own sessions")
            query = {**query, "driver_id": session.user_id}
        driver_id = query.get("driver_id")
        return json_response(await self._store.sessions(_limit(query), driver_id))

    async def _drivers_api(self, request: HttpRequest) -> Response:
        return json_response(await self._store.drivers())

    # --- WebSocket --------------------------------------------------------------------------

    def _on_cps_changed(self, cps: list[ChargingPoint]) -> None:
        if self.shell.watched:
            self.shell.broadcast({"type": "cps", "cps": [cp.as_api() for cp in cps]})

    def _on_audit(self, entry: dict[str, Any]) -> None:
        self.shell.broadcast({"type": "audit", "entry": entry})

    def _on_event(self, event: CentralEvent) -> None:
        if self.shell.watched:
            self.shell.broadcast({"type": "event", "event": event.as_api()})

    async def _refresh(self) -> None:
        """Push sessions and balances when they change (coalesced: at most one push every
        `SESSIONS_PUSH_S`; with thousands of CPs supplies start and end many times a second),
        and the system status every 2 s."""
        last_status = 0.0
        last_sessions = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sessions_dirty.wait(), 2.0)
            if not self.shell.watched:  # no panel open (the weather service watches none)
                self._sessions_dirty.clear()
                continue
            try:
                if self._sessions_dirty.is_set():
                    # Coalesce a burst of changes, and keep to the pace.
                    since = time.monotonic() - last_sessions
                    await asyncio.sleep(max(0.1, SESSIONS_PUSH_S - since))
                    last_sessions = time.monotonic()
                    self._sessions_dirty.clear()
                    sessions = await self._recent_sessions()
                    self.shell.broadcast({"type": "sessions", "sessions": sessions})
                    drivers = await self._store.drivers()
                    self.shell.broadcast({"type": "drivers", "drivers": drivers})
                if time.monotonic() - last_status >= 2.0:
                    last_status = time.monotonic()
                    status = await self._status(cluster=True)
                    self.shell.broadcast({"type": "status", "status": status})
                    # A place whose reports stopped turns stale; a new CP's place shows.
                    if self._weather is not None:
                        signature = self._weather.signature()
                        if signature != self._weather_shown:
                            self._weather_shown = signature
                            self._push_weather()
            except Exception:
                log.exception("admin refresh failed")

    def _push_weather(self) -> None:
        if self._weather is not None and self.shell.watched:
            self.shell.broadcast({"type": "weather", "weather": self._weather.as_api()})

    async def on_message(self, client: WebClient, raw: str | bytes) -> None:
        assert client.session is not None  # only admins' and the weather service's sessions
        if client.session.role == WEATHER_ROLE:
            client.push(await self._weather_request(raw, client.session, client.peer))
            return
        try:
            command = ADMIN_REQUEST.validate_json(raw)
        except ValidationError as exc:
            detail = f"invalid command at {_first_error(exc)}"
            client.push({"type": "result", "ok": False, "detail": detail})
            return
        client.push(await self._execute(command, client.session, client.peer))

    # --- Central: every read and action of the admin web ------------------------------------

    async def check_login(self, form: WebLogin, peer: str) -> LoginOutcome:
        # The client's host is the source a failure is held against (its port changes).
        return await self._people.login(
            form.user, form.password, source=host_of(peer), channel="admin web"
        )

    async def one_shot(self, path: str, data: str | bytes, peer: str) -> dict[str, Any]:
        """/enrol: a CP's id and one-time token for its new secret (EV_Central/enrolment.py)."""
        try:
            request = EnrolRequest.model_validate_json(data)
        except ValidationError as exc:
            reason = f"invalid enrolment at {_first_error(exc)}"
            return EnrolResult(cp_id="", ok=False, reason=reason).model_dump()
        answer = await self._enrolments.redeem(request, host_of(peer))
        return answer.model_dump(exclude_none=True)

    async def on_refusal(self, refusal: Refusal) -> None:
        await self._audit_log.record(
            "ws_rejected",
            "refused",
            actor=refusal.actor,
            source=refusal.peer,
            detail=f"{refusal.path}: {refusal.why}",
        )

    async def on_logout(self, session: WebSession, peer: str) -> None:
        await self._audit_log.record("logout", "ok", actor=session.user_id, source=peer)

    async def on_connect(self, client: WebClient) -> None:
        if client.session is not None and client.session.role == WEATHER_ROLE:
            client.watching = False  # it gets its results, never the panel's pushes
            return
        client.push(
            {
                "type": "snapshot",
                "cps": [cp.as_api() for cp in self._registry.sorted()],
                "events": [e.as_api() for e in self._feed.events],
                "sessions": await self._recent_sessions(),
                "drivers": await self._store.drivers(),
                "status": await self._status(cluster=True),
                "audit": await self._audit_log.recent(100),
                "colours": {state.value: colour for state, colour in STATE_COLOURS.items()},
                "weather": self._weather.as_api() if self._weather is not None else [],
            }
        )

    async def _cps(self, request: HttpRequest) -> Response:
        return json_response([cp.as_api() for cp in self._registry.sorted()])

    async def _weather_api(self, request: HttpRequest) -> Response:
        """Every watched place's weather and frost alert (docs/weather.md)."""
        return json_response(self._weather.as_api() if self._weather is not None else [])

    async def _weather_request(
        self, raw: str | bytes, session: WebSession, source: str
    ) -> dict[str, Any]:
        """A weather service's message: the places to watch, or one place's report."""
        try:
            request: WeatherRequest = WEATHER_REQUEST.validate_json(raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "message"
            return {"type": "result", "ok": False, "detail": f"invalid at {where}: {first['msg']}"}
        result: dict[str, Any] = {"type": "result", "ref": request.ref, "ok": True}
        if self._weather is None:
            return {**result, "ok": False, "detail": "this Central takes no weather reports"}
        if isinstance(request, PlacesQuery):
            return {**result, "places": self._weather.watched()}
        try:
            changes = await self._weather.report(request)
        except LookupError as exc:
            return {**result, "ok": False, "detail": str(exc)}
        for action, cps in (
            ("weather_stop", changes["stopped"]),
            ("weather_resume", changes["resumed"]),
        ):
            if cps:
                detail = f"{request.place} {request.temperature} °C: {', '.join(cps)}"
                await self._record(action, "ok", session, source, detail)
        return {**result, **changes, "detail": f"{request.place}: recorded"}

    async def _status_api(self, request: HttpRequest) -> Response:
        """The panel's status line: health, role and (--ha) the Kafka cluster."""
        return json_response(await self._status(cluster=True))

    async def _message_counts(self, request: HttpRequest) -> Response:
        return json_response({"messages": dict(self._stats.counters)})

    async def _events(self, request: HttpRequest) -> Response:
        return json_response([e.as_api() for e in self._feed.events])

    async def _status(self, *, cluster: bool = False) -> dict[str, Any]:
        """Health, and with `cluster` (the panel's pushes and /api/status, for admins) the
        clocks and (--ha) the Kafka cluster's view."""
        database = await self._store.ping()
        checked_at, broker = self._health_cache
        if time.monotonic() - checked_at > 1.0:
            broker = await self._bus.ping()
            self._health_cache = (time.monotonic(), broker)
        ok = database and broker
        monitors = sum(1 for cp in self._registry.cps.values() if cp.connected)
        view: dict[str, Any] = {}
        if cluster:  # for admins only: the clocks name drivers
            view["clocks"] = self._clocks.as_api(PANEL_PEERS)
            if self._cluster:
                view["cluster"] = await self._cluster()
        return {
            "status": "ok" if ok else "degraded",
            "role": self._stats.role,
            "broker": broker,
            "database": database,
            "monitors_connected": monitors,
            "cps_registered": len(self._registry.cps),
            "websocket_clients": self.shell.client_count,
            **view,
        }

    async def _metrics(self, request: HttpRequest) -> Response:
        """Prometheus text format: CPs, sessions, messages, handler latency, lag, clients."""
        stats = self._stats
        cps_by_state = {state.value: 0 for state in STATE_COLOURS}
        monitors = 0
        for cp in self._registry.cps.values():
            cps_by_state[cp.state.value] += 1
            monitors += cp.connected
        text = render(
            cps_by_state=cps_by_state,
            sessions_by_status=await self._store.sessions_by_status(),
            messages=dict(stats.counters),
            handler_seconds=dict(stats.handler_seconds),
            consumer_lag=dict(stats.consumer_lag),
            monitors_connected=monitors,
            websocket_clients=self.shell.client_count,
            outbox_pending=await self._store.outbox_pending(),
            loop_lag=stats.loop_lag,
            stage_seconds=dict(stats.stage_seconds),
            gc_pauses=stats.gc_pauses.by_generation,
            role=stats.role,
            clocks=self._clocks.as_api(),
        )
        return response(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    async def _recent_sessions(self) -> list[dict[str, Any]]:
        return await self._store.sessions(RECENT_SESSIONS)

    async def _audit(self, request: HttpRequest) -> Response:
        """The audit log, newest first (docs/audit.md)."""
        limit = _limit(request.query)
        return json_response(await self._audit_log.recent(limit))

    async def _execute(
        self, command: AdminRequest, session: WebSession, source: str
    ) -> dict[str, Any]:
        """Run one admin command for `session`'s user; audit it; build its result.

        A secret (register_cp, reset_secret) or an enrolment token (issue_enrolment) goes only
        into this result, to this connection, never into the audit log or a broadcast.
        EV_Registry's commands name the client it acts for (`caller`), which the audit names.
        """
        if isinstance(command, RegisterCP | DeregisterCP | IssueEnrolment | ListCPs):
            source = source_of(command.caller, source)
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
            case DeregisterCP():
                action, target, detail = "cp_deregistered", command.target, command.target
            case IssueEnrolment():
                action, target, detail = "enrolment_issued", command.target, command.target
            case ListCPs():
                action = "cps_listed"
                target = detail = command.target or "all"
        try:
            match command:
                case RegisterCP():
                    cp, secret, kafka = await self._cp_links.register(
                        command.id, command.location, command.price_eur_kwh, command.max_kw
                    )
                    result.update(detail=f"registered {cp.id}", cps=[cp.id], secret=secret)
                    if kafka is not None:  # a secured Kafka: the engine's login, once
                        result.update(kafka_user=kafka[0], kafka_password=kafka[1])
                case RevokeKey():
                    await self._cp_links.revoke_key(command.target)
                    result.update(detail=f"revoked the keys of {target}", cps=[target])
                case ResetSecret():
                    secret = await self._cp_links.reset_secret(command.target)
                    result.update(detail=f"new secret for {target}", cps=[target], secret=secret)
                case AdminCommand():
                    affected = await self._cp_links.set_service(
                        command.target, in_service=command.action == "resume"
                    )
                    result.update(detail=f"{command.action} {command.target}", cps=affected)
                case DeregisterCP():
                    settled = await self._cp_links.deregister(target)
                    result.update(
                        detail=f"deregistered {target}", cps=[target], settled_session=settled
                    )
                    if settled:
                        detail = f"{target} (settled session {settled})"
                case IssueEnrolment():
                    issued = await self._enrolments.issue(target, command.ttl_s)
                    result.update(
                        detail=f"enrolment token for {target}",
                        cps=[target],
                        token=issued.token,
                        expires_at=issued.expires_at,
                    )
                    detail = f"{target}, valid {command.ttl_s} s"
                case ListCPs():
                    result.update(detail="CPs", charging_points=self._listed(command.target))
        except (LookupError, ValueError) as exc:
            await self._record(action, "failed", session, source, f"{detail}: {exc}")
            return {
                "type": "result",
                "ref": command.ref,
                "ok": False,
                "detail": str(exc),
                "code": failure_code(exc),
            }
        await self._record(action, "ok", session, source, detail)
        if isinstance(command, DeregisterCP):  # the panels drop its tile
            cps = [cp.as_api() for cp in self._registry.sorted()]
            self.shell.broadcast({"type": "cps", "full": True, "cps": cps})
        return result

    def _listed(self, cp_id: str | None) -> list[dict[str, object]]:
        """Every CP, or the one `cp_id` names (LookupError when unknown), as /api/cps."""
        if cp_id is None:
            return [cp.as_api() for cp in self._registry.sorted()]
        cp = self._registry.get(cp_id)
        if cp is None:
            raise LookupError(f"unknown CP {cp_id!r}")
        return [cp.as_api()]

    async def _record(
        self, action: str, outcome: str, session: WebSession, source: str, detail: str
    ) -> None:
        try:
            await self._audit_log.record(
                action, outcome, actor=session.user_id, source=source, detail=detail
            )
        except Exception:  # the command happened; a failing audit must not hide that
            log.exception("could not audit %s by %s", action, session.user_id)


def _first_error(exc: ValidationError) -> str:
    """Where a message is invalid and why (its first error), for the answer."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "message"
    return f"{where}: {first['msg']}"


def _limit(query: dict[str, str]) -> int:
    """The `limit` parameter: 1 to 1000, 100 when absent; ValueError (400) otherwise."""
    limit_text = query.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
        raise ValueError("limit must be a number from 1 to 1000")
    return int(limit_text)
