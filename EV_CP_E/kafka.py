"""A group-less consumer positioned at the end of its topics.

Stand-in for shared.bus.KafkaBus.tail_consumer, which cannot find the partitions of existing
topics with aiokafka 0.14 (AIOKafkaConsumer.topics() does not refresh the metadata that
partitions_for_topic() reads, so it always ends with "topic ... does not exist"). This one
subscribes without a group instead, so aiokafka itself assigns every partition once the
metadata arrives. Replace it by bus.tail_consumer once shared/bus.py is fixed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from shared.backoff import Backoff
from shared.bus import BusError
from shared.messages import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

ASSIGNMENT_TIMEOUT = 10.0


async def tail_consumer(
    bootstrap: str, client_id: str, topics: Iterable[str], *, retry_max: float = 5.0
) -> AIOKafkaConsumer:
    """Start a consumer of every partition of `topics`, positioned at their current end.

    Retries with backoff while the broker is unreachable; raises BusError when the topics
    get no partitions in time. The caller stops the consumer.
    """
    names = list(topics)
    backoff = Backoff(maximum=retry_max)
    while True:
        consumer = AIOKafkaConsumer(
            *names,
            bootstrap_servers=bootstrap,
            client_id=client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES * 4,
        )
        try:
            await consumer.start()
            break
        except KafkaError as exc:
            await consumer.stop()
            delay = backoff.next_delay()
            log.warning(
                "cannot reach Kafka at %s to subscribe (%s); retrying in %.1f s",
                bootstrap,
                type(exc).__name__,
                delay,
            )
            await asyncio.sleep(delay)
    try:
        async with asyncio.timeout(ASSIGNMENT_TIMEOUT):
            # aiokafka has no event for "assigned": poll its state until the timeout.
            while not consumer.assignment():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            for partition in consumer.assignment():
                await consumer.position(partition)  # resolve now: nothing later is missed
    except TimeoutError:
        await consumer.stop()
        raise BusError(f"no partitions for {', '.join(names)}") from None
    except BaseException:
        await consumer.stop()
        raise
    return consumer
