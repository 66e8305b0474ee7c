"""The drivers' browser dashboard: one web server for many drivers, over Kafka.

Served by the `websockets` library alone: process_request answers the page, its static files
and /healthz; /ws is the WebSocket each browser talks over. A browser logs in (Central checks
the password over Kafka), then its connection is bound to that driver: it sees the CPs, its own
supply, tickets, balance and history, and may run a file of requests. Two tail consumers feed
the server: driver updates (dispatched by key to the driver's room) and CP states (read from
the start of the compacted topic, pushed to every logged-in browser on change).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
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
    Login,
    Logout,
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
from shared.backoff import Backoff
from shared.bus import BusError, KafkaBus, Topics, decode_record
from shared.errors import ConfigError, MessageError
from shared.lifecycle import Shutdown, run_service
from shared.logs import setup_logging
from shared.messages import (
    CP_STATE,
    DRIVER_UPDATES,
    CPStateUpdate,
    LoginRequest,
    LoginResult,
    Message,
)
from shared.web import bound_port, error_response, json_response, split_path, static_response

log = logging.getLogger(__name__)

PACKAGE = "EV_Driver"
MAX_CLIENTS = 500
CLIENT_QUEUE = 512  # pushes waiting for a slow browser before it is disconnected
CPS_PUSH_INTERVAL = 0.25  # the CP list goes out at most four times a second
HEALTH_CACHE = 1.0
ANSWER_TIMEOUT_FACTOR = 3  # a supply request waits this many reply timeouts for an answer


class Client:
    """One browser's WebSocket: a bounded queue of pushes and, after login, its driver."""

    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=CLIENT_QUEUE)
        self.room: DriverRoom | None = None
        self.logging_in = False

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
        self._logins: dict[str, asyncio.Future[LoginResult]] = {}
        self._cps_changed = asyncio.Event()
        self._health: tuple[float, bool] = (0.0, False)

    # --- life ---------------------------------------------------------------------------------

    async def run(self, shutdown: Shutdown) -> None:
        """Serve until shutdown is requested; then close browsers, rooms and the bus."""
        await self.start_web()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._connect(), name="dashboard-kafka"),
                    group.create_task(self._push_cps(), name="dashboard-cps"),
                ]
                await shutdown.wait()
                for task in tasks:
                    task.cancel()
        except BaseExceptionGroup as failures:
            raise _first_error(failures) from None
        finally:
            await self.stop()

    async def start_web(self) -> None:
        self._server = await serve(
            self._ws_handler,
            self.settings.listen_host,
            self.settings.http_port,
            process_request=self._process_request,
            max_size=MAX_COMMAND_BYTES,
            server_header="EV_Driver",
        )
        self.port = bound_port(self._server.sockets, self.settings.http_port)
        log.info("driver dashboard on http://%s:%d/", self.settings.listen_host, self.port)

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
            update = decode_record(DRIVER_UPDATES, record)
        except MessageError as exc:
            log.debug("skipping driver update at offset %d: %s", record.offset, exc)
            return
        if update_driver_id(update) != key:
            log.debug("skipping driver update at offset %d: key mismatch", record.offset)
            return
        if isinstance(update, LoginResult):
            waiter = self._logins.get(update.request_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(update)
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
        text = json.dumps(
            cps_push(self.cp_states, room.driver_id), ensure_ascii=False, separators=(",", ":")
        )
        if text != room.last_cps:
            room.last_cps = text
            room.broadcast_text(text)

    # --- HTTP ---------------------------------------------------------------------------------

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path, _ = split_path(request.path)
        if path == "/ws":
            return None  # on with the WebSocket handshake
        if path == "/healthz":
            return await self._healthz()
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

    # --- WebSocket ----------------------------------------------------------------------------

    async def _ws_handler(self, conn: ServerConnection) -> None:
        if len(self.clients) >= MAX_CLIENTS:
            await conn.close(1013, "too many browsers")
            return
        client = Client(conn)
        self.clients.add(client)
        try:
            async with asyncio.TaskGroup() as group:
                pump = group.create_task(client.pump(), name="browser-pump")
                await self._read_commands(client, group)
                pump.cancel()
        except* ConnectionClosed:
            pass
        finally:
            self.clients.discard(client)
            await self._unbind(client)

    async def _read_commands(self, client: Client, group: asyncio.TaskGroup) -> None:
        async for data in client.conn:
            if isinstance(data, bytes):
                client.push(error("binary messages are not accepted; send JSON text"))
                continue
            try:
                command = parse_command(data)
            except MessageError as exc:
                client.push(error(str(exc)))
                continue
            try:
                await self._execute(client, command, group)
            except Exception:  # a bug answers this browser with an error; the server goes on
                log.exception("command %s failed", command.type)
                client.push(error("internal error"))

    async def _execute(
        self, client: Client, command: BrowserCommand, group: asyncio.TaskGroup
    ) -> None:
        if isinstance(command, Login):
            if client.logging_in:
                client.push(error("a login is already in progress"))
            else:
                client.logging_in = True
                group.create_task(self._login(client, command), name="browser-login")
            return
        room = client.room
        if room is None:
            client.push(error("log in first"))
            return
        problem: str | None = None
        match command:
            case Logout():
                await self._unbind(client)
                client.push({"type": "logged_out"})
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

    async def _login(self, client: Client, command: Login) -> None:
        try:
            result = await self._check_password(command)
            if isinstance(result, str):
                client.push({"type": "login_result", "ok": False, "reason": result})
                return
            if not result.ok:
                reason = result.reason or "wrong driver id or password"
                client.push({"type": "login_result", "ok": False, "reason": reason})
                return
            await self._bind(client, command.driver_id, result.balance_eur)
        finally:
            client.logging_in = False

    async def _check_password(self, command: Login) -> LoginResult | str:
        """Central's answer to a login, or why there is none."""
        if not self.ready:
            return "the dashboard is not connected to Kafka yet; try again in a moment"
        request = LoginRequest(driver_id=command.driver_id, password=command.password)
        waiter: asyncio.Future[LoginResult] = asyncio.get_running_loop().create_future()
        self._logins[request.id] = waiter
        try:
            await self._publish(request)
            async with asyncio.timeout(self.settings.reply_timeout):
                return await waiter
        except BusError:
            return "cannot reach Kafka; try again in a moment"
        except TimeoutError:
            return "Central did not answer; is it running?"
        finally:
            self._logins.pop(request.id, None)

    async def _bind(self, client: Client, driver_id: str, balance_eur: float | None) -> None:
        if client.room is not None:
            await self._unbind(client)
        client.push({"type": "login_result", "ok": True, "driver_id": driver_id})
        client.push(cps_push(self.cp_states, driver_id))
        room = self.rooms.get(driver_id)
        if room is None:
            room = DriverRoom(
                driver_id,
                self._publish,
                pause=self.settings.pause,
                answer_timeout=ANSWER_TIMEOUT_FACTOR * self.settings.reply_timeout,
                balance_eur=balance_eur,
            )
            room.last_cps = json.dumps(
                cps_push(self.cp_states, driver_id), ensure_ascii=False, separators=(",", ":")
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
        driver_id = getattr(message, "driver_id", None)
        assert isinstance(driver_id, str)
        await self.bus.send(Topics.DRIVER_REQUESTS, driver_id, message)


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
