"""Central's outbox relay (EV_Central/outbox.py) on a real broker: batches in flight, order kept.

The relay hands batches to the producer before the previous one is acknowledged, from its own
task or straight from a handler (`hand_over_new`). These tests check that what transactions
queued reaches Kafka in outbox order, that the outbox empties, and that a broker outage in the
middle loses nothing (duplicates are allowed, gaps are not).

In high-availability mode the batches are Kafka transactions, several open at once: a reader of
committed records sees every row once and in order, and a fenced transaction takes the ones
after it down with it, so what readers see is always a prefix of what Central queued.
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
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from EV_Central.db import Database
from EV_Central.outbox import TRANSACTION_STALL, Fenced, OutboxRelay
from helpers import scaled
from shared.bus import KafkaBus, Topics
from shared.messages import CP_STATE, CPStateUpdate, decode

TOPIC = Topics.CP_STATE  # unsealed: the test reads the values as they were queued


def update(n: int) -> CPStateUpdate:
    return CPStateUpdate(
        cp_id="CP001", state="ACTIVADO", location=f"row {n}", price_eur_kwh=0.3, max_kw=22.0
    )


@contextlib.asynccontextmanager
async def relay(
    tmp_path: Path, bootstrap: str, transactional_ids: tuple[str, ...] = ()
) -> AsyncIterator[OutboxRelay]:
    db = Database(tmp_path / "central.db", demo=False)
    await db.start()
    bus = KafkaBus(bootstrap, "test-relay", retry_max=0.5)
    await bus.start()
    producers = [await bus.transactional_producer(t) for t in transactional_ids]
    outbox = OutboxRelay(db, bus, in_flight=4, transactions=producers)
    outbox.task = asyncio.create_task(outbox.run())  # type: ignore[attr-defined]
    try:
        yield outbox
    finally:
        outbox.task.cancel()  # type: ignore[attr-defined]
        with contextlib.suppress(asyncio.CancelledError, Fenced):
            await outbox.task  # type: ignore[attr-defined]
        for producer in producers:
            with contextlib.suppress(KafkaError):  # a fenced one fails its last abort
                await producer.stop()
        await bus.stop()
        await db.stop()


async def queue_rows(
    outbox: OutboxRelay,
    first: int,
    count: int,
    per_tx: int = 50,
    hand_over: bool = False,
    topic: str = TOPIC,
) -> None:
    """Commit COUNT rows, PER_TX a transaction; hand each over at once, as Central's consumer
    does after a handler, or leave them to the relay's own task."""
    for start in range(first, first + count, per_tx):
        async with outbox.db.transaction() as tx:
            for n in range(start, min(first + count, start + per_tx)):
                await tx.publish(topic, "CP001", update(n))
        if hand_over:
            await outbox.hand_over_new()
        await asyncio.sleep(0)


