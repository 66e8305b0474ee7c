"""shared.bus's consume loops against a real broker: every record reaches the handler, in order."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from helpers import scaled, wait_for
from shared.bus import KafkaBus, Record, Records, TopicSpec, consume, consume_each

pytestmark = pytest.mark.kafka


async def started_bus(bootstrap: str, topic: str) -> KafkaBus:
    bus = KafkaBus(bootstrap, client_id="test-consume")
    await bus.start(ensure_topics=False)
    await bus.ensure_topics([TopicSpec(topic, partitions=2)])
    return bus


async def test_consume_each_hands_over_every_record_in_order_per_key(
    kafka_bootstrap: str,
) -> None:
    topic = f"test-consume-{uuid.uuid4().hex[:8]}"
    bus = await started_bus(kafka_bootstrap, topic)
    try:
        consumer = await bus.tail_consumer([topic])
        seen: dict[bytes, list[bytes]] = {}

        async def handle(record: Record) -> None:
            assert record.key is not None and record.value is not None
            seen.setdefault(record.key, []).append(record.value)

        reading = asyncio.create_task(consume_each(consumer, handle, what="test records"))
        sent = {key: [f"{key.decode()}-{n}".encode() for n in range(20)] for key in (b"a", b"b")}
        for n in range(20):
            for key, values in sent.items():
                await bus.send_raw(topic, key, values[n])
        await wait_for(lambda: seen == sent, 20, message=f"consumed {seen}")
        assert not reading.done()
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
    finally:
        await bus.stop()


async def test_consume_polls_batches_and_returns_once_the_consumer_stops(
    kafka_bootstrap: str,
) -> None:
    topic = f"test-consume-{uuid.uuid4().hex[:8]}"
    bus = await started_bus(kafka_bootstrap, topic)
    try:
        consumer = await bus.tail_consumer([topic])
        values: list[bytes] = []
        polls = 0

        def handle(batches: Records) -> None:
            nonlocal polls
            polls += 1
            for records in batches.values():
                values.extend(r.value or b"" for r in records)

        reading = asyncio.create_task(consume(consumer, handle, what="batches", poll_ms=50))
        # Idle polls come back empty, and the handler still hears of each one.
        await wait_for(lambda: polls >= 3, 10, message="no empty polls handled")
        assert values == []
        for n in range(50):
            await bus.send_raw(topic, b"k", b"%d" % n)
        await wait_for(lambda: len(values) == 50, 20, message=f"consumed {len(values)}")
        assert values == [b"%d" % n for n in range(50)]
        await consumer.stop()
        await asyncio.wait_for(reading, scaled(10))  # returns: no error, no retry loop
    finally:
        await bus.stop()
