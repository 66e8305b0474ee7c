"""The drivers' browser dashboard: one web server for many drivers, over Kafka.

The web side is the shared shell (shared/webshell.py): the page, its static files, the login
flow of docs/web-auth.md and /ws with its checks. What is the driver dashboard's own is here:
a login is a driver's login at Central over Kafka (EV_Driver.dashboard_keys), only driver
sessions open /ws, each connection joins its driver's room (EV_Driver.dashboard_room) and its
commands go there, and /healthz. Two tail consumers feed the server: driver updates
(dispatched by key to the driver's room) and CP states (read from the start of the compacted
topic, pushed to every logged-in browser on change).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaError
from websockets.http11 import Response

from EV_Driver.dashboard_config import DashboardSettings, parse_settings
from EV_Driver.dashboard_keys import DriverKeys
from EV_Driver.dashboard_protocol import (
    MAX_COMMAND_BYTES,
    BrowserCommand,
    CancelRun,
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
from shared.backoff import Backoff
from shared.bus import KafkaBus, Topics, decode_record
from shared.clock import NetworkClock
from shared.errors import ConfigError, MessageError
from shared.lifecycle import Shutdown, run_service
from shared.logs import setup_logging
from shared.messages import (
    CP_STATE,
    CentralIdentity,
    CPStateUpdate,
    LoginResult,
)
from shared.tls import optional_server_context
from shared.web import json_response
from shared.webapp import (
    HttpRequest,
    Limits,
    Listen,
    LoginOutcome,
    Logins,
    Route,
    WebApp,
    WebClient,
    dumps,
)
from shared.websession import SessionStore, WebLogin, WebSession
from shared.webshell import WebShell

log = logging.getLogger(__name__)

MAX_CLIENTS = 500
CLIENT_QUEUE = 512  # pushes waiting for a slow browser before it is disconnected
CPS_PUSH_INTERVAL = 0.25  # the CP list goes out at most four times a second
HEALTH_CACHE = 1.0
ANSWER_TIMEOUT_FACTOR = 3  # a supply request waits this many reply timeouts for an answer
COOKIE = "ev_driver_session"
DRIVER = frozenset({"driver"})  # the only role that opens /ws here


class DriverDashboard(WebApp):
    web_name = "driver dashboard"
    static_package = "EV_Driver"
    server_header = "EV_Driver"

    def __init__(self, settings: DashboardSettings, bus: KafkaBus | None = None) -> None:
        self.settings = settings
        self.bus = bus or KafkaBus(
            settings.broker, client_id="ev-driver-dashboard", login=settings.kafka
        )
        self.rooms: dict[str, DriverRoom] = {}
        self.room_of: dict[WebClient, DriverRoom] = {}
        self.cp_states: dict[str, CPStateUpdate] = {}
        self.ready = False  # the bus is up and both consumers are positioned
        self.keys = DriverKeys(  # each logged-in driver's key at Central
            self.bus,
            reply_timeout=settings.reply_timeout,
            central_key=settings.central_key,
            ready=lambda: self.ready,
        )
        self._cps_changed = asyncio.Event()
        self._health: tuple[float, bool] = (0.0, False)
        # Browsers' sessions (cookies), apart from the drivers' keys at Central above.
        tls = optional_server_context(settings.tls_cert, settings.tls_key)
        self.web = WebShell(
            self,
            Listen(settings.listen_host, settings.http_port, tls),
            Limits(
                MAX_COMMAND_BYTES,
                MAX_CLIENTS,
                CLIENT_QUEUE,
                too_many="too many browsers",
                per_address=settings.max_connections_per_address,
            ),
            routes={"/healthz": Route(self._healthz)},
            logins=Logins(
                COOKIE, DRIVER, "the dashboard", settings.session_ttl, settings.allowed_origin
            ),
        )

    @property
    def port(self) -> int:
        """The web port (the one the OS chose once started on port 0)."""
        return self.web.port

    @property
    def web_sessions(self) -> SessionStore:
        return self.web.sessions

    # --- life ---------------------------------------------------------------------------------

    async def run(self, shutdown: Shutdown) -> None:
        """Serve until shutdown is requested; then close browsers, rooms and the bus."""
        try:
            await self.web.run(shutdown, self._connect, self._push_cps)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Close the web server (and so every browser), every room, then the bus."""
        await self.web.stop()
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
            # Its clock against the network's: a warning in the log when it is off.
            group.create_task(NetworkClock(self.bus.probe_clock, who="driver dashboard").run())

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
            update = self.keys.open(record.value or b"")
        except MessageError as exc:
            log.debug("skipping driver update at offset %d: %s", record.offset, exc)
            return
        if update is None:
            return
        if update_driver_id(update) != key:
            log.debug("skipping driver update at offset %d: key mismatch", record.offset)
            return
        if isinstance(update, LoginResult | CentralIdentity):
            self.keys.answered(update)
            return
        room = self.rooms.get(key)
        if room is not None:
            room.handle(update)

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
        text = dumps(cps_push(self.cp_states, room.active_cp))
        if text != room.last_cps:
            room.last_cps = text
            room.broadcast_text(text)

    # --- the web shell's hooks -----------------------------------------------------------------

    async def check_login(self, form: WebLogin, peer: str) -> LoginOutcome:
        return await self.keys.login(form, peer)

    def session_backed(self, session: WebSession) -> bool:
        return self.keys.live(session)

    async def _healthz(self, request: HttpRequest) -> Response:
        checked_at, broker = self._health
        if time.monotonic() - checked_at > HEALTH_CACHE:
            broker = self.ready and await self.bus.ping()
            self._health = (time.monotonic(), broker)
        body = {
            "status": "ok" if broker else "degraded",
            "broker": broker,
            "browsers": self.web.client_count,
            "drivers": len(self.rooms),
            "cps": len(self.cp_states),
        }
        return json_response(body, 200 if broker else 503)

    async def on_message(self, client: WebClient, data: str | bytes) -> None:
        if isinstance(data, bytes):
            client.push(error("binary messages are not accepted; send JSON text"))
            return
        try:
            command = parse_command(data)
        except MessageError as exc:
            client.push(error(str(exc)))
            return
        try:
            await self._execute(client, command)
        except Exception:  # a bug answers this browser with an error; the server goes on
            log.exception("command %s failed", command.type)
            client.push(error("internal error"))

    async def _execute(self, client: WebClient, command: BrowserCommand) -> None:
        room = self.room_of.get(client)
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

    async def on_connect(self, client: WebClient) -> None:
        """A browser opened /ws: join (or open) its driver's room and bring it up to date."""
        assert client.session is not None  # the shell lets no /ws through without one
        driver_id = client.session.user_id
        client.push({"type": "session", "driver_id": driver_id})
        room = self.rooms.get(driver_id)
        client.push(cps_push(self.cp_states, room.active_cp if room else None))
        if room is None:
            room = DriverRoom(
                driver_id,
                self.keys.publish,
                pause=self.settings.pause,
                answer_timeout=ANSWER_TIMEOUT_FACTOR * self.settings.reply_timeout,
                balance_eur=self.keys.balance(driver_id),
            )
            room.last_cps = dumps(cps_push(self.cp_states, None))
            self.rooms[driver_id] = room
            room.start()
        else:
            room.refresh()
        self.room_of[client] = room
        room.attach(client)
        log.info("driver %s logged in (%d browser(s))", driver_id, len(room.clients))

    async def on_disconnect(self, client: WebClient) -> None:
        room = self.room_of.pop(client, None)
        if room is None:
            return
        if room.detach(client) and self.rooms.get(room.driver_id) is room:
            del self.rooms[room.driver_id]
            await room.close()
            log.info("driver %s left the dashboard", room.driver_id)


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
