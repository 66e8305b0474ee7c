"""shared.bus without a broker: how the consume loop retries, and how stop() ends.

The consumer here is a stand-in that fails on demand (a real broker does not fail on cue); the
loop against a real broker is in tests/integration/test_bus_consume.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiokafka.errors import (
    ConsumerStoppedError,
    KafkaConnectionError,
    KafkaError,
    OutOfOrderSequenceNumber,
)

from shared.backoff import Backoff
from shared.bus import BusError, KafkaBus, consume, consume_each


class FlakyConsumer:
    """Fails the polls it is told to fail, then hands out its records, then is stopped."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script

    async def getone(self) -> Any:
        step = self.script.pop(0) if self.script else ConsumerStoppedError()
        if isinstance(step, BaseException):
            raise step
        return step

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        return await self.getone()


async def test_a_failed_poll_is_retried_with_one_line_each_and_the_backoff_resets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = FlakyConsumer(
        [KafkaConnectionError(), KafkaConnectionError(), "r1", KafkaConnectionError(), "r2"]
    )
    backoff = Backoff(initial=0.001, maximum=0.002)
    handled: list[tuple[str, int]] = []
    failures: list[KafkaError] = []

    async def handle(record: str) -> None:
        handled.append((record, backoff.attempt))

    with caplog.at_level(logging.INFO, logger="shared.bus"):
        await consume_each(
            consumer,
            handle,
            what="test records",
            backoff=backoff,
            on_failure=failures.append,
        )

    assert handled == [("r1", 0), ("r2", 0)]  # each success resets the backoff
    assert len(failures) == 3
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 3
    assert all(
        m.startswith("cannot read test records from Kafka (KafkaConnectionError); retrying in")
        for m in retries
    )
    recovered = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert recovered == ["reading test records from Kafka again"] * 2


async def test_the_batch_handler_sees_every_poll_even_an_empty_one() -> None:
    consumer = FlakyConsumer([{}, {"tp": ["a", "b"]}, {}])
    polls: list[Any] = []
    await consume(consumer, polls.append, what="batches")
    assert polls == [{}, {"tp": ["a", "b"]}, {}]


async def test_a_handler_failure_is_not_retried() -> None:
    consumer = FlakyConsumer(["r1", "r2"])

    def handle(record: str) -> None:
        raise ValueError(record)

    with pytest.raises(ValueError, match="r1"):
        await consume_each(consumer, handle, what="records")
    assert consumer.script == ["r2"]


class StuckConsumer:
    """A consumer whose stop() takes as long as it is let."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.Event().wait()


class LeakyConsumer:
    """A consumer whose stop() leaks an inner task's cancellation, as aiokafka's may."""

    stopped = False

    async def stop(self) -> None:
        self.stopped = True
        raise asyncio.CancelledError


async def test_a_cancelled_stop_is_cancelled_and_the_next_stop_finishes_it() -> None:
    # Regression: stop() caught CancelledError from a consumer's stop() and went on, so a
    # stop that was cancelled returned as if nothing had happened.
    bus = KafkaBus("127.0.0.1:1", "test")
    stuck, later = StuckConsumer(), LeakyConsumer()
    bus._consumers += [stuck, later]
    stopping = asyncio.create_task(bus.stop())
    await asyncio.wait_for(stuck.stopping.wait(), 5)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert stopping.cancelled()
    assert not later.stopped
    await bus.stop()
    assert later.stopped


async def test_a_cancellation_leaked_by_a_consumer_does_not_end_the_stop() -> None:
    bus = KafkaBus("127.0.0.1:1", "test")
    leaky, other = LeakyConsumer(), LeakyConsumer()
    bus._consumers += [leaky, other]
    await bus.stop()
    assert leaky.stopped and other.stopped


class BrokenProducer:
    """An idempotent producer whose numbering a broker refused: every send fails the same."""

    def __init__(self) -> None:
        self.stopped = 0

    async def send_and_wait(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0)  # on the wire: the other sends start before it fails
        raise OutOfOrderSequenceNumber()

    async def stop(self) -> None:
        self.stopped += 1


class WorkingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def start(self) -> None:
        pass

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.sent.append((topic, value))


async def test_a_producer_that_lost_its_numbering_is_replaced_once() -> None:
    bus = KafkaBus("127.0.0.1:9", "test-renew")
    broken, fresh = BrokenProducer(), WorkingProducer()
    bus._producer = broken
    bus._new_producer = lambda: fresh  # type: ignore[method-assign]
    failures = await asyncio.gather(
        *(bus.send_raw("t", b"k", b"v") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(f, BusError) for f in failures)  # the callers send again
    assert broken.stopped == 1 and bus._producer is fresh  # one renewal for the three
    await bus.send_raw("t", b"k", b"again")
    assert fresh.sent == [("t", b"again")]


async def test_other_failures_keep_the_producer() -> None:
    class Unreachable(BrokenProducer):
        async def send_and_wait(self, *args: Any, **kwargs: Any) -> None:
            raise KafkaConnectionError()

    bus = KafkaBus("127.0.0.1:9", "test-renew")
    producer = Unreachable()
    bus._producer = producer
    with pytest.raises(BusError):
        await bus.send_raw("t", b"k", b"v")
    assert bus._producer is producer and not producer.stopped


async def test_a_send_kafka_keeps_waiting_is_said_once_and_its_end_too(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class SlowProducer(WorkingProducer):
        async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
            await asyncio.sleep(0.2)  # no broker takes it for a while
            self.sent.append((topic, value))

    monkeypatch.setattr("shared.bus.STALL_SECONDS", 0.05)
    bus = KafkaBus("127.0.0.1:9", "test-stall")
    bus._producer = SlowProducer()
    with caplog.at_level(logging.INFO, logger="shared.bus"):
        await asyncio.gather(*(bus.send_raw("t", b"k", b"v") for _ in range(3)))
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "has taken no message for 0.05 s" in m]) == 1
    assert len([m for m in said if "answers again" in m]) == 1
