"""`python -m EV_CP_M dashboard --broker HOST:PORT`: the site dashboard (:8003).

Reads the monitors' health samples (ev.cp.health, from one hour ago; only those sealed with a
key of a CP secret it was given, `--cp-secrets`, EV_CP_M/health.py) and Central's CP states
(ev.cp.state, compacted, from the start) into a pure `Site`, and serves it with the shared web
shell (shared/webshell.py): the page and its files, and /ws, which sends a snapshot and then the
site every half second. Its own parts plug in: /healthz, /api/site, and the answers to a
browser's ping and snapshot requests. The site is public and read-only: no logins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from websockets.http11 import Response

from EV_CP_M.health import HealthOpener
from EV_CP_M.site import SILENCE_S, Site
from shared.backoff import Backoff
from shared.bus import KafkaBus, Records, Topics, consume, decode_record
from shared.clock import NetworkClock
from shared.errors import ConfigError, MessageError
from shared.kafka_access import KafkaLogin
from shared.lifecycle import Shutdown, run_service
from shared.logs import setup_logging
from shared.messages import CP_STATE, decode
from shared.sealing import SealError
from shared.settings import (
    EnvArgumentParser,
    add_common_options,
    add_kafka_login_options,
    broker_address,
    identifier,
    port_number,
    seconds,
)
from shared.tls import add_server_options, optional_server_context
from shared.web import json_response
from shared.webapp import (
    PER_ADDRESS,
    HttpRequest,
    Limits,
    Listen,
    Route,
    WebApp,
    WebClient,
    add_connection_options,
    server_fields,
)
from shared.webshell import WebShell

log = logging.getLogger(__name__)

PUSH_INTERVAL = 0.5  # the page is never more than this behind (the brief asks for 1 s)
MAX_CLIENT_BYTES = 1024  # browsers send tiny messages, if any
MAX_CLIENTS = 100
CLIENT_QUEUE = 64
MAX_INVALID = 20  # a client that keeps sending nonsense is closed
CATCH_UP_LIMIT = 20.0  # seconds of history replay before live ticking starts anyway
BUS_STOP_TIMEOUT = 2.0
RTT_RECENT_S = 5.0  # round-trip points sent with each push (the page keeps the history)
REFUSAL_LOG_INTERVAL = 10.0  # refused health samples are logged at most this often


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
    max_connections_per_address: int = PER_ADDRESS  # connections open at once from one host
    # The site's CPs and their secrets: only their sealed health samples are shown.
    cp_secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    kafka: KafkaLogin | None = None  # a secured broker's login (docs/security.md)


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
    parser.add_option(
        "--cp-secrets",
        type=cp_secrets,
        default={},
        metavar="ID=SECRET,...",
        help="the site's CPs and their secrets (as their monitors have them): only health "
        "samples sealed by these CPs' monitors are shown",
    )
    add_server_options(parser, "the site dashboard")
    add_connection_options(parser)
    add_kafka_login_options(parser)
    add_common_options(parser)
    return parser


def cp_secrets(value: str) -> dict[str, str]:
    """`CP001=secret1,CP002=secret2` as a mapping; argparse error for a malformed item."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        cp_id, equals, secret = item.partition("=")
        if not equals or not cp_id or not secret:
            raise argparse.ArgumentTypeError(f"expected CP_ID=SECRET, got {cp_id or item!r}")
        pairs[identifier(cp_id)] = secret
    return pairs


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> DashboardSettings:
    """Parse the command line; exits 2 on bad arguments, raises ConfigError on bad env."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    return DashboardSettings(
        **server_fields(args), monitor_timeout=args.monitor_timeout, cp_secrets=args.cp_secrets
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


def client_error(detail: str, ref: str | None = None) -> dict[str, Any]:
    return {"type": "error", "ref": ref, "detail": detail}


def parse_client_message(raw: str | bytes) -> ClientMessage:
    """Validate one browser message; raise MessageError with a short reason."""
    if isinstance(raw, bytes):
        raise MessageError("binary messages are not accepted")
    return decode(CLIENT_MESSAGE, raw.encode("utf-8"), MAX_CLIENT_BYTES)


# --- the service ------------------------------------------------------------------------------


class SiteDashboard(WebApp):
    """Kafka in, a pure Site in the middle, HTTP and WebSocket out."""

    web_name = "site dashboard"
    static_package = "EV_CP_M"
    server_header = "EV_CP_M site dashboard"

    def __init__(
        self,
        settings: DashboardSettings,
        shutdown: Shutdown,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`clock`: the time (tests drive it by hand); by default the network's, as this PC
        measures it (shared/clock.py), on which the monitors' samples are placed."""
        self.settings = settings
        self.shutdown = shutdown
        self.bus = KafkaBus(settings.broker, "site-dashboard", login=settings.kafka)
        self.network = NetworkClock(self.bus.probe_clock, who="site dashboard")
        self._measuring: asyncio.Task[None] | None = None
        self.clock = clock or self.network.now
        self.site = Site(clock=self.clock, silence=settings.monitor_timeout)
        self.ready = False  # the last hour of samples has been replayed
        self.consuming = False
        self.invalid_messages = 0
        self.health = HealthOpener(settings.cp_secrets)
        self.refused_samples = 0  # health samples not sealed by a known CP's monitor
        self._refusal_logged = (-REFUSAL_LOG_INTERVAL, 0)  # when, and the count then
        self._invalid: dict[WebClient, int] = {}  # invalid messages of each open WebSocket
        self._broker_cache: tuple[float, bool] = (0.0, False)
        # Public and read-only: no logins, and any page may watch.
        tls = optional_server_context(settings.tls_cert, settings.tls_key)
        self.web = WebShell(
            self,
            Listen(settings.listen_host, settings.http_port, tls),
            Limits(
                MAX_CLIENT_BYTES,
                MAX_CLIENTS,
                CLIENT_QUEUE,
                max_queue=4,
                per_address=settings.max_connections_per_address,
            ),
            routes={"/api/site": Route(self._api_site), "/healthz": Route(self._healthz)},
        )

    @property
    def port(self) -> int:
        """The web port (the one the OS chose once started on port 0)."""
        return self.web.port

    async def run(self) -> None:
        if not self.health.cps:
            log.warning(
                "no --cp-secrets: no health sample can be checked, so none is shown "
                "(give the secrets of this site's CPs)"
            )
        try:
            await self.web.run(self.shutdown, self._feed, self._push)
        finally:
            await self.stop()
        log.info("site dashboard stopped")

    async def stop(self) -> None:
        """Close the server and the bus (idempotent)."""
        await self.web.stop()
        if self._measuring is not None:
            self._measuring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._measuring
            self._measuring = None
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
                if self._measuring is None:
                    await self.network.measure()  # before the last hour is placed in time
                    self._measuring = asyncio.create_task(self.network.run(), name="clock")
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

        def failed(_exc: KafkaError) -> None:
            self.consuming = False

        async def handle(batches: Records) -> None:
            self.consuming = True
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

        await consume(
            consumer,
            handle,
            what="CP states and health samples",
            max_records=2000,
            on_failure=failed,
        )

    def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Validate one record into the Site; an invalid one is logged, counted, skipped."""
        try:
            if record.topic == Topics.CP_HEALTH:
                self.site.on_sample(self.health.open(record.value or b""))
            elif record.topic == Topics.CP_STATE and record.value is None:
                self.site.on_removed((record.key or b"").decode("utf-8", "replace"))
            elif record.topic == Topics.CP_STATE:
                self.site.on_state(decode_record(CP_STATE, record))
        except SealError as exc:
            self._refused(exc)
        except MessageError as exc:
            self.invalid_messages += 1
            log.warning(
                "skipped an invalid record %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )

    def _refused(self, exc: SealError) -> None:
        """Count a refused health sample; log at most one line per interval, with the count."""
        self.refused_samples += 1
        now = time.monotonic()
        logged_at, count = self._refusal_logged
        if now - logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "refused a health sample: %s (%d refused since the last such line)",
                exc,
                self.refused_samples - count,
            )
            self._refusal_logged = (now, self.refused_samples)

    # --- views ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "consuming": self.consuming,
            "invalid_messages": self.invalid_messages,
            "refused_samples": self.refused_samples,
            "websocket_clients": self.web.client_count,
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

    def snapshot(self) -> dict[str, Any]:
        return {"type": "snapshot", **self.site_json(full_rtt=True)}

    async def _push(self) -> None:
        """Tick the site (silent monitors) and push it to every browser twice a second."""
        while True:
            await asyncio.sleep(PUSH_INTERVAL)
            if self.ready:
                self.site.tick()
            if self.web.client_count:
                self.web.broadcast({"type": "site", **self.site_json(full_rtt=False)})

    # --- HTTP -----------------------------------------------------------------------------

    async def _broker_ok(self) -> bool:
        checked_at, ok = self._broker_cache
        if time.monotonic() - checked_at > 1.0:
            ok = await self.bus.ping(within=1.0)
            self._broker_cache = (time.monotonic(), ok)
        return ok

    async def _api_site(self, request: HttpRequest) -> Response:
        return json_response(self.site_json(full_rtt=True))

    async def _healthz(self, request: HttpRequest) -> Response:
        broker = await self._broker_ok()
        ok = broker and self.consuming
        body = {"status": "ok" if ok else "degraded", "broker": broker, **self.status()}
        return json_response(body, 200 if ok else 503)

    # --- WebSocket ------------------------------------------------------------------------

    async def on_connect(self, client: WebClient) -> None:
        client.push(self.snapshot())

    async def on_disconnect(self, client: WebClient) -> None:
        self._invalid.pop(client, None)

    async def on_message(self, client: WebClient, raw: str | bytes) -> None:
        try:
            message = parse_client_message(raw)
        except MessageError as exc:
            invalid = self._invalid[client] = self._invalid.get(client, 0) + 1
            log.info("invalid message from %s: %s", client.peer, exc)
            if invalid > MAX_INVALID:
                await client.conn.close(1008, "too many invalid messages")
                return
            client.push(client_error(str(exc)))
            return
        if isinstance(message, PingRequest):
            client.push({"type": "pong", "ref": message.ref, "now": self.clock()})
        else:
            client.push(self.snapshot())


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
