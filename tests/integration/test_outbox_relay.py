"""Central's outbox relay on a real broker: several batches in flight, order kept, none lost.

The relay hands batches to the producer before the previous one is acknowledged; these tests
check that what a transaction queued reaches Kafka in outbox order, that the outbox empties,
and that a broker outage in the middle loses nothing (duplicates are allowed, gaps are not).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from conftest import Broker, _empty_broker

from EV_Central.config import parse
from EV_Central.db import Database
from EV_Central.service import Central
from helpers import scaled
from shared.bus import KafkaBus, Topics
from shared.messages import CP_STATE, CPStateUpdate, decode

TOPIC = Topics.CP_STATE  # unsealed: the test reads the values as they were queued


def update(n: int) -> CPStateUpdate:
    return CPStateUpdate(
        cp_id="CP001", state="ACTIVADO", location=f"row {n}", price_eur_kwh=0.3, max_kw=22.0
    )


@contextlib.asynccontextmanager
async def relay(tmp_path: Path, bootstrap: str) -> AsyncIterator[Central]:
    settings = parse(["--broker", bootstrap, "--db", str(tmp_path / "c.db"), "--console", "off"])
    db = Database(settings.db, demo=False)
    await db.start()
    bus = KafkaBus(bootstrap, "test-relay", retry_max=0.5)
    await bus.start()
    central = Central(settings, bus, db)
    task = asyncio.create_task(central._relay_outbox())
    try:
        yield central
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await bus.stop()
        await db.stop()


async def queue_rows(central: Central, first: int, count: int, per_tx: int = 50) -> None:
    for start in range(first, first + count, per_tx):
        async with central.db.transaction() as tx:
            for n in range(start, min(first + count, start + per_tx)):
                await tx.publish(TOPIC, "CP001", update(n))
        central._outbox_wake.set()
        await asyncio.sleep(0)


async def read_rows(bootstrap: str, want: int) -> list[int]:
    """Row numbers in the order Kafka has them, until every one of 0..want-1 was seen."""
    consumer = AIOKafkaConsumer(TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    seen: list[int] = []
    try:
        async with asyncio.timeout(scaled(90)):
            while len(set(seen)) < want:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        message: Any = decode(CP_STATE, record.value or b"")
                        seen.append(int(message.location.split()[1]))
    finally:
        await consumer.stop()
    return seen


async def outbox_size(central: Central) -> int:
    return int((await central.db.read("SELECT COUNT(*) FROM outbox"))[0][0])


async def wait_empty(central: Central) -> None:
    async with asyncio.timeout(scaled(60)):
        while True:
            if not await outbox_size(central):
                return
            await asyncio.sleep(0.1)


async def test_many_batches_arrive_in_outbox_order_and_the_outbox_empties(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    await _empty_broker(kafka_bootstrap)
    async with relay(tmp_path, kafka_bootstrap) as central:
        await queue_rows(central, 0, 2000)  # 10 batches of 200, several in flight at once
        seen = await read_rows(kafka_bootstrap, 2000)
        await wait_empty(central)
    assert seen == list(range(2000))


async def test_a_broker_outage_loses_nothing_and_keeps_the_order(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="EV_Central.service")
    async with relay(tmp_path, broker.bootstrap) as central:
        await queue_rows(central, 0, 600)
        broker.restart_later()  # stopped, data kept
        await queue_rows(central, 600, 600)  # queued while nothing can be published
        # Down long enough for the batches in flight to fail (the producer's 10 s timeout):
        # the relay must then send everything not acknowledged again, from the oldest.
        async with asyncio.timeout(scaled(60)):
            while True:
                if any("cannot publish" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.2)
        assert await outbox_size(central) > 0
        broker.start()
        seen = await read_rows(broker.bootstrap, 1200)
        await wait_empty(central)
    # Every row arrived; the first arrival of each is in outbox order (a batch that was sent
    # again after the outage may repeat rows, which consumers drop by message id).
    first: list[int] = []
    for n in seen:
        if n not in first:
            first.append(n)
    assert first == list(range(1200))