async def read_rows(bootstrap: str, want: int | None, topic: str = TOPIC) -> list[int]:
    """Row numbers in the order Kafka has them (committed ones only): until every one of
    0..want-1 was seen, or (`want` None) to the end of what is committed now."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    seen: list[int] = []
    try:
        partitions = consumer.assignment()
        end = await consumer.end_offsets(list(partitions))  # the last stable offsets

        async def more() -> bool:
            if want is not None:
                return len(set(seen)) < want
            return bool([tp for tp in partitions if await consumer.position(tp) < end[tp]])

        async with asyncio.timeout(scaled(90)):
            while await more():
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        message: Any = decode(CP_STATE, record.value or b"")
                        seen.append(int(message.location.split()[1]))
    finally:
        await consumer.stop()
    return seen


async def outbox_size(outbox: OutboxRelay) -> int:
    return int((await outbox.db.read("SELECT COUNT(*) FROM outbox"))[0][0])


async def wait_empty(outbox: OutboxRelay) -> None:
    async with asyncio.timeout(scaled(60)):
        while True:
            if not await outbox_size(outbox):
                return
            await asyncio.sleep(0.1)


async def test_many_batches_arrive_in_outbox_order_and_the_outbox_empties(
    tmp_path: Path, broker: Any
) -> None:
    async with relay(tmp_path, broker.bootstrap) as outbox:
        await queue_rows(outbox, 0, 1000)  # 5 batches of 200, several in flight at once
        await queue_rows(outbox, 1000, 1000, hand_over=True)  # and from the handlers' side
        seen = await read_rows(broker.bootstrap, 2000)
        await wait_empty(outbox)
    assert seen == list(range(2000))


async def test_a_broker_outage_loses_nothing_and_keeps_the_order(
    tmp_path: Path, broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="EV_Central.outbox")
    async with relay(tmp_path, broker.bootstrap) as outbox:
        await queue_rows(outbox, 0, 600)
        broker.restart_later()  # stopped, data kept
        await queue_rows(outbox, 600, 600, hand_over=True)  # while nothing can be published
        # Down for longer than the producer's 10 s request timeout: the batches in flight are
        # retried by the (idempotent) producer, those that could not be handed over fail and
        # are sent again by the relay once the ones before them are answered.
        await asyncio.sleep(12)
        assert await outbox_size(outbox) > 0
        broker.start()
        seen = await read_rows(broker.bootstrap, 1200)
        await wait_empty(outbox)
    # Every row arrived, and the last copy of each is in outbox order. After a failure the
    # relay sends again every row not acknowledged, in order; a row sent again may have arrived
    # the first time too, which consumers see as a duplicate (docs/protocol.md, "Delivery").
    last: dict[int, int] = {n: i for i, n in enumerate(seen)}
    assert set(last) == set(range(1200))
    assert sorted(last, key=last.__getitem__) == list(range(1200))


async def test_a_failing_hand_over_is_logged_and_does_not_stop_the_consumer_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(tmp_path / "central.db", demo=False)
    await db.start()
    outbox = OutboxRelay(db, KafkaBus("127.0.0.1:9", "test-relay"))
    async with db.transaction() as tx:
        await tx.publish(TOPIC, "CP001", update(0))
    outbox.wake()
    await db.stop()  # the database is gone: reading the outbox fails
    await outbox.hand_over_new()  # logged, not raised
    assert "handing the outbox to Kafka failed" in caplog.text


def transactional_ids(tmp_path: Path, count: int) -> tuple[str, ...]:
    """Ids of this test's own (the broker is shared by the session)."""
    return tuple(f"test-relay-{tmp_path.name}-{n}" for n in range(count))


async def test_transactions_in_flight_commit_every_row_once_and_in_order(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """Several Kafka transactions open at once (each sends once the one before is in the
    log): a reader of committed records sees each row once, in outbox order."""
    topic = await make_topic(kafka_bootstrap, f"test-relay-order-{tmp_path.name}")
    async with relay(tmp_path, kafka_bootstrap, transactional_ids(tmp_path, 3)) as outbox:
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, len(outbox._in_flight))
                await asyncio.sleep(0)

        watching = asyncio.create_task(watch())
        await queue_rows(outbox, 0, 3000, per_tx=10, hand_over=True, topic=topic)
        seen = await read_rows(kafka_bootstrap, 3000, topic)
        await wait_empty(outbox)
        watching.cancel()
    assert seen == list(range(3000))
    assert most >= 2  # transactions were in flight together


async def test_a_fenced_transaction_takes_the_later_ones_down(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """Another Central starting one of the ids fences that transaction mid-stream: the relay
    raises Fenced, the transactions after it in the pipeline abort, and what readers see is a
    prefix of the rows, with no gap."""
    ids = transactional_ids(tmp_path, 3)
    topic = await make_topic(kafka_bootstrap, f"test-relay-fenced-{tmp_path.name}")
    queued = 0
    async with relay(tmp_path, kafka_bootstrap, ids) as outbox:
        task: asyncio.Task[None] = outbox.task  # type: ignore[attr-defined]

        async def queue_forever() -> None:
            nonlocal queued
            while True:
                async with outbox.db.transaction() as tx:
                    for row in range(queued, queued + 5):
                        await tx.publish(topic, "CP001", update(row))
                queued += 5
                await outbox.hand_over_new()
                await asyncio.sleep(0.002)

        queueing = asyncio.create_task(queue_forever())
        await asyncio.sleep(3)  # transactions flowing, several in flight
        usurper = await KafkaBus(kafka_bootstrap, "test-usurper").transactional_producer(ids[1])
        try:
            # Mostly at once; after TRANSACTION_STALL when Kafka answers the fenced commit with
            # an error aiokafka does not know (its producer then stops and answers nothing).
            done, _ = await asyncio.wait({task}, timeout=TRANSACTION_STALL + scaled(15))
            assert done, "the relay did not notice the fence"
            assert isinstance(task.exception(), Fenced)
        finally:
            queueing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await queueing
            await usurper.stop()
    seen = await read_rows(kafka_bootstrap, None, topic)
    assert seen, "nothing was committed before the fence"
    assert seen == list(range(len(seen)))  # a prefix: in order, once, no gap
    assert len(seen) < queued  # and the rest did not reach anyone


async def make_topic(bootstrap: str, name: str, partitions: int = 3) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name
