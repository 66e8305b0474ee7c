"""`python -m EV_CP_M dashboard --broker HOST:PORT`: the site dashboard (:8003).

Reads the monitors' health samples (ev.cp.health, from one hour ago) and Central's CP states
(ev.cp.state, compacted, from the start) into a pure `Site`, and serves it with the `websockets`
library: the page and its files, /healthz, /api/site, and /ws, which sends a snapshot and then
the site every half second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from EV_CP_M.site import SILENCE_S, Site
from shared.backoff import Backoff
from shared.bus import KafkaBus, Topics, decode_record
from shared.errors import ConfigError, MessageError
from shared.lifecycle import Shutdown, run_service
from shared.logs import setup_logging
from shared.messages import CP_HEALTH, CP_STATE
from shared.settings import (
    EnvArgumentParser,
    add_common_options,
    broker_address,
    port_number,
    seconds,
)
from shared.tls import HANDSHAKE_TIMEOUT, add_server_options, optional_server_context
from shared.web import bound_port, error_response, json_response, split_path, static_response

log = logging.getLogger(__name__)

PACKAGE = "EV_CP_M"
PUSH_INTERVAL = 0.5  # the page is never more than this behind (the brief asks for 1 s)
MAX_CLIENT_BYTES = 1024  # browsers send tiny messages, if any
MAX_CLIENTS = 100
CLIENT_QUEUE = 64
MAX_INVALID = 20  # a client that keeps sending nonsense is closed
CATCH_UP_LIMIT = 20.0  # seconds of history replay before live ticking starts anyway
BUS_STOP_TIMEOUT = 2.0
RTT_RECENT_S = 5.0  # round-trip points sent with each push (the page keeps the history)


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DashboardSettings:
    broker: str
    http_port: int = 8003
    listen_host: str = "0.0.0.0"
    monitor_timeout: float = SILENCE_S
    log_level: str = "INFO"
    log_json: bool = False
    tls_cert: str | None = None  # HTTPS and WSS with both (docs/tls.md)
    tls_key: str | None = None


def build_parser(environ: Mapping[str, str] | None = None) -> EnvArgumentParser:
    parser = EnvArgumentParser(
        prog="EV_CP_M dashboard",
        description="The site dashboard: the health of the site's CPs, from their monitors.",
        environ=environ,
    )
    parser.add_option(
        "--broker", required=True, type=broker_address, help="Kafka bootstrap HOST:PORT"
    )
    parser.add_option("--http-port", type=port_number, default=8003, help="web port")
    parser.add_option("--listen-host", default="0.0.0.0", help="address the server binds to")
    parser.add_option(
        "--monitor-timeout",
        type=seconds,
        default=SILENCE_S,
        help="seconds without a health sample before a CP's monitor counts as lost",
    )
    add_server_options(parser, "the site dashboard")
    add_common_options(parser)
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> DashboardSettings:
    """Parse the command line; exits 2 on bad arguments, raises ConfigError on bad env."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    tls_cert, tls_key = args.tls_cert or None, args.tls_key or None
    optional_server_context(tls_cert, tls_key)  # bad TLS files: ConfigError now, not later
    return DashboardSettings(
        broker=args.broker,
        http_port=args.http_port,
        listen_host=args.listen_host,
        monitor_timeout=args.monitor_timeout,
        log_level=args.log_level,
        log_json=args.log_json,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )


# --- what a browser may send ------------------------------------------------------------------


class _ClientMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: Annotated[str, Field(max_length=64)] | None = None


class PingRequest(_ClientMessage):
    """Answered with a pong (the page may use it to measure the link)."""

    type: Literal["ping"]


class SnapshotRequest(_ClientMessage):
    """Asks for a full snapshot again (with the round-trip history)."""

    type: Literal["snapshot"]


ClientMessage = Annotated[PingRequest | SnapshotRequest, Field(discriminator="type")]
CLIENT_MESSAGE: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


def client_error(detail: str, ref: str | None = None) -> str:
    return json.dumps({"type": "error", "ref": ref, "detail": detail})


def parse_client_message(raw: str | bytes) -> ClientMessage:
    """Validate one browser message; raise MessageError with a short reason."""
    if isinstance(raw, bytes):
        raise MessageError("binary messages are not accepted")
    try:
        return CLIENT_MESSAGE.validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        reason = errors[0]["msg"] if errors else "invalid"
        raise MessageError(f"invalid message at {where or 'message'}: {reason}") from None


# --- the service ------------------------------------------------------------------------------


