"""Central's parts wired together, and the runner that owns every task until shutdown.

`Central` builds each part once and hands it what it works with (docs/architecture.md has
the picture); `run_central` starts the servers, runs Central's tasks in one task group and
stops everything in order on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Sequence

from aiokafka import AIOKafkaProducer

from EV_Central.audit import AuditLog
from EV_Central.auth import PeopleAuth
from EV_Central.clocks import Clocks
from EV_Central.config import CentralSettings
from EV_Central.console import Console
from EV_Central.context import Context
from EV_Central.cp_links import CPLinks
from EV_Central.db import Database
from EV_Central.drivers import Drivers
from EV_Central.feed import Feed
from EV_Central.gate import SealedGate
from EV_Central.inbox import Inbox
from EV_Central.kafka_logins import CpKafkaLogins
from EV_Central.keys import KeyStore
from EV_Central.metrics import CentralStats
from EV_Central.monitor_server import MonitorLimits, MonitorServer
from EV_Central.outbox import OutboxRelay
from EV_Central.registry import Registry
from EV_Central.session import Timers
from EV_Central.store import Store
from EV_Central.supplies import Supplies
from EV_Central.weather_stops import WeatherStops
from EV_Central.web import AdminWeb
from shared.bus import KafkaBus
from shared.clock import FIX, NetworkClock
from shared.lifecycle import Shutdown
from shared.sealing import fingerprint
from shared.tls import optional_server_context
from shared.webapp import Listen

log = logging.getLogger(__name__)

# The garbage collector's first threshold (Python's default is 700 allocations). Under ten
# thousand monitors Central allocates fast, and at 700 every message, future and Kafka record
# alive for a millisecond or more was promoted to the oldest generation, which then had to be
# collected in full (every object Central holds) several times a minute: pauses of 100 ms and
# more. At this threshold such objects die young, freed by reference counting.
GC_YOUNG_THRESHOLD = 50_000
# Outbox batches handed to Kafka before the oldest is acknowledged (EV_Central/outbox.py).
OUTBOX_IN_FLIGHT = 4
# How often the timers run, and how often the replay guard's progress is saved.
TICK_SECONDS = 0.25
REPLAY_SAVE_INTERVAL = 1.0
# Idempotency records are kept this long, and pruned this often.
PROCESSED_KEPT_S = 7 * 24 * 3600.0
PRUNE_INTERVAL = 3600.0


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections; what start-up loaded is never scanned again."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    gc.collect()
    gc.freeze()  # modules, the registry, schemas: alive for the whole run


class Central:
    """Central's parts, each given what it works with; `run()` owns their tasks."""

    def __init__(
        self,
        settings: CentralSettings,
        db: Database,
        *,
        transactions: Sequence[AIOKafkaProducer] = (),
    ) -> None:
        """`transactions`: the active Central's fencing producers (high-availability mode)."""
        self.settings = settings
        self.stats = CentralStats()
        self.stats.role = "active" if transactions else "single"
        self.store = Store(db)
        self.registry = Registry()
        self.audit = AuditLog(db)
        self.people = PeopleAuth(
            self.store,
            max_failures=settings.lockout_after,
            lock_seconds=settings.lockout_seconds,
            audit=self.audit,
        )
        self.keys = KeyStore(self.store)
        self.gate = SealedGate(self.keys, self.audit)
        # Every message to an engine or a driver is sealed on its way out.
        self.bus = KafkaBus(
            settings.broker, "ev-central", outgoing=self.gate.seal_outgoing, login=settings.kafka
        )
        self.outbox = OutboxRelay(
            db,
            self.bus,
            in_flight=OUTBOX_IN_FLIGHT,
            stage_seconds=self.stats.stage_seconds,
            transactions=transactions,
        )
        self.feed = Feed(self.registry, self.bus)
        self.clocks = Clocks(
            NetworkClock(self.bus.probe_clock, who="Central"),
            warn=self._clock_warning,
            last_heard=self._last_heartbeat,
        )
        self.feed.hops = self.clocks.hops
        self.context = context = Context(
            self.store, self.registry, self.bus, self.feed, self.stats, self.clocks
        )
        self.supplies = Supplies(context, Timers.from_settings(settings))
        self.cp_links = CPLinks(
            context,
            self.keys,
            self.audit,
            self.supplies,
            heartbeat_timeout=settings.heartbeat_timeout,
            kafka_logins=CpKafkaLogins(settings.broker, settings.kafka),
        )
        self.weather = WeatherStops(context, self.supplies)
        self.drivers = Drivers(
            context,
            self.keys,
            self.people,
            self.gate,
            self.supplies,
            request_ttl=settings.request_ttl,
            session_ttl=settings.session_ttl,
        )
        self.inbox = Inbox(
            context,
            self.gate,
            self.supplies,
            self.drivers,
            self.outbox,
            saved_positions=bool(transactions),
        )

    async def load(self) -> None:
        """Keys, every registered CP (DESCONECTADO until its monitor connects), live sessions."""
        await self.keys.load()
        log.info(
            "identity key %s (fingerprint %s)",
            self.keys.identity_public,
            fingerprint(self.keys.identity_public),
        )
        cps = await self.cp_links.load()
        await self.weather.load()  # after the CPs: frost at a CP's place holds it
        sessions = await self.supplies.load()
        self.feed.note("start", f"loaded {cps} CPs, {sessions} live sessions")
        # Publish every CP's state once, so that readers of the compacted state topic (the
        # dashboards) know every registered CP, connected or not.
        self.feed.changed_all()

    async def run(self) -> None:
        """Run the background work until cancelled."""
        with self.stats.gc_pauses:
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self.inbox.run(), name="kafka-consumer")
                    tasks.create_task(self.outbox.run(), name="outbox-relay")
                    tasks.create_task(self._tick(), name="timers")
                    tasks.create_task(self.feed.run(), name="state-publisher")
                    tasks.create_task(self._prune(), name="prune")
                    tasks.create_task(self.clocks.run(), name="clock")
            finally:
                await self.drivers.stop()

    async def _tick(self) -> None:
        """Heartbeat timeouts, session timers, the outbox's hand-over and the replay guard."""
        loop = asyncio.get_running_loop()
        replay_saved_at = 0.0
        while True:
            due = loop.time() + TICK_SECONDS
            await asyncio.sleep(TICK_SECONDS)
            self.stats.loop_lag.observe(max(0.0, loop.time() - due))
            now = time.time()
            await self.cp_links.check_heartbeats(now)
            await self.supplies.check_timers(now)
            await self.outbox.hand_over_new()
            if now - replay_saved_at >= REPLAY_SAVE_INTERVAL:
                replay_saved_at = now
                try:
                    await self.keys.save_replay_guard(now)
                except Exception:
                    log.exception("saving the replay guard failed")

    def _last_heartbeat(self, cp_id: str) -> float | None:
        """When a CP's monitor last spoke to Central (the panel's "last heard" of its clocks)."""
        cp = self.registry.get(cp_id)
        return cp.last_heartbeat if cp is not None and cp.last_heartbeat else None

    async def _clock_warning(self, kind: str, peer_id: str, text: str) -> None:
        """A clock is off by SKEW_WARNING_S or more: the log, the panel's feed, the audit."""
        log.warning("%s; %s", text, FIX)
        cp_id = peer_id if kind in ("monitor", "engine") else None
        driver_id = peer_id if kind == "driver" else None
        self.feed.note("clock", f"{text}; {FIX}", cp_id=cp_id, driver_id=driver_id)
        await self.audit.record(
            "clock_skew", "warning", actor=peer_id[:32], source=kind, detail=text
        )

    async def _prune(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            await self.store.prune(older_than_s=PROCESSED_KEPT_S)


async def run_central(settings: CentralSettings, shutdown: Shutdown) -> None:
    if settings.ha:
        from EV_Central.ha import run_ha  # two or more Centrals (docs/high-availability.md)

        await run_ha(settings, shutdown)
        return
    db = Database(settings.db, demo=settings.demo)
    await db.start()
    central = Central(settings, db)
    try:
        await central.load()
        await serve(central, settings, shutdown.wait())
    finally:
        await central.bus.stop()
        await db.stop()


async def serve(central: Central, settings: CentralSettings, until: Awaitable[object]) -> None:
    """Central's servers and tasks, until `until` is done (or a task fails)."""
    # One TLS context (or none) for both servers: :5000 and the admin web.
    tls = optional_server_context(settings.tls_cert, settings.tls_key)
    cluster = None
    if central.stats.role == "active":
        from EV_Central.ha import ClusterView

        cluster = ClusterView(settings.broker, central.bus.client_options)
    monitors = MonitorServer(
        central.cp_links,
        central.feed,
        settings.listen_host,
        settings.port,
        tls,
        durable=central.outbox.durable,
        clocks=central.clocks,
        limits=MonitorLimits(
            unauthenticated_per_address=settings.max_unauthenticated,
            failures_before_block=settings.auth_block_after,
        ),
    )
    web = AdminWeb(
        central.context,
        central.cp_links,
        central.people,
        central.audit,
        Listen(settings.listen_host, settings.http_port, tls),
        session_ttl=settings.session_ttl,
        allowed_origins=settings.allowed_origin,
        keep_sessions=central.stats.role == "active",
        durable=central.outbox.durable,
        cluster=cluster.status if cluster is not None else None,
        per_address=settings.max_connections_per_address,
        weather=central.weather,
    )
    console = Console(
        central.registry, central.feed, central.cp_links, central.audit, settings.console
    )
    try:
        tune_garbage_collector()
        # Serve monitors and the admin page at once; Kafka may still be coming up.
        await monitors.start()
        await web.start()
        await central.bus.start(ensure_topics=True)  # Central makes the topics, also when secured
        log.info(
            "Central ready: monitors on :%d, admin on :%d, Kafka at %s",
            monitors.port,
            web.port,
            settings.broker,
        )
        async with asyncio.TaskGroup() as tasks:
            work = tasks.create_task(central.run(), name="central")
            panel = tasks.create_task(console.run(), name="console")
            await until
            work.cancel()
            panel.cancel()
    finally:
        log.info("Central stopping")
        with contextlib.suppress(Exception):
            await monitors.stop()
        with contextlib.suppress(Exception):
            await web.stop()
        if cluster is not None:
            await cluster.close()
