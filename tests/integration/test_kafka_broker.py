"""Smoke tests: the broker from the kafka_bootstrap fixture round-trips a message, and stamps
the project's topics with its own clock."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from helpers import scaled
from shared.bus import STAMPED, KafkaBus, TopicSpec
from shared.clock import broker_time

pytestmark = pytest.mark.kafka


async def test_produce_and_consume_roundtrip(kafka_bootstrap: str) -> None:
    topic = f"test-broker-{uuid.uuid4().hex[:8]}"

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await asyncio.wait_for(producer.send_and_wait(topic, b"hello", key=b"k"), scaled(15))
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        msg = await asyncio.wait_for(consumer.getone(), scaled(15))
    finally:
        await consumer.stop()

    assert (msg.key, msg.value) == (b"k", b"hello")


async def test_topics_are_stamped_by_the_broker_and_old_ones_switched(kafka_bootstrap: str) -> None:
    """Every message topic carries the broker's time (shared/clock.py); a topic made before
    that, without the setting, is switched by the next service that starts."""
    name = f"clocktest.{secrets.token_hex(4)}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    bus = KafkaBus(kafka_bootstrap, "clock-test")
    try:
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs={"retention.ms": "1000"})])
        await bus.start(ensure_topics=False)
        await bus.ensure_topics([TopicSpec(name, partitions=1, config=STAMPED)])
        consumer = await bus.tail_consumer([name])
        sent_before = time.time()
        await bus.send_raw(name, b"k", b"v")
        records = await consumer.getmany(timeout_ms=5000)
        (record,) = [r for rs in records.values() for r in rs]
        stamped = broker_time(record)
        assert stamped is not None and sent_before - 1 <= stamped <= time.time() + 1
        # The clock probe's answer carries the broker's time too.
        served = await bus.probe_clock()
        assert served is not None and abs(served - time.time()) < 1
    finally:
        await bus.stop()
        await admin.delete_topics([name])
        await admin.close()