class SiteDashboard:
    """Kafka in, a pure Site in the middle, HTTP and WebSocket out."""

    def __init__(
        self,
        settings: DashboardSettings,
        shutdown: Shutdown,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.shutdown = shutdown
        self.clock = clock
        self.site = Site(clock=clock, silence=settings.monitor_timeout)
        self.bus = KafkaBus(settings.broker, "site-dashboard")
        self.port = settings.http_port
        self.ready = False  # the last hour of samples has been replayed
        self.consuming = False
        self.invalid_messages = 0
        self._server: Server | None = None
        self._clients: dict[ServerConnection, asyncio.Queue[str]] = {}
        self._broker_cache: tuple[float, bool] = (0.0, False)

    async def run(self) -> None:
        await self.start_web()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._feed(), name="site-feed"),
                    group.create_task(self._push(), name="site-push"),
                ]
                await self.shutdown.wait()
                for task in tasks:
                    task.cancel()
        finally:
            await self.stop()
        log.info("site dashboard stopped")

    @property
    def tls(self) -> bool:
        """True when the dashboard is served over TLS (HTTPS, WSS)."""
        return self.settings.tls_cert is not None

    async def start_web(self) -> None:
        tls = optional_server_context(self.settings.tls_cert, self.settings.tls_key)
        self._server = await serve(
            self._ws_handler,
            self.settings.listen_host,
            self.settings.http_port,
            process_request=self._process_request,
            max_size=MAX_CLIENT_BYTES,
            max_queue=4,
            server_header="EV_CP_M site dashboard",
            ssl=tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if tls else None,
        )
        self.port = bound_port(self._server.sockets, self.settings.http_port)
        scheme = "https" if tls else "http"
        log.info("site dashboard on %s://%s:%d/", scheme, self.settings.listen_host, self.port)

    async def stop(self) -> None:
        """Close the server and the bus (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BUS_STOP_TIMEOUT):
                    await server.wait_closed()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BUS_STOP_TIMEOUT):
                await self.bus.stop()

    # --- Kafka ----------------------------------------------------------------------------

    async def _feed(self) -> None:
        """Subscribe, rewind, consume; start again (keeping what is known) on any failure."""
        backoff = Backoff(maximum=5.0)
        while True:
            try:
                await self.bus.start()
                consumer = await self.bus.tail_consumer(
                    [Topics.CP_STATE, Topics.CP_HEALTH], from_start=True
                )
                catch_up = await self._rewind(consumer)
                backoff.reset()
                await self._consume(consumer, catch_up)
            except Exception as exc:  # the feed's boundary: the page stays up and says so
                self.consuming = False
                delay = backoff.next_delay()
                log.warning("Kafka feed failed (%s); starting again in %.1f s", exc, delay)
                with contextlib.suppress(Exception):
                    await self.bus.stop()
                await asyncio.sleep(delay)

    async def _rewind(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, int]:
        """Put the health partitions at one hour ago; return the end offsets to catch up to."""
        partitions = sorted(consumer.assignment())
        health = [tp for tp in partitions if tp.topic == Topics.CP_HEALTH]
        since_ms = int((self.clock() - self.site.window) * 1000)
        found = await consumer.offsets_for_times({tp: since_ms for tp in health})
        for tp in health:
            hit = found.get(tp)
            if hit is None:
                await consumer.seek_to_end(tp)  # nothing within the hour
            else:
                consumer.seek(tp, hit.offset)
        ends = await consumer.end_offsets(partitions)
        catch_up = {}
        for tp in partitions:
            if await consumer.position(tp) < ends[tp]:
                catch_up[tp] = ends[tp]
        log.info(
            "reading CP states from the start and health samples since %s (%d partitions)",
            time.strftime("%H:%M:%S", time.localtime(since_ms / 1000)),
            len(catch_up),
        )
        self.consuming = True
        return catch_up

    async def _consume(
        self, consumer: AIOKafkaConsumer, catch_up: dict[TopicPartition, int]
    ) -> None:
        loop = asyncio.get_running_loop()
        replay_until = loop.time() + CATCH_UP_LIMIT
        self.ready = self.ready or not catch_up
        backoff = Backoff(maximum=5.0)
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            except KafkaError as exc:
                self.consuming = False
                delay = backoff.next_delay()
                log.warning(
                    "cannot read from Kafka (%s); retrying in %.1f s", type(exc).__name__, delay
                )
                await asyncio.sleep(delay)
                continue
            self.consuming = True
            backoff.reset()
            for tp, records in batches.items():
                for record in records:
                    self._handle(record)
                if records and tp in catch_up and records[-1].offset + 1 >= catch_up[tp]:
                    del catch_up[tp]
            if not batches and catch_up:
                # Compaction can leave gaps before the end: ask where each partition is.
                for tp, end in list(catch_up.items()):
                    if await consumer.position(tp) >= end:
                        del catch_up[tp]
            if not self.ready and (not catch_up or loop.time() > replay_until):
                self.ready = True
                log.info("history replayed: %d CPs known", len(self.site.cps))

    def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Validate one record into the Site; an invalid one is logged, counted, skipped."""
        try:
            if record.topic == Topics.CP_HEALTH:
                self.site.on_sample(decode_record(CP_HEALTH, record))
            elif record.topic == Topics.CP_STATE:
                self.site.on_state(decode_record(CP_STATE, record))
        except MessageError as exc:
            self.invalid_messages += 1
            log.warning(
                "skipped an invalid record %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )

    # --- views ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "consuming": self.consuming,
            "invalid_messages": self.invalid_messages,
            "websocket_clients": len(self._clients),
        }

    def site_json(self, *, full_rtt: bool) -> dict[str, Any]:
        view = self.site.view()
        if full_rtt:
            view["rtt"] = self.site.rtt_history()
        else:
            since = self.clock() - RTT_RECENT_S
            view["rtt"] = {
                cp_id: [p for p in points if p[0] >= since]
                for cp_id, points in self.site.rtt_history().items()
            }
        view["status"] = self.status()
        return view

    def snapshot(self) -> str:
        return json.dumps({"type": "snapshot", **self.site_json(full_rtt=True)})

    async def _push(self) -> None:
        """Tick the site (silent monitors) and push it to every browser twice a second."""
        while True:
            await asyncio.sleep(PUSH_INTERVAL)
            if self.ready:
                self.site.tick()
            if self._clients:
                self._broadcast(json.dumps({"type": "site", **self.site_json(full_rtt=False)}))

    # --- HTTP -----------------------------------------------------------------------------

    async def _broker_ok(self) -> bool:
        checked_at, ok = self._broker_cache
        if time.monotonic() - checked_at > 1.0:
            ok = await self.bus.ping(within=1.0)
            self._broker_cache = (time.monotonic(), ok)
        return ok

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path, _query = split_path(request.path)
        if path == "/ws":
            return None  # on to the WebSocket handshake
        if path in ("/", "/index.html"):
            return static_response(PACKAGE, "index.html")
        if path.startswith("/static/"):
            return static_response(PACKAGE, path.removeprefix("/static/"))
        if path == "/api/site":
            return json_response(self.site_json(full_rtt=True))
        if path == "/healthz":
            broker = await self._broker_ok()
            ok = broker and self.consuming
            body = {"status": "ok" if ok else "degraded", "broker": broker, **self.status()}
            return json_response(body, 200 if ok else 503)
        return error_response(404, f"no such resource: {path}")

    # --- WebSocket ------------------------------------------------------------------------

    def _broadcast(self, text: str) -> None:
        for conn, queue in list(self._clients.items()):
            if queue.full():
                log.warning("site client %s too slow; closing it", conn.remote_address)
                self._clients.pop(conn, None)
                conn.transport.abort()
            else:
                queue.put_nowait(text)

    async def _ws_handler(self, conn: ServerConnection) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            await conn.close(1013, "too many clients")
            return
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=CLIENT_QUEUE)
        queue.put_nowait(self.snapshot())
        self._clients[conn] = queue
        try:
            async with asyncio.TaskGroup() as tasks:
                sender = tasks.create_task(self._pump(conn, queue))
                await self._read(conn, queue)
                sender.cancel()
        except* ConnectionClosed:
            pass
        finally:
            self._clients.pop(conn, None)

    @staticmethod
    async def _pump(conn: ServerConnection, queue: asyncio.Queue[str]) -> None:
        while True:
            await conn.send(await queue.get())

    async def _read(self, conn: ServerConnection, queue: asyncio.Queue[str]) -> None:
        invalid = 0
        async for raw in conn:
            try:
                message = parse_client_message(raw)
            except MessageError as exc:
                invalid += 1
                log.info("invalid message from %s: %s", conn.remote_address, exc)
                if invalid > MAX_INVALID:
                    await conn.close(1008, "too many invalid messages")
                    return
                self._enqueue(conn, queue, client_error(str(exc)))
                continue
            if isinstance(message, PingRequest):
                reply = json.dumps({"type": "pong", "ref": message.ref, "now": self.clock()})
                self._enqueue(conn, queue, reply)
            else:
                self._enqueue(conn, queue, self.snapshot())

    def _enqueue(self, conn: ServerConnection, queue: asyncio.Queue[str], text: str) -> None:
        if queue.full():
            conn.transport.abort()
        else:
            queue.put_nowait(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m EV_CP_M dashboard ...`."""
    try:
        settings = parse_settings(argv)
    except ConfigError as exc:
        print(f"EV_CP_M dashboard: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)

    async def serve_site(shutdown: Shutdown) -> None:
        await SiteDashboard(settings, shutdown).run()

    return run_service(serve_site)
