"""The drivers' browser dashboard: one web server for many drivers, over Kafka.

Served by the `websockets` library alone: process_request answers the page, its static files
and /healthz; /ws is the WebSocket each browser talks over. A browser logs in on /login
(Central checks the password over Kafka), turns the one-time grant it gets into an HttpOnly
session cookie with GET /session, and opens /ws with that cookie (docs/web-auth.md): the
connection is bound to the session's driver. It sees the CPs, its own
supply, tickets, balance and history, and may run a file of requests. Two tail consumers feed
the server: driver updates (dispatched by key to the driver's room) and CP states (read from
the start of the compacted topic, pushed to every logged-in browser on change).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
import weakref
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from EV_Driver.dashboard_config import DashboardSettings, parse_settings
from EV_Driver.dashboard_protocol import (
    MAX_COMMAND_BYTES,
    BrowserCommand,
    CancelRun,
    Push,
    Refresh,
    RequestSupply,
    RunFile,
    StopSupply,
    cps_push,
    error,
    parse_command,
)
from EV_Driver.dashboard_room import DriverRoom
from EV_Driver.flow import update_driver_id
from EV_Driver.session import DriverSession, LoginRefused, finish_login, start_login
from shared.backoff import Backoff
from shared.bus import BusError, KafkaBus, Topics, decode_record
from shared.errors import ConfigError, MessageError
from shared.lifecycle import Shutdown, run_service
from shared.logs import setup_logging
from shared.messages import (
    CP_STATE,
    DRIVER_UPDATES,
    CentralIdentity,
    CPStateUpdate,
    DriverUpdate,
    IdentityQuery,
    LoginResult,
    Message,
    decode,
    encode,
)
from shared.sealing import SealError, is_sealed, parse
from shared.tls import HANDSHAKE_TIMEOUT, optional_server_context
from shared.web import (
    bound_port,
    error_response,
    json_response,
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

PACKAGE = "EV_Driver"
MAX_CLIENTS = 500
CLIENT_QUEUE = 512  # pushes waiting for a slow browser before it is disconnected
CPS_PUSH_INTERVAL = 0.25  # the CP list goes out at most four times a second
HEALTH_CACHE = 1.0
ANSWER_TIMEOUT_FACTOR = 3  # a supply request waits this many reply timeouts for an answer
COOKIE = "ev_driver_session"
LOGIN_WAIT = 30.0  # seconds a /login connection may take to send its one message
MAX_LOGINS = 100  # /login connections open at once
SESSION_CHECK = 2.0  # seconds between checks that each browser's session is still alive
RETRY_AFTER = re.compile(r"try again in (\d+) s")  # in Central's answer to a locked account


class Client:
    """One browser's WebSocket: a bounded queue of pushes, its session and its driver's room."""

    def __init__(self, conn: ServerConnection, session: WebSession) -> None:
        self.conn = conn
        self.session = session
        self.ended = asyncio.Event()  # set when the session ends: the connection closes
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=CLIENT_QUEUE)
        self.room: DriverRoom | None = None

    def push(self, payload: Push) -> None:
        self.send_text(json.dumps(payload, ensure_ascii=False, separators=(",", ":")))

    def send_text(self, text: str) -> None:
        if self.queue.full():
            log.warning("browser %s too slow; closing its connection", self.conn.remote_address)
            self.conn.transport.abort()
            return
        self.queue.put_nowait(text)

    async def pump(self) -> None:
        while True:
            await self.conn.send(await self.queue.get())


class DriverDashboard:
    def __init__(self, settings: DashboardSettings, bus: KafkaBus | None = None) -> None:
        self.settings = settings
        self.bus = bus or KafkaBus(settings.broker, client_id="ev-driver-dashboard")
        self.port = settings.http_port
        self.rooms: dict[str, DriverRoom] = {}
        self.clients: set[Client] = set()
        self.cp_states: dict[str, CPStateUpdate] = {}
        self.ready = False  # the bus is up and both consumers are positioned
        self._server: Server | None = None
        self._logins: dict[str, asyncio.Future[LoginResult | CentralIdentity]] = {}
        # Each logged-in driver's key at Central (by driver, and by key id for updates).
        self.sessions: dict[str, DriverSession] = {}
        self._by_key: dict[str, DriverSession] = {}
        self._central_key: str | None = settings.central_key
        self._cps_changed = asyncio.Event()
        self._health: tuple[float, bool] = (0.0, False)
        # Browsers' sessions (cookies), apart from the drivers' keys at Central above.
        self.web_sessions = SessionStore(ttl=settings.session_ttl)
        self.allowed_origins = frozenset(settings.allowed_origin)
        self._upgrades: weakref.WeakKeyDictionary[ServerConnection, WebSession] = (
            weakref.WeakKeyDictionary()
        )
        self._logins_open = 0

    # --- life ---------------------------------------------------------------------------------

    async def run(self, shutdown: Shutdown) -> None:
        """Serve until shutdown is requested; then close browsers, rooms and the bus."""
        await self.start_web()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._connect(), name="dashboard-kafka"),
                    group.create_task(self._push_cps(), name="dashboard-cps"),
                    group.create_task(self._check_sessions(), name="dashboard-sessions"),
                ]
                await shutdown.wait()
                for task in tasks:
                    task.cancel()
        except BaseExceptionGroup as failures:
            raise _first_error(failures) from None
        finally:
            await self.stop()

    @property
    def tls(self) -> bool:
        """True when the dashboard is served over TLS (HTTPS, WSS; cookies are then Secure)."""
        return self.settings.tls_cert is not None

    async def start_web(self) -> None:
        tls = optional_server_context(self.settings.tls_cert, self.settings.tls_key)
        self._server = await serve(
            self._ws_handler,
            self.settings.listen_host,
            self.settings.http_port,
            process_request=self._process_request,
            max_size=MAX_COMMAND_BYTES,
            server_header="EV_Driver",
            ssl=tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if tls else None,
        )
        self.port = bound_port(self._server.sockets, self.settings.http_port)
        scheme = "https" if tls else "http"
        log.info("driver dashboard on %s://%s:%d/", scheme, self.settings.listen_host, self.port)

    async def stop(self) -> None:
        """Close the web server (and so every browser), every room, then the bus."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await server.wait_closed()
        rooms, self.rooms = list(self.rooms.values()), {}
        for room in rooms:
            await room.close()
        self.ready = False
        await self.bus.stop()

    async def _connect(self) -> None:
        await self.bus.start()
        # Both positioned before `ready`: no answer to a login sent after it can be missed.
        updates = await self.bus.tail_consumer([Topics.DRIVER_UPDATES])
        states = await self.bus.tail_consumer([Topics.CP_STATE], from_start=True)
        self.ready = True
        log.info("connected to Kafka at %s", self.settings.broker)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._read(updates, self._on_update, "driver updates"))
            group.create_task(self._read(states, self._on_cp_state, "CP states"))

    async def _read(
        self,
        consumer: AIOKafkaConsumer,
        handle: Callable[[ConsumerRecord[bytes, bytes]], None],
        what: str,
    ) -> None:
        backoff = Backoff()
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            except KafkaError as exc:
                delay = backoff.next_delay()
                log.warning("reading %s failed (%r); retrying in %.1f s", what, exc, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            for records in batches.values():
                for record in records:
                    try:
                        handle(record)
                    except Exception:  # one bad record must not stop every browser's news
                        log.exception("handling %s offset %d failed", what, record.offset)

    # --- Kafka in -----------------------------------------------------------------------------

    def _on_update(self, record: ConsumerRecord[bytes, bytes]) -> None:
        key = record.key.decode("utf-8", "replace") if record.key else ""
        try:
            update = self._open(record.value or b"")
        except MessageError as exc:
            log.debug("skipping driver update at offset %d: %s", record.offset, exc)
            return
        if update is None:
            return
        if update_driver_id(update) != key:
            log.debug("skipping driver update at offset %d: key mismatch", record.offset)
            return
        if isinstance(update, LoginResult | CentralIdentity):
            waiter = self._logins.get(update.request_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(update)
            return
        room = self.rooms.get(key)
        if room is not None:
            room.handle(update)

    def _open(self, value: bytes) -> DriverUpdate | None:
        """An update sealed for one of our logins, or a clear answer to a login; else None."""
        if is_sealed(value):
            envelope = parse(value)
            session = self._by_key.get(envelope.key_id)
            if session is None:
                return None  # another login's (another dashboard, a command line)
            try:
                return session.open(value)
            except SealError as exc:
                log.warning("refused an update that failed authentication: %s", exc)
                return None
        update = decode(DRIVER_UPDATES, value)
        if isinstance(update, LoginResult | CentralIdentity):
            return update
        log.debug("ignored an update that was not sealed (%s)", update.type)
        return None

    def _on_cp_state(self, record: ConsumerRecord[bytes, bytes]) -> None:
        key = record.key.decode("utf-8", "replace") if record.key else ""
        if record.value is None:  # a tombstone: the CP was removed
            if self.cp_states.pop(key, None) is not None:
                self._cps_changed.set()
            return
        try:
            state = decode_record(CP_STATE, record)
        except MessageError as exc:
            log.debug("skipping CP state at offset %d: %s", record.offset, exc)
            return
        if state.cp_id != key:
            return
        self.cp_states[state.cp_id] = state
        self._cps_changed.set()

    async def _push_cps(self) -> None:
        """Push the CP list to each room when what a driver sees of it changed."""
        while True:
            await self._cps_changed.wait()
            self._cps_changed.clear()
            for room in list(self.rooms.values()):
                self._push_cps_to(room)
            await asyncio.sleep(CPS_PUSH_INTERVAL)

    def _push_cps_to(self, room: DriverRoom) -> None:
        text = json.dumps(
            cps_push(self.cp_states, room.active_cp), ensure_ascii=False, separators=(",", ":")
        )
        if text != room.last_cps:
            room.last_cps = text
            room.broadcast_text(text)

    # --- HTTP ---------------------------------------------------------------------------------

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path, query = split_path(request.path)
        if path in ("/ws", "/login"):
            return self._check_upgrade(conn, request, path)
        if path == "/healthz":
            return await self._healthz()
        if path == "/session":
            return self._redeem(conn, query)
        if path == "/logout":
            return self._logout(conn, request)
        if path == "/api/whoami":
            session = self.web_sessions.get(cookie_value(request.headers, COOKIE))
            if session is None:
                return error_response(401, "log in first")
            return json_response(session.as_api(self.web_sessions.now()))
        if path in ("/", "/index.html"):
            return static_response(PACKAGE, "index.html")
        if path.startswith("/static/"):
            return static_response(PACKAGE, path.removeprefix("/static/"))
        return error_response(404, f"no such resource: {path}")

    async def _healthz(self) -> Response:
        checked_at, broker = self._health
        if time.monotonic() - checked_at > HEALTH_CACHE:
            broker = self.ready and await self.bus.ping()
            self._health = (time.monotonic(), broker)
        body = {
            "status": "ok" if broker else "degraded",
            "broker": broker,
            "browsers": len(self.clients),
            "drivers": len(self.rooms),
            "cps": len(self.cp_states),
        }
        return json_response(body, 200 if broker else 503)

    # --- sessions: login, cookie, logout --------------------------------------------------------

    def _check_upgrade(
        self, conn: ServerConnection, request: Request, path: str
    ) -> Response | None:
        """Let a WebSocket handshake go on, or refuse it (bad Origin, no session)."""
        if not origin_allowed(request.headers, self.allowed_origins):
            log.warning(
                "refused a WebSocket on %s: Origin %r not allowed",
                path,
                request.headers.get("Origin"),
            )
            return error_response(403, "this page's origin may not use the dashboard")
        if path == "/login":
            if self._logins_open >= MAX_LOGINS:
                return error_response(503, "too many logins at once; try again in a moment")
            return None
        session = self.web_sessions.get(cookie_value(request.headers, COOKIE))
        if session is None:
            return error_response(401, "log in first")
        if session.role != "driver":
            return error_response(403, "the dashboard is for drivers")
        self._upgrades[conn] = session
        return None

    def _redeem(self, conn: ServerConnection, query: dict[str, str]) -> Response:
        """GET /session?grant=CODE: a grant from /login becomes the session cookie."""
        answer, _ = redeem_response(self.web_sessions, query.get("grant", ""), COOKIE, self.tls)
        return answer

    def _logout(self, conn: ServerConnection, request: Request) -> Response:
        """GET /logout: end the session (its browsers are closed) and clear the cookie."""
        session = self.web_sessions.end(cookie_value(request.headers, COOKIE))
        if session is not None:
            log.info("driver %s logged out", session.user_id)
            self._end_closed_sessions()
        return logout_response(COOKIE, self.tls)

    async def _serve_login(self, conn: ServerConnection) -> None:
        """One login per /login connection: a message in, a login_result out, closed."""
        self._logins_open += 1
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
            result = await self._check_password(form.user, form.password)
            if isinstance(result, str):
                wait = RETRY_AFTER.search(result)
                retry_after = float(wait.group(1)) if wait else None
                await conn.send(json.dumps(login_refused(result, retry_after)))
                return
            grant = self.web_sessions.grant(form.user, "driver")
            await conn.send(json.dumps(login_ok(grant, form.user, "driver")))
        finally:
            self._logins_open -= 1

    def _end_closed_sessions(self) -> None:
        """Close the browsers whose session ended (logout, expiry, key at Central gone)."""
        for client in list(self.clients):
            driver_id = client.session.user_id
            at_central = self.sessions.get(driver_id)
            if at_central is None or at_central.expired:
                self.web_sessions.end_user(driver_id)  # its requests could not go out
            if self.web_sessions.valid(client.session):
                self.web_sessions.touch(client.session)  # an open page is in use
            else:
                client.ended.set()

    async def _check_sessions(self) -> None:
        while True:
            await asyncio.sleep(SESSION_CHECK)
            self._end_closed_sessions()
            self.web_sessions.prune()

    # --- WebSocket ----------------------------------------------------------------------------

    async def _ws_handler(self, conn: ServerConnection) -> None:
        if conn.request is not None and split_path(conn.request.path)[0] == "/login":
            with contextlib.suppress(ConnectionClosed):
                await self._serve_login(conn)
            return
        session = self._upgrades.pop(conn, None)
        if session is None:  # the handshake let no /ws through without a session
            await conn.close(1008, "log in first")
            return
        if len(self.clients) >= MAX_CLIENTS:
            await conn.close(1013, "too many browsers")
            return
        client = Client(conn, session)
        self.clients.add(client)
        try:
            async with asyncio.TaskGroup() as group:
                pump = group.create_task(client.pump(), name="browser-pump")
                closer = group.create_task(self._close_when_ended(client), name="browser-end")
                at_central = self.sessions.get(session.user_id)
                balance = at_central.balance_eur if at_central is not None else None
                await self._bind(client, session.user_id, balance)
                await self._read_commands(client)
                pump.cancel()
                closer.cancel()
        except* ConnectionClosed:
            pass
        finally:
            self.clients.discard(client)
            await self._unbind(client)

    @staticmethod
    async def _close_when_ended(client: Client) -> None:
        await client.ended.wait()
        await client.conn.close(4001, "session ended")

    async def _read_commands(self, client: Client) -> None:
        async for data in client.conn:
            if isinstance(data, bytes):
                client.push(error("binary messages are not accepted; send JSON text"))
                continue
            try:
                command = parse_command(data)
            except MessageError as exc:
                client.push(error(str(exc)))
                continue
            if not self.web_sessions.valid(client.session):  # logged out or expired meanwhile
                client.ended.set()
                break
            try:
                await self._execute(client, command)
            except Exception:  # a bug answers this browser with an error; the server goes on
                log.exception("command %s failed", command.type)
                client.push(error("internal error"))

    async def _execute(self, client: Client, command: BrowserCommand) -> None:
        room = client.room
        if room is None:
            client.push(error("log in first"))
            return
        problem: str | None = None
        match command:
            case RequestSupply():
                problem = room.request_supply(command.cp_id)
            case StopSupply():
                problem = room.stop_supply()
            case RunFile():
                problem = room.start_run(command.name, command.text)
            case CancelRun():
                problem = room.cancel_run()
            case Refresh():
                room.refresh()
        if problem is not None:
            client.push(error(problem))

    async def _check_password(self, driver_id: str, password: str) -> DriverSession | str:
        """Log a driver in at Central: its session (key), or why there is none."""
        if not self.ready:
            return "the dashboard is not connected to Kafka yet; try again in a moment"
        try:
            if self._central_key is None:
                query = IdentityQuery(driver_id=driver_id)
                identity = await self._ask(query, query.id)
                if not isinstance(identity, CentralIdentity):
                    return "Central answered something else"
                self._central_key = identity.public_key
                log.warning(
                    "Central's key is not pinned (--central-key); using the one it sent, "
                    "fingerprint %s",
                    identity.fingerprint,
                )
            pending = start_login(self._central_key, driver_id, password)
            result = await self._ask(pending.request, pending.request.id)
            if not isinstance(result, LoginResult):
                return "Central answered something else"
            session = finish_login(pending, result)
        except LoginRefused as exc:
            wait = ""
            if exc.retry_after and "try again" not in exc.reason:
                wait = f"; try again in {exc.retry_after:.0f} s"
            return f"{exc.reason}{wait}"
        except SealError as exc:
            return f"cannot log in: {exc}"
        except BusError:
            return "cannot reach Kafka; try again in a moment"
        except TimeoutError:
            return "Central did not answer; is it running?"
        previous = self.sessions.get(driver_id)
        if previous is not None:
            self._by_key.pop(previous.key_id, None)
        self.sessions[driver_id] = session
        self._by_key[session.key_id] = session
        return session

    async def _ask(self, message: Message, request_id: str) -> LoginResult | CentralIdentity:
        """Send a clear request (identity query, login) and wait for its answer."""
        waiter: asyncio.Future[LoginResult | CentralIdentity]
        waiter = asyncio.get_running_loop().create_future()
        self._logins[request_id] = waiter
        driver_id = getattr(message, "driver_id", "")
        try:
            await self.bus.send_raw(Topics.DRIVER_REQUESTS, driver_id.encode(), encode(message))
            async with asyncio.timeout(self.settings.reply_timeout):
                return await waiter
        finally:
            self._logins.pop(request_id, None)

    async def _bind(self, client: Client, driver_id: str, balance_eur: float | None) -> None:
        if client.room is not None:
            await self._unbind(client)
        client.push({"type": "session", "driver_id": driver_id})
        room = self.rooms.get(driver_id)
        client.push(cps_push(self.cp_states, room.active_cp if room else None))
        if room is None:
            room = DriverRoom(
                driver_id,
                self._publish,
                pause=self.settings.pause,
                answer_timeout=ANSWER_TIMEOUT_FACTOR * self.settings.reply_timeout,
                balance_eur=balance_eur,
            )
            room.last_cps = json.dumps(
                cps_push(self.cp_states, None), ensure_ascii=False, separators=(",", ":")
            )
            self.rooms[driver_id] = room
            room.start()
        else:
            room.refresh()
        client.room = room
        room.attach(client)
        log.info("driver %s logged in (%d browser(s))", driver_id, len(room.clients))

    async def _unbind(self, client: Client) -> None:
        room, client.room = client.room, None
        if room is None:
            return
        if room.detach(client) and self.rooms.get(room.driver_id) is room:
            del self.rooms[room.driver_id]
            await room.close()
            log.info("driver %s left the dashboard", room.driver_id)

    async def _publish(self, message: Message) -> None:
        """Send a driver's request to Central, sealed with that driver's key."""
        driver_id = getattr(message, "driver_id", None)
        assert isinstance(driver_id, str)
        session = self.sessions.get(driver_id)
        if session is None or session.expired:
            raise BusError(f"{driver_id} is not logged in at Central (log in again)")
        await self.bus.send_raw(Topics.DRIVER_REQUESTS, driver_id.encode(), session.seal(message))


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real failure inside a task group (cancellations are not failures)."""
    for failure in group.exceptions:
        if isinstance(failure, BaseExceptionGroup):
            return _first_error(failure)
        if not isinstance(failure, asyncio.CancelledError):
            return failure
    return group


def main(argv: Sequence[str]) -> int:
    """`python -m EV_Driver dashboard ...`: return the exit code."""
    try:
        settings = parse_settings(argv)
    except ConfigError as exc:
        print(f"EV_Driver dashboard: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help (0) or bad flags (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    setup_logging(settings.log_level, settings.log_json)

    async def service(shutdown: Shutdown) -> None:
        await DriverDashboard(settings).run(shutdown)

    return run_service(service)
