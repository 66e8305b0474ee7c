"""Wires Central's parts together and runs them until shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from EV_Central.config import CentralSettings
from EV_Central.console import Console
from EV_Central.db import Database
from EV_Central.monitor_server import MonitorServer
from EV_Central.service import Central
from EV_Central.web import AdminWeb
from shared.bus import KafkaBus
from shared.lifecycle import Shutdown
from shared.tls import optional_server_context

log = logging.getLogger(__name__)

# The garbage collector's first threshold (Python's default is 700 allocations). Under ten
# thousand monitors Central allocates fast, and at 700 every message, future and Kafka record
# alive for a millisecond or more was promoted to the oldest generation, which then had to be
# collected in full (every object Central holds) several times a minute: pauses of 100 ms and
# more. At this threshold such objects die young, freed by reference counting.
GC_YOUNG_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections; what start-up loaded is never scanned again."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    gc.collect()
    gc.freeze()  # modules, the registry, schemas: alive for the whole run


async def run_central(settings: CentralSettings, shutdown: Shutdown) -> None:
    # One TLS context (or none) for both servers: :5000 and the admin web.
    tls = optional_server_context(settings.tls_cert, settings.tls_key)
    db = Database(settings.db, demo=settings.demo)
    await db.start()
    bus = KafkaBus(settings.broker, "ev-central")
    central = Central(settings, bus, db)
    monitors = MonitorServer(central, settings.listen_host, settings.port, tls)
    web = AdminWeb(central, settings.listen_host, settings.http_port, tls)
    console = Console(central, settings.console)
    try:
        await central.load()
        tune_garbage_collector()
        # Serve monitors and the admin page at once; Kafka may still be coming up.
        await monitors.start()
        await web.start()
        await bus.start()
        log.info(
            "Central ready: monitors on :%d, admin on :%d, Kafka at %s",
            monitors.port,
            web.port,
            settings.broker,
        )
        async with asyncio.TaskGroup() as tasks:
            work = tasks.create_task(central.run(), name="central")
            panel = tasks.create_task(console.run(), name="console")
            await shutdown.wait()
            work.cancel()
            panel.cancel()
    finally:
        log.info("Central stopping")
        with contextlib.suppress(Exception):
            await monitors.stop()
        with contextlib.suppress(Exception):
            await web.stop()
        await bus.stop()
        await db.stop()
