"""Central's TCP server for charging-point monitors (port 5000, framed protocol).

A monitor must authenticate its CP first; then it sends a heartbeat every second and
reports faults and recoveries as they happen. Bad input gets NACK (see shared.framed) and
closes at most its own connection.

Abuse is held off per source address (`MonitorLimits`, docs/security.md "Abuse"): connections
that have not authenticated yet are capped per address and get `AUTH_TIMEOUT` to do it; failed
authentications are answered later and later, and an address that keeps failing has its new
connections refused for a growing while (the CPs already connected are not touched); the audit
log gets one row for the first failure of an address a minute and one summary of the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from EV_Central.clocks import Clocks
from EV_Central.cp_links import CPLinks
from EV_Central.feed import Feed
from EV_Central.registry import ChargingPoint
from shared.abuse import ConnectionCap, FailureDigest, Throttle, ThrottleRules
from shared.errors import ConnectionLost, DeliveryFailed, EVError
from shared.framed import FramedConnection, FramedServer, serve_framed
from shared.framing import DEFAULT_MAX_FRAME
from shared.messages import (
    MONITOR_TO_CENTRAL,
    AuthResult,
    ClockProbe,
    CPRemoved,
    CPState,
    CPStatusNotice,
    FaultReport,
    Heartbeat,
    MonitorAuth,
    MonitorToCentral,
    RecoveryReport,
)
from shared.sealing import b64
from shared.tls import HANDSHAKE_TIMEOUT
from shared.web import bound_port

log = logging.getLogger(__name__)

AUTH_TIMEOUT = 5.0
# Central's clock goes to each monitor in answer to the first three heartbeats of a link (the
# third carries the offset the first two measured) and to every CLOCK_PROBE_EVERY-th after:
# the monitor answers it in its next heartbeat, and Central measures the monitor's clock from
# the round trip (EV_Central/clocks.py). Only ever in answer to the monitor: a frame to a
# monitor that has stalled would wait for its ACK and end the link.
CLOCK_PROBE_EVERY = 30
DIGEST_EVERY = 5.0  # seconds between writes of the failure summaries that are due


@dataclass(frozen=True)
class MonitorLimits:
    """What one address may do on :5000 (flags in EV_Central/config.py)."""

    unauthenticated_per_address: int = 256  # connections open at once, not authenticated yet
    failures_before_block: int = 20  # failed authentications in a row, then refused ...
    first_block: float = 5.0  # ... for this long, doubling with each further failure ...
    max_block: float = 60.0  # ... up to this
    audit_window: float = 60.0  # one row, then one summary, per address and window


def _host(peer: object) -> str:
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class MonitorLink:
    """An authenticated monitor connection and the state notices waiting to go to it."""

    def __init__(self, cp: ChargingPoint, conn: FramedConnection[MonitorToCentral]) -> None:
        self.cp = cp
        self.conn = conn
        # State notices, and None for a clock probe.
        self.notices: asyncio.Queue[CPState | None] = asyncio.Queue(maxsize=8)
        self.last_sent: CPState | None = None

    def offer(self, state: CPState) -> None:
        if state != self.last_sent and not self.notices.full():
            self.notices.put_nowait(state)

    def offer_probe(self) -> None:
        if not self.notices.full():
            self.notices.put_nowait(None)

    async def close(self) -> None:
        await self.conn.close()

    async def removed(self, reason: str) -> None:
        """Tell the monitor its CP is gone (best effort: it may be gone already)."""
        with contextlib.suppress(EVError, OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                await self.conn.send(CPRemoved(cp_id=self.cp.id, reason=reason))


class MonitorServer:
    def __init__(
        self,
        links: CPLinks,
        feed: Feed,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        *,
        durable: Callable[[], Awaitable[bool]] | None = None,
        clocks: Clocks | None = None,
        limits: MonitorLimits | None = None,
    ) -> None:
        self.links = links
        self.clocks = clocks if clocks is not None else Clocks()
        # High-availability mode: a new key is sent only once Kafka has it (a standby too).
        self._durable = durable
        self.feed = feed
        self.host = host
        self.port = port
        self.ssl_context = ssl_context  # TLS when set (docs/tls.md)
        self._server: FramedServer[MonitorToCentral] | None = None
        self._closing = False
        limits = limits or MonitorLimits()
        self._unauthenticated = ConnectionCap(limits.unauthenticated_per_address)
        self._failures: Throttle[str] = Throttle(
            ThrottleRules(
                limits.failures_before_block,
                base_delay=0.5,
                max_delay=2.0,
                first_block=limits.first_block,
                max_block=limits.max_block,
            )
        )
        self._digest = FailureDigest(limits.audit_window)
        self._summaries: asyncio.Task[None] | None = None
        feed.on_cps(self._on_cps_changed)

    async def start(self) -> None:
        self._server = await serve_framed(
            self._handle,
            self.host,
            self.port,
            MONITOR_TO_CENTRAL,
            name="monitor",
            max_frame=DEFAULT_MAX_FRAME,
            ssl_context=self.ssl_context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            admit=self._admit,
        )
        self._summaries = asyncio.create_task(self._write_summaries(), name="auth-summaries")
        self.port = bound_port(self._server.sockets, self.port)
        log.info(
            "listening for monitors on %s:%d%s",
            self.host,
            self.port,
            " (TLS)" if self.ssl_context else "",
        )

    async def stop(self) -> None:
        if self._server is None:
            return
        self._closing = True
        await self._server.close()
        self._server = None
        if self._summaries is not None:
            self._summaries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._summaries
            self._summaries = None
        await self._flush_summaries(float("inf"))  # what was counted is not lost

    def _admit(self, conn: FramedConnection[MonitorToCentral]) -> bool:
        """A connection arrives: refused at once from a blocked address, or from one that
        already has its share of connections waiting to authenticate."""
        host = _host(conn.peer)
        if self._failures.retry_after(host, time.monotonic()):
            log.debug("%s: refused on arrival: its address is blocked", conn.name)
            return False
        if not self._unauthenticated.open(host):
            log.debug("%s: refused on arrival: its address has its share waiting", conn.name)
            return False
        return True

    async def _write_summaries(self) -> None:
        while True:
            await asyncio.sleep(DIGEST_EVERY)
            await self._flush_summaries(time.monotonic())

    async def _flush_summaries(self, now: float) -> None:
        for summary in self._digest.due(now):
            log.warning(
                "%d more failed authentications from %s in the last %g s",
                summary.count,
                summary.source,
                summary.window,
            )
            with contextlib.suppress(Exception):  # an audit failure must not stop the port
                await self.links.audit_failures(summary.source, summary.count, summary.window)

    def _on_cps_changed(self, cps: list[ChargingPoint]) -> None:
        for cp in cps:
            link = self.links.link_of(cp.id)
            if isinstance(link, MonitorLink):
                link.offer(cp.state)

    async def _handle(self, conn: FramedConnection[MonitorToCentral]) -> None:
        link: MonitorLink | None = None
        why = "connection closed"
        try:
            try:
                link = await self._authenticate(conn)
            finally:
                self._unauthenticated.close(_host(conn.peer))
            if link is not None:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._send_notices(link))
                    await self._serve(link)
                    raise ConnectionLost("monitor went away")
        except* (ConnectionLost, DeliveryFailed, TimeoutError) as group:
            why = str(group.exceptions[0]) or type(group.exceptions[0]).__name__
        except* Exception:
            why = "internal error"
            log.exception("%s: monitor connection failed", conn.name)
        except* asyncio.CancelledError:
            if not self._closing:
                raise
            # Central is shutting down: ending quietly is the point, not an error.
        finally:
            # A monitor is lost when its connection ends while Central runs, not when Central
            # itself stops: a restarted Central must not settle supplies as "monitor lost".
            if not self._closing and link is not None:
                with contextlib.suppress(Exception):
                    await self.links.lost(link.cp, why, link)

    async def _authenticate(self, conn: FramedConnection[MonitorToCentral]) -> MonitorLink | None:
        first = await asyncio.wait_for(conn.receive(), AUTH_TIMEOUT)
        if not isinstance(first, MonitorAuth):
            await conn.send(
                AuthResult(
                    cp_id=getattr(first, "cp_id", "unknown"),
                    accepted=False,
                    reason="authenticate first",
                )
            )
            return None
        peer = conn.peer
        source = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        key = await self.links.authenticate(first.cp_id, first.secret or "", source)
        cp = self.links.cp(first.cp_id)
        if isinstance(key, str) or cp is None:
            host = _host(peer)
            now = time.monotonic()
            verdict = self._failures.failed(host, now)
            # The first failure of an address in a window gets its own audit row, log line
            # and event; the others are counted, and summarised when the window ends.
            if self._digest.failed(host, now):
                log.warning("%s: refused authentication of %s: %s", conn.name, first.cp_id, key)
                self.feed.note("rejected", f"{first.cp_id}: refused at :5000 ({key})", first.cp_id)
                with contextlib.suppress(Exception):  # an audit failure decides nothing here
                    await self.links.audit_failed(first.cp_id, source, str(key))
            if verdict.blocked_for:
                log.warning(
                    "%s: %d failed authentications: its connections are refused for %g s",
                    host,
                    verdict.failures,
                    verdict.blocked_for,
                )
                with contextlib.suppress(Exception):
                    await self.links.audit_block(host, verdict.failures, verdict.blocked_for)
            await asyncio.sleep(verdict.delay)
            # One reason for every failure: a prober learns nothing about which CPs exist.
            await conn.send(
                AuthResult(cp_id=first.cp_id, accepted=False, reason="unknown CP or wrong secret")
            )
            return None
        if self._durable is not None and not await self._durable():
            log.warning("%s: %s's new key is not in Kafka yet; refused for now", conn.name, cp.id)
            await conn.send(
                AuthResult(
                    cp_id=cp.id, accepted=False, reason="Central cannot reach Kafka; try again"
                )
            )
            return None
        link = MonitorLink(cp, conn)
        await conn.send(
            AuthResult(
                cp_id=cp.id,
                accepted=True,
                location=cp.location,
                price_eur_kwh=cp.price_eur_kwh,
                max_kw=cp.max_kw,
                key_id=key.key_id,
                key=b64(key.key),
                central_offset_s=self.clocks.network.offset,
            )
        )
        await self.links.connected(cp, link)  # a previous link of the CP's is closed
        link.offer(cp.state)
        links = self.links
        clocks = self.clocks

        def heartbeat_fast(message: MonitorToCentral) -> bool:
            # No task switch, no queue: a heartbeat only moves the CP's last-seen time.
            if type(message) is Heartbeat and message.cp_id == cp.id:
                if message.probe_ts is not None or message.engine_offset_s is not None:
                    _measure_clocks(clocks, message)
                if message.seq < 3 or message.seq % CLOCK_PROBE_EVERY == 0:
                    link.offer_probe()
                return links.heartbeat_fast(cp, message.engine_ok, link, message.speed)
            return False

        conn.fast_path = heartbeat_fast
        return link

    async def _serve(self, link: MonitorLink) -> None:
        cp = link.cp
        while True:
            message = await link.conn.receive()
            if getattr(message, "cp_id", cp.id) != cp.id:
                log.warning(
                    "%s: message for %s on %s's connection ignored",
                    link.conn.name,
                    getattr(message, "cp_id", "?"),
                    cp.id,
                )
                continue
            match message:
                case Heartbeat():
                    _measure_clocks(self.clocks, message)
                    if message.seq < 3 or message.seq % CLOCK_PROBE_EVERY == 0:
                        link.offer_probe()
                    await self.links.heartbeat(cp, message.engine_ok, link, message.speed)
                case FaultReport():
                    cp.last_heartbeat = time.time()
                    await self.links.engine_health(cp, False, message.detail)
                case RecoveryReport():
                    await self.links.engine_health(cp, True, "")
                case MonitorAuth():
                    pass  # already authenticated

    async def _send_notices(self, link: MonitorLink) -> None:
        """State notices and clock probes, as they are offered."""
        cp_id = link.cp.id
        while True:
            state = await link.notices.get()
            if state is None:
                offset = self.clocks.monitor_offset_network(cp_id)
                central = self.clocks.network.offset
                await link.conn.send(
                    ClockProbe(cp_id=cp_id, your_offset_s=offset, central_offset_s=central)
                )
                continue
            if state == link.last_sent:
                continue
            await link.conn.send(CPStatusNotice(cp_id=cp_id, state=state))
            link.last_sent = state


def _measure_clocks(clocks: Clocks, heartbeat: Heartbeat) -> None:
    """The clock measurements a heartbeat carries: the round trip of Central's last probe,
    and the monitor's of its engine."""
    if heartbeat.probe_ts is not None and heartbeat.probe_rx is not None:
        t4 = time.time()
        clocks.from_monitor(
            heartbeat.cp_id, heartbeat.probe_ts, heartbeat.probe_rx, heartbeat.ts, t4
        )
    if heartbeat.engine_offset_s is not None:
        trip = heartbeat.engine_trip_s or 0.0
        clocks.engine_via_monitor(heartbeat.cp_id, heartbeat.engine_offset_s, trip)
