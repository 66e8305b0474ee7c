"""The monitor: two independent links (engine, Central) sharing one small state object."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TextIO

from EV_CP_M.config import MonitorSettings
from EV_CP_M.health import HealthSealer
from shared.backoff import Backoff
from shared.bus import KafkaBus, Topics
from shared.centrals import CentralRotation, Next
from shared.clock import FIX, SKEW_WARNING_S, OffsetEstimate, describe, ntp_offset
from shared.errors import ConnectionLost, DeliveryFailed
from shared.framed import FramedConnection, open_framed
from shared.lifecycle import Shutdown
from shared.messages import (
    CENTRAL_TO_MONITOR,
    ENGINE_TO_MONITOR,
    AuthResult,
    CentralToMonitor,
    ClockProbe,
    CPRemoved,
    CPState,
    CPStatusNotice,
    EngineChallenge,
    EngineHello,
    EngineKey,
    EngineToMonitor,
    FaultReport,
    HealthCheck,
    HealthReport,
    HealthSample,
    Heartbeat,
    MonitorAuth,
    RecoveryReport,
)
from shared.sealing import hello_proof
from shared.tls import client_context, describe_failure

log = logging.getLogger(__name__)

AUTH_TIMEOUT = 5.0
REJECTED_PAUSE = 10.0
# A standby Central refused the link (docs/high-availability.md): the active one may be
# another address of the list, or the standby may be about to take over.
STANDBY_PAUSE = 1.0
RETRY_MAX = 5.0
LINK_ERRORS = (ConnectionLost, DeliveryFailed, OSError, TimeoutError)
# Health samples waiting for Kafka: the newest count, older ones are dropped beyond this.
SAMPLE_BACKLOG = 30
# An engine and its monitor usually start together: failed checks while the engine is still
# starting are no fault worth showing on the site dashboard. Samples start with the first
# good check with the link to Central up, or after this many seconds of trying.
SAMPLE_GRACE = 3.0
# For the same reason the monitor first logs in to Central once its engine has answered a
# health check as started (ready, or KO), so the CP goes from DESCONECTADO straight to ACTIVADO.
# An engine still starting or unreachable after this many seconds is reported as the fault it
# then is.
START_GRACE = 10.0
BUS_STOP_TIMEOUT = 2.0


@dataclass
class LinkState:
    """What each link knows and the other needs."""

    engine_ok: bool | None = None  # None until the first check
    engine_detail: str = "not checked yet"
    rtt_ms: float | None = None
    speed: float = 1.0  # the engine's time scale, as its last health report said
    central_up: bool = False  # connected and authenticated
    cp_state: CPState | None = None
    # The key Central issued at the last authentication, for the engine: (key id, base64 key).
    key: tuple[str, str] | None = None
    # Clocks (docs/operations.md): this monitor's minus the network's, as Central measures it,
    # and the last ClockProbe from Central not answered yet ((its ts, when it came), both ours).
    offset_s: float | None = None
    probe: tuple[float, float] | None = None
    central_offset_s: float | None = None  # Central's clock minus the network's, as it says


@dataclass(frozen=True)
class LinkFailure:
    """How a link to Central ended: refused by Central, or what broke (shown on the screen
    when it is worth reading there, as a certificate problem is)."""

    problem: str
    refused: bool = False
    shown: bool = False
    active: str | None = None  # a standby's refusal: where it says the active Central is
    served: bool = False  # the link had been up


class MonitorService:
    """One CP's monitor: an engine link and a Central link under one TaskGroup."""

    def __init__(
        self, settings: MonitorSettings, shutdown: Shutdown, *, screen: TextIO | None = None
    ) -> None:
        self.settings = settings
        self.shutdown = shutdown
        self.screen = screen if screen is not None else sys.stdout
        self.state = LinkState()
        # Engine OK/KO changes, for the Central link to report at once.
        self._changes: asyncio.Queue[tuple[bool, str]] = asyncio.Queue()
        self._central_changed = asyncio.Event()
        # Health samples for the site dashboard (only with --broker).
        self._samples: deque[HealthSample] = deque(maxlen=SAMPLE_BACKLOG)
        self._sample_ready = asyncio.Event()
        self._sample_seq = 0
        self._sampling = False
        self._sampling_from: float | None = None
        self._engine_started = asyncio.Event()  # a health report from a started engine
        # The engine's clock minus this one's, from the health checks' round trips.
        self._engine_clock = OffsetEstimate()
        self._clock_warned = False
        self._removed: str | None = None  # why Central removed this CP (cp_removed), if it did
        self._started_at = 0.0  # loop time the monitor started (set by run)

    async def run(self) -> None:
        self._started_at = asyncio.get_running_loop().time()  # the start-up grace counts from now
        # Health samples go out sealed with a key of the CP's secret (EV_CP_M/health.py).
        sealer = HealthSealer(self.settings.cp_id, self.settings.secret)
        bus = (
            KafkaBus(
                self.settings.broker,
                f"monitor-{self.settings.cp_id}",
                outgoing=sealer.outgoing,
                login=self.settings.kafka,
            )
            if self.settings.broker
            else None
        )
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._engine_link(), name="engine-link"),
                    group.create_task(self._central_link(), name="central-link"),
                ]
                if bus is not None:
                    tasks.append(group.create_task(self._publish_health(bus), name="health-pub"))
                await self.shutdown.wait()
                for task in tasks:
                    task.cancel()
        finally:
            if bus is not None:
                # Best effort: a broker that is down must not hold the monitor's exit.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BUS_STOP_TIMEOUT):
                        await bus.stop()
        log.info("monitor stopped")

    def _say(self, text: str) -> None:
        print(f"[{self.settings.cp_id}] {text}", file=self.screen, flush=True)

    # --- engine link --------------------------------------------------------------------------

    def _set_engine(self, ok: bool, detail: str = "", rtt_ms: float | None = None) -> None:
        changed = self.state.engine_ok is not ok
        self.state.engine_ok, self.state.engine_detail, self.state.rtt_ms = ok, detail, rtt_ms
        self._record_sample()
        if not changed:
            return
        if ok:
            self._say(f"engine OK (round trip {rtt_ms or 0:.1f} ms)")
        else:
            self._say(f"engine KO: {detail}")
        self._changes.put_nowait((ok, detail))

    async def _engine_link(self) -> None:
        host, port = self.settings.engine
        backoff = Backoff(maximum=RETRY_MAX)
        while True:
            try:
                connection = await open_framed(
                    host,
                    port,
                    ENGINE_TO_MONITOR,
                    connect_timeout=max(1.0, self.settings.check_timeout),
                    ack_timeout=self.settings.check_timeout,
                    name="engine",
                )
            except (OSError, TimeoutError) as exc:
                log.debug("engine connect failed: %s", exc)
                self._set_engine(False, "engine unreachable")
                delay = backoff.next_delay()
                self._say(f"cannot reach engine at {host}:{port}; retrying in {delay:.1f} s")
                await self._wait_sampling(delay)
                continue
            log.info("connected to the engine at %s:%d", host, port)
            try:
                async with connection:
                    await self._check_engine(connection, backoff)
            except LINK_ERRORS as exc:
                log.info("engine link ended: %s", exc)
                self._set_engine(False, "engine connection lost")
            # An engine that refuses this monitor (its hello) must not be hammered: the pause
            # grows until a link has served health checks again.
            delay = backoff.next_delay()
            log.info("reconnecting to the engine in %.1f s", delay)
            await self._wait_sampling(delay)

    async def _check_engine(
        self, connection: FramedConnection[EngineToMonitor], backoff: Backoff
    ) -> None:
        """Answer the engine's challenge with a hello, then one health check per interval until
        the connection fails (a good report resets `backoff`)."""
        settings = self.settings
        async with asyncio.timeout(settings.check_timeout + AUTH_TIMEOUT):
            challenge = await connection.receive()
        if not isinstance(challenge, EngineChallenge):
            raise ConnectionLost(f"the engine opened with a {challenge.type}, not a challenge")
        hello = EngineHello(cp_id=settings.cp_id)
        proof = hello_proof(settings.secret, hello.cp_id, hello.id, challenge.nonce)
        await connection.send(hello.model_copy(update={"proof": proof}))
        loop = asyncio.get_running_loop()
        seq = 0
        next_at = loop.time()
        key_sent: tuple[str, str] | None = None
        while True:
            if self.state.key is not None and self.state.key != key_sent:
                key_sent = self.state.key
                await connection.send(
                    EngineKey(cp_id=settings.cp_id, key_id=key_sent[0], key=key_sent[1])
                )
                log.info("handed key %s to the engine", key_sent[0])
            seq += 1
            started = loop.time()
            sent_at = time.time()
            check = HealthCheck(
                seq=seq,
                central_ok=self.state.central_up,
                cp_state=self.state.cp_state,
                central_offset_s=self.state.central_offset_s,
            )
            try:
                async with asyncio.timeout(settings.check_timeout):
                    await connection.send(check)
                    report = await self._report(connection, seq)
            except (TimeoutError, DeliveryFailed):
                self._set_engine(False, f"no health report within {settings.check_timeout:g} s")
            else:
                offset, trip = ntp_offset(sent_at, report.ts, time.time())
                self._engine_clock.add(-offset, trip)
                self._on_report(report, (loop.time() - started) * 1000)
                backoff.reset()
            next_at += settings.interval
            now = loop.time()
            if next_at < now:
                next_at = now  # fell behind (slow engine): no burst of checks
            try:
                # A change of the Central link is told to the engine at once, so that it
                # does not refuse Central's first authorisation for a stale central_ok.
                await asyncio.wait_for(self._central_changed.wait(), next_at - now)
                next_at = loop.time()
            except TimeoutError:
                pass
            self._central_changed.clear()

    def _on_report(self, report: HealthReport, rtt_ms: float) -> None:
        self.state.speed = report.speed
        if report.starting and not self._engine_started.is_set() and not self._start_grace_over():
            # Answering but still starting: no fault yet, unless it takes too long.
            if self.state.engine_detail != "engine starting":
                self.state.engine_detail = "engine starting"
                self._say("engine starting: waiting for it to listen to Central")
            return
        self._engine_started.set()
        if report.ok:
            self._set_engine(True, "", rtt_ms)
        else:
            self._set_engine(False, f"engine reports KO ({report.engine_state})")

    def _start_grace_over(self) -> bool:
        return asyncio.get_running_loop().time() - self._started_at >= START_GRACE

    async def _engine_known(self) -> None:
        """Wait until the engine has answered as started, or the start-up grace is over."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._engine_started.wait(), START_GRACE)
        self._engine_started.set()

    async def _wait_sampling(self, delay: float) -> None:
        """Sleep `delay` s, still sampling every interval: a monitor waiting to reconnect to its
        engine is alive, and the site dashboard must not take it for lost."""
        loop = asyncio.get_running_loop()
        end = loop.time() + delay
        while (remaining := end - loop.time()) > 0:
            await asyncio.sleep(min(remaining, self.settings.interval))
            if end - loop.time() > 0.05:
                self._record_sample()

    @staticmethod
    async def _report(connection: FramedConnection[EngineToMonitor], seq: int) -> HealthReport:
        while True:
            report = await connection.receive()
            if isinstance(report, HealthReport) and report.seq == seq:
                return report
            log.debug("late or unexpected %s ignored", report.type)

    # --- health samples for the site dashboard --------------------------------------------

    def _record_sample(self) -> None:
        """Queue a sample of what the monitor knows now; never blocks the checks."""
        if self.settings.broker is None or self.state.engine_ok is None:
            return
        if not self._sampling:
            now = asyncio.get_running_loop().time()
            if self._sampling_from is None:
                self._sampling_from = now
            # The link to Central comes up only once the engine has answered (START_GRACE), a
            # moment after the first good check: that moment is no fault either.
            healthy = self.state.engine_ok and self.state.central_up
            if not healthy and now - self._sampling_from < SAMPLE_GRACE:
                return
            self._sampling = True
        central_ok = self.state.central_up
        self._samples.append(
            HealthSample(
                cp_id=self.settings.cp_id,
                engine_ok=self.state.engine_ok,
                central_ok=central_ok,
                rtt_ms=round(self.state.rtt_ms, 3) if self.state.rtt_ms is not None else None,
                detail=self.state.engine_detail[:500],
                cp_state=self.state.cp_state if central_ok else None,
                seq=self._sample_seq,
                interval_s=self.settings.interval,
                speed=self.state.speed,
                monitor_offset_s=_rounded(self.state.offset_s),
                engine_offset_s=_rounded(self._engine_offset()),
            )
        )
        self._sample_seq += 1
        self._sample_ready.set()

    def _engine_offset(self) -> float | None:
        """The engine's clock minus the network's, when both parts are measured."""
        engine = self._engine_clock.offset
        if engine is None or self.state.offset_s is None:
            return None
        return self.state.offset_s + engine

    async def _publish_health(self, bus: KafkaBus) -> None:
        """Send queued samples to Kafka, best effort: Kafka down never stops the monitor."""
        cp_id = self.settings.cp_id
        backoff = Backoff(maximum=RETRY_MAX)
        while True:
            try:
                await bus.start()  # retries by itself until the broker answers
                backoff.reset()
                while True:
                    await self._sample_ready.wait()
                    self._sample_ready.clear()
                    while self._samples:
                        await bus.post(Topics.CP_HEALTH, cp_id, self._samples.popleft())
            except Exception as exc:  # the publisher's boundary: log, retry, never crash
                delay = backoff.next_delay()
                log.warning(
                    "cannot publish health samples to Kafka at %s (%s); retrying in %.1f s",
                    bus.bootstrap,
                    exc,
                    delay,
                )
                with contextlib.suppress(Exception):
                    await bus.stop()
                await asyncio.sleep(delay)

    # --- Central link -------------------------------------------------------------------------

    async def _central_link(self) -> None:
        """Keep a link to Central: its addresses in turn, a pause after each whole round."""
        await self._engine_known()
        addresses = self.settings.central
        # TLS verifies Central's certificate and that it is valid for its host (docs/tls.md).
        tls = client_context(self.settings.tls_ca) if self.settings.central_tls else None
        backoff = Backoff(maximum=RETRY_MAX)
        rotation = CentralRotation(addresses)
        while True:
            host, port = rotation.current
            failure = await self._try_central(host, port, tls, backoff)
            if self._removed is not None:
                # Central would refuse it from now on, and refusals in a row get the PC's
                # address blocked for every CP on it: this monitor stops trying.
                self._say(
                    f"Central removed {self.settings.cp_id} ({self._removed}): this monitor "
                    "no longer connects to Central; stop it"
                )
                await asyncio.Event().wait()  # until the monitor is stopped
            if failure.served:
                rotation.served()
            step = rotation.fail(failure.active)
            if step is Next.NAMED:
                then = f"trying the active Central at {failure.active}"
                pause = 0.0
            elif step is Next.NEXT:
                then = "trying the next Central"  # at once: it may be the one that serves
                pause = 0.0
            elif rotation.standby_seen:  # a standby may be taking over: look again soon
                pause = STANDBY_PAUSE
                then = f"retrying in {pause:.0f} s"
            else:
                pause = REJECTED_PAUSE if failure.refused else backoff.next_delay()
                then = f"retrying in {pause:.{0 if failure.refused else 1}f} s"
            if failure.refused:
                self._say(f"Central rejected {self.settings.cp_id}: {failure.problem}; {then}")
            else:
                log.info("Central link: %s", failure.problem)
                why = f" ({failure.problem})" if failure.shown else ""
                self._say(f"cannot reach Central at {host}:{port}{why}; {then}")
            await asyncio.sleep(pause)

    async def _try_central(
        self, host: str, port: int, tls: ssl.SSLContext | None, backoff: Backoff
    ) -> LinkFailure:
        """One link to the Central at host:port, served until it fails; how it failed."""
        try:
            connection = await open_framed(
                host, port, CENTRAL_TO_MONITOR, name="central", ssl_context=tls
            )
        except (OSError, TimeoutError) as exc:
            log.debug("Central connect failed: %s", exc)
            tls_problem = describe_failure(exc)
            if tls_problem:
                return LinkFailure(tls_problem, shown=True)
            return LinkFailure("connection refused or timed out")
        served = False  # authenticated: the round of addresses starts again
        try:
            async with connection:
                result = await self._authenticate(connection)
                if not result.accepted:
                    return LinkFailure(
                        result.reason or "no reason given",
                        refused=True,
                        active=result.active_central,
                    )
                backoff.reset()
                served = True
                await self._serve_central(connection, result)
        except TimeoutError:
            if not served:
                return LinkFailure(f"no answer to authentication within {AUTH_TIMEOUT:.0f} s")
            return LinkFailure("link timed out", served=True)
        except LINK_ERRORS as exc:
            return LinkFailure(str(exc) or "link ended", served=served)
        finally:
            if self.state.central_up:
                self.state.central_up = False
                self._central_changed.set()
                self._say("Central link down")
        return LinkFailure("link ended", served=True)

    async def _authenticate(self, connection: FramedConnection[CentralToMonitor]) -> AuthResult:
        async with asyncio.timeout(AUTH_TIMEOUT):
            await connection.send(
                MonitorAuth(cp_id=self.settings.cp_id, secret=self.settings.secret)
            )
            while True:
                message = await connection.receive()
                if isinstance(message, AuthResult):
                    return message
                self._on_notice(message)

    async def _serve_central(
        self, connection: FramedConnection[CentralToMonitor], result: AuthResult
    ) -> None:
        """Read Central's frames while heartbeats and reports go out; return never, raise."""
        if result.key_id and result.key:
            self.state.key = (result.key_id, result.key)
        if result.central_offset_s is not None:
            self.state.central_offset_s = result.central_offset_s
        self.state.central_up = True
        self._central_changed.set()
        where = result.location or "unknown location"
        price = f", {result.price_eur_kwh:.2f} €/kWh" if result.price_eur_kwh is not None else ""
        self._say(f"Central link up: authenticated ({where}{price})")
        lost: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read_central(connection), name="central-reader")
                group.create_task(self._heartbeats(connection), name="heartbeats")
        except* LINK_ERRORS as errors:
            lost = errors.exceptions[0]
        raise ConnectionLost(str(lost) if lost else "Central link ended")

    async def _read_central(self, connection: FramedConnection[CentralToMonitor]) -> None:
        while True:
            message = await connection.receive()
            if isinstance(message, CPStatusNotice):
                self._on_notice(message)
            elif isinstance(message, ClockProbe):
                self._on_probe(message)
            elif isinstance(message, CPRemoved) and message.cp_id == self.settings.cp_id:
                self._removed = message.reason or "deregistered"
                raise ConnectionLost(f"{message.cp_id} was removed at Central")
            else:
                log.debug("ignoring %s from Central", message.type)

    def _on_probe(self, probe: ClockProbe) -> None:
        """Central's clock: answered in the next heartbeat; and how far off this clock is."""
        self.state.probe = (probe.ts, time.time())
        self.state.offset_s = probe.your_offset_s
        if probe.central_offset_s is not None:
            self.state.central_offset_s = probe.central_offset_s
        offset = probe.your_offset_s
        if offset is None:
            return
        off = abs(offset) >= SKEW_WARNING_S
        if off and not self._clock_warned:
            self._say(f"this PC's clock is {describe(offset)} the network's (Central); {FIX}")
        elif not off and self._clock_warned:
            self._say(f"this PC's clock agrees with the network's again ({offset:+.2f} s)")
        self._clock_warned = off

    def _on_notice(self, notice: CentralToMonitor) -> None:
        if not isinstance(notice, CPStatusNotice) or notice.cp_id != self.settings.cp_id:
            return
        if notice.state != self.state.cp_state:
            self.state.cp_state = notice.state
            self._central_changed.set()
            self._say(f"CP state at Central: {notice.state.value}")

    async def _heartbeats(self, connection: FramedConnection[CentralToMonitor]) -> None:
        """A heartbeat every interval; faults and recoveries the moment they happen."""
        cp_id = self.settings.cp_id
        while not self._changes.empty():
            self._changes.get_nowait()  # the state now is what counts for a new link
        reported = self.state.engine_ok
        if reported is False:
            await connection.send(FaultReport(cp_id=cp_id, detail=self.state.engine_detail))
        loop = asyncio.get_running_loop()
        seq = 0
        next_at = loop.time()
        while True:
            probe, self.state.probe = self.state.probe, None
            engine = self._engine_clock.best()
            await connection.send(
                Heartbeat(
                    cp_id=cp_id,
                    engine_ok=self.state.engine_ok is True,
                    seq=seq,
                    speed=self.state.speed,
                    probe_ts=probe[0] if probe else None,
                    probe_rx=probe[1] if probe else None,
                    engine_offset_s=engine.offset if engine else None,
                    engine_trip_s=engine.spread if engine else None,
                )
            )
            seq += 1
            next_at = max(next_at + self.settings.interval, loop.time())
            while (remaining := next_at - loop.time()) > 0:
                try:
                    ok, detail = await asyncio.wait_for(self._changes.get(), remaining)
                except TimeoutError:
                    break
                if not ok and reported is not False:
                    await connection.send(FaultReport(cp_id=cp_id, detail=detail))
                    log.info("reported engine fault to Central: %s", detail)
                elif ok and reported is False:
                    await connection.send(RecoveryReport(cp_id=cp_id))
                    log.info("reported engine recovery to Central")
                reported = ok


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
