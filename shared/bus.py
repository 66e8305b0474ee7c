"""The Kafka bus: topics, a producer, consumers, JSON encoding with validation, reconnects.

A thin wrapper over aiokafka. Topics are created explicitly with their partition count and
config (cp state is log-compacted); nothing relies on the broker auto-creating them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ConsumerStoppedError,
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    TopicAlreadyExistsError,
)
from pydantic import TypeAdapter

from shared.backoff import Backoff
from shared.clock import LOG_APPEND_TIME
from shared.errors import EVError, MessageError
from shared.kafka_access import KafkaLogin
from shared.messages import MAX_MESSAGE_BYTES, Message, decode, encode

log = logging.getLogger(__name__)

# A send that waits longer than this for the broker is reported (once, until one gets through).
STALL_SECONDS = 10.0
# A producer's batch for one partition (aiokafka's default is 16 KiB). A producer has one
# request in flight per broker, so a burst bigger than a batch waits a round trip per batch:
# the HA relay's transactions put a second's changes of thousands of CPs on the one-partition
# changelog (docs/high-availability.md). Kafka takes batches up to 1 MiB (message.max.bytes).
MAX_BATCH_BYTES = 512 * 1024

T = TypeVar("T")

# Kafka answers a fenced transactional producer with PRODUCER_FENCED (error 90, since Kafka
# 2.7), which aiokafka 0.14 does not know: it takes the answer to a commit for an unknown
# error, its sender stops, and the commit never returns. Kafka's own clients treat the code as
# the older INVALID_PRODUCER_EPOCH, which aiokafka turns into ProducerFenced.
PRODUCER_FENCED = 90
kafka_errors.kafka_errors.setdefault(PRODUCER_FENCED, InvalidProducerEpoch)


class BusError(EVError):
    """Kafka could not be reached or refused a request."""


class Topics:
    DRIVER_REQUESTS = "ev.driver.requests"
    DRIVER_UPDATES = "ev.driver.updates"
    CP_COMMANDS = "ev.cp.commands"
    CP_EVENTS = "ev.cp.events"
    CP_STATE = "ev.cp.state"
    CP_HEALTH = "ev.cp.health"
    # Central's high availability (docs/high-availability.md): its replicated state, and the
    # one-partition topic whose consumer group decides which Central is active.
    CENTRAL_CHANGELOG = "ev.central.changelog"
    CENTRAL_LEASE = "ev.central.lease"
    # Probes with which every process measures its clock against the brokers' (shared/clock.py).
    CLOCK = "ev.clock"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int = 3
    config: dict[str, str] = field(default_factory=dict)


# The broker stamps each record with its own clock when it appends it: the network's one clock,
# which decides how old a message is whatever the sender's clock says (shared/clock.py).
STAMPED = {"message.timestamp.type": "LogAppendTime"}

TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(Topics.DRIVER_REQUESTS, config=STAMPED),
    TopicSpec(Topics.DRIVER_UPDATES, config=STAMPED),
    TopicSpec(Topics.CP_COMMANDS, config=STAMPED),
    TopicSpec(Topics.CP_EVENTS, config=STAMPED),
    TopicSpec(
        Topics.CP_STATE,
        config={
            "cleanup.policy": "compact",
            "min.cleanable.dirty.ratio": "0.1",
            "segment.ms": "600000",
        },
    ),
    TopicSpec(Topics.CP_HEALTH, config={**STAMPED, "retention.ms": str(24 * 3600 * 1000)}),
    TopicSpec(Topics.CLOCK, partitions=1, config={**STAMPED, "retention.ms": str(3600 * 1000)}),
)


# Only Centrals in high-availability mode create and use these.
HA_TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        Topics.CENTRAL_CHANGELOG,
        partitions=1,  # one order for every change, as the database made them
        config={"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1"},
    ),
    TopicSpec(Topics.CENTRAL_LEASE, partitions=1),
)

# Readers never see what a transaction that was aborted, or is still open, wrote: a Central
# that another one has fenced publishes nothing anyone reads (docs/high-availability.md).
ISOLATION = "read_committed"


async def _stamp_existing(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
    """Topics made before they were stamped with the broker's clock are switched to it (with
    the rest of their settings, which AlterConfigs replaces as a whole)."""
    wanted = [s for s in specs if "message.timestamp.type" in s.config]
    if not wanted:
        return
    names = {"message.timestamp.type": None}
    described = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, s.name, names) for s in wanted]
    )
    stamped = {
        resource[3]
        for response in described
        for resource in response.resources
        if any(entry[1] == "LogAppendTime" for entry in resource[4])
    }
    stale = [s for s in wanted if s.name not in stamped]
    if not stale:
        return
    _, in_sync = replication_for(len((await admin.describe_cluster())["brokers"]))
    log.info("switching %s to the broker's timestamps", ", ".join(s.name for s in stale))
    await admin.alter_configs(
        [
            ConfigResource(
                ConfigResourceType.TOPIC,
                s.name,
                {**s.config, "min.insync.replicas": str(in_sync)},
            )
            for s in stale
        ]
    )


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for topics on a cluster of `brokers`."""
    return (3, 2) if brokers >= 3 else (1, 1)


def decode_record(adapter: TypeAdapter[T], record: ConsumerRecord[bytes, bytes]) -> T:
    """Validate a consumed record's value; raise MessageError when it is not a known message."""
    if record.value is None:
        raise MessageError("empty record")
    return decode(adapter, record.value)


def _log_failed_post(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("a posted message was not delivered: %s", future.exception())


# Turns one outgoing (topic, key, value) into the values to publish: none (drop), the value
# itself, or sealed copies (see shared/sealing.py). Installed by services that seal.
Outgoing = Callable[[str, str, bytes], list[bytes]]


class KafkaBus:
    """One producer for a service, plus factories for its consumers.

    `outgoing`, when given, sees every value before it is published (send, start_batch, post) and
    returns what to publish instead: this is where a service seals its messages.
    """

    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        *,
        retry_max: float = 5.0,
        outgoing: Outgoing | None = None,
        login: KafkaLogin | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        # Every client of a secured broker logs in (TLS and SCRAM); none does on a plain one.
        self.login = login
        self.client_options: dict[str, Any] = login.client_options() if login else {}
        self._retry_max = retry_max
        self._producer: AIOKafkaProducer | None = None
        self._renewing = asyncio.Lock()
        self._stalled = False  # a send has waited longer than STALL_SECONDS (said once)
        self._consumers: list[AIOKafkaConsumer] = []
        self._outgoing = outgoing
        # When set, post() hands its records to this instead of the producer, not sealed yet:
        # a Central in high-availability mode seals and sends them in its next transaction,
        # in the order it sends everything (EV_Central/outbox.py).
        self.divert: Callable[[str, str, bytes], None] | None = None

    def values(self, topic: str, key: str, value: bytes) -> list[bytes]:
        """What to publish for one outgoing value (sealed copies, the value, or nothing)."""
        return [value] if self._outgoing is None else self._outgoing(topic, key, value)

    def _values_or_tombstone(
        self, topic: str, key: bytes | None, value: bytes
    ) -> list[bytes | None]:
        if not value:
            return [None]
        return list(self.values(topic, (key or b"").decode("utf-8", "replace"), value))

    async def start(self, *, ensure_topics: bool | None = None) -> None:
        """Connect, retrying with backoff until the broker answers, and make the topics that
        are missing: by default only on a plain broker; on a secured one only Central (which
        passes True) and `kafka-access` may create topics (docs/security.md, "Kafka")."""
        if self._producer is not None:
            return
        self._producer = await self._retry("connect the producer", self._new_producer)
        if ensure_topics is None:
            ensure_topics = self.login is None
        if not ensure_topics:
            return
        backoff = Backoff(maximum=self._retry_max)
        while True:
            try:
                await self.watched(self.ensure_topics(), "not answered (to set up the topics)")
                if backoff.attempt:
                    log.info("Kafka at %s answers again", self.bootstrap)
                return
            except KafkaError as exc:
                # A node in the cluster's list that is down, or no majority of them up: said
                # once, in one line, however long it lasts.
                delay = backoff.next_delay()
                log.log(
                    logging.WARNING if backoff.attempt == 1 else logging.DEBUG,
                    "cannot set up the topics on Kafka at %s (%s: is it, or most of a "
                    "cluster's nodes, up?); retrying every few seconds",
                    self.bootstrap,
                    type(exc).__name__,
                )
                await asyncio.sleep(delay)

    async def watched(self, request: Awaitable[T], what: str = "taken no message") -> T:
        """Await a request to Kafka; say once, in one line, when Kafka keeps it waiting (an
        idempotent producer retries until a broker takes a message, which may be never without
        a majority of the cluster's nodes), and say when Kafka answers again."""
        task = asyncio.ensure_future(request)
        done, _ = await asyncio.wait({task}, timeout=STALL_SECONDS)
        if not done and not self._stalled:
            self._stalled = True
            log.warning(
                "Kafka at %s has %s for %g s: are its brokers (most of a cluster's nodes) "
                "up? Waiting for them",
                self.bootstrap,
                what,
                STALL_SECONDS,
            )
        try:
            result = await task
        except BaseException:
            task.cancel()
            raise
        if self._stalled:
            self._stalled = False
            log.info("Kafka at %s answers again", self.bootstrap)
        return result

    def _new_producer(self, **options: Any) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            **options,
            **self.client_options,
            acks="all",
            # Retries never duplicate or reorder a key's records (the broker deduplicates by
            # producer id and sequence number), also across a broker failover.
            enable_idempotence=True,
            linger_ms=0,  # send at once; records queue up while a request is in flight
            max_request_size=MAX_MESSAGE_BYTES * 4,
            max_batch_size=MAX_BATCH_BYTES,
            request_timeout_ms=10_000,
        )

    async def _renew_after(self, failed: AIOKafkaProducer | None, exc: BaseException) -> None:
        """Replace a producer that can no longer send.

        An idempotent producer whose numbering a broker refuses (OutOfOrderSequenceNumber,
        seen after some failovers) stops for good: aiokafka then fails every later send with
        the same error. A new producer gets a new producer id and starts its numbering afresh;
        what failed is sent again by the caller, as after any failure.
        """
        if not isinstance(exc, OutOfOrderSequenceNumber):
            return
        async with self._renewing:
            if self._producer is not failed or failed is None:
                return  # another failed send renewed it already
            log.warning("the Kafka producer lost its numbering with a broker; starting a new one")
            self._producer = None
            with contextlib.suppress(KafkaError):  # it is replaced because it failed
                await failed.stop()
            self._producer = await self._retry("connect the producer", self._new_producer)

    async def transactional_producer(self, transactional_id: str) -> AIOKafkaProducer:
        """A started producer that sends in transactions under `transactional_id`.

        Starting it fences every earlier producer with the same id: what that one had open is
        aborted, and whatever it tries later fails with ProducerFenced.
        """
        return await self._retry(
            f"start the transactional producer {transactional_id}",
            lambda: self._new_producer(
                transactional_id=transactional_id, transaction_timeout_ms=15_000
            ),
        )

    async def _retry(self, what: str, make: Any) -> Any:
        backoff = Backoff(maximum=self._retry_max)
        while True:
            client = make()
            try:
                await self.watched(client.start(), f"not answered (to {what})")
                if backoff.attempt:
                    log.info("Kafka at %s reachable again", self.bootstrap)
                return client
            except KafkaError as exc:
                await client.stop()
                delay = backoff.next_delay()
                log.warning(
                    "cannot reach Kafka at %s to %s (%s); retrying in %.1f s",
                    self.bootstrap,
                    what,
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)

    async def ensure_topics(self, specs: Iterable[TopicSpec] = TOPICS) -> None:
        """Create the topics that do not exist yet (idempotent).

        On a cluster of three or more brokers each partition has three copies, and a write
        counts once two of them have it (`min.insync.replicas`): any one broker may fail
        without losing or refusing anything. On one or two brokers, one copy.
        """
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, **self.client_options
        )
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            await _stamp_existing(admin, [s for s in specs if s.name in existing])
            missing = [s for s in specs if s.name not in existing]
            if not missing:
                return
            brokers = len((await admin.describe_cluster())["brokers"])
            replicas, in_sync = replication_for(brokers)
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            s.name,
                            s.partitions,
                            replicas,
                            topic_configs={**s.config, "min.insync.replicas": str(in_sync)},
                        )
                        for s in missing
                    ]
                )
            except TopicAlreadyExistsError:
                pass  # another service created them first
            log.info(
                "created topics %s (%d copies, %d in sync)",
                ", ".join(s.name for s in missing),
                replicas,
                in_sync,
            )
        finally:
            await admin.close()

    async def probe_clock(self) -> float | None:
        """Publish one clock probe; the broker's time when it appended it (seconds), or None
        when the topic does not stamp records with the broker's clock."""
        producer = self._producer
        if producer is None:
            raise BusError("bus not started")
        try:
            sent = await self.watched(
                producer.send_and_wait(Topics.CLOCK, b"", key=self.client_id.encode())
            )
        except KafkaError as exc:
            await self._renew_after(producer, exc)
            raise BusError(f"cannot probe the clock: {type(exc).__name__}") from exc
        if sent.timestamp_type != LOG_APPEND_TIME or sent.timestamp < 0:
            return None
        return float(sent.timestamp) / 1000.0

    async def send(self, topic: str, key: str, message: Message) -> None:
        """Publish one message and wait until the broker has it."""
        producer = self._producer
        if producer is None:
            raise BusError("bus not started")
        try:
            for value in self.values(topic, key, encode(message)):
                await self.watched(producer.send_and_wait(topic, value, key=key.encode()))
        except KafkaError as exc:
            await self._renew_after(producer, exc)
            raise BusError(f"cannot publish to {topic}: {type(exc).__name__}") from exc

    async def send_raw(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Publish bytes as they are (the outbox relay and tests use it)."""
        producer = self._producer
        if producer is None:
            raise BusError("bus not started")
        try:
            await self.watched(producer.send_and_wait(topic, value, key=key))
        except KafkaError as exc:
            await self._renew_after(producer, exc)
            raise BusError(f"cannot publish to {topic}: {type(exc).__name__}") from exc

    async def start_batch(
        self, records: list[tuple[str, bytes | None, bytes]]
    ) -> asyncio.Future[None]:
        """Hand (topic, key, value) records to the producer, in order, without waiting.

        Returns a future that completes when the broker has them all, or fails with BusError.
        An empty value is sent as a tombstone (no value), neither sealed nor dropped.
        """
        producer = self._producer
        try:
            if producer is None:
                raise BusError("bus not started")
            deliveries = [
                await producer.send(topic, sealed, key=key)
                for topic, key, value in records
                for sealed in self._values_or_tombstone(topic, key, value)
            ]
        except (KafkaError, BusError) as exc:
            await self._renew_after(producer, exc)
            refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            refused.set_exception(_bus_error(exc))
            return refused

        async def delivered() -> None:
            try:
                await self.watched(asyncio.gather(*deliveries))
            except KafkaError as exc:
                await self._renew_after(producer, exc)
                raise _bus_error(exc) from exc

        return asyncio.ensure_future(delivered())

    async def post(self, topic: str, key: str, message: Message) -> None:
        """Publish without waiting for the broker (live figures that the next one replaces).

        A failure is logged, not raised: the caller has already moved on.
        """
        if self.divert is not None:
            self.divert(topic, key, encode(message))
            return
        if self._producer is None:
            return
        try:
            for value in self.values(topic, key, encode(message)):
                future = await self._producer.send(topic, value, key=key.encode())
                future.add_done_callback(_log_failed_post)
        except KafkaError as exc:
            log.debug("dropped a message for %s: %s", topic, type(exc).__name__)

    async def group_consumer(
        self, topics: Iterable[str], group_id: str, *, from_start: bool = True
    ) -> AIOKafkaConsumer:
        """A consumer in a group that commits offsets itself, after its work is durable."""
        return await self._consumer(
            f"join group {group_id}",
            *topics,
            group_id=group_id,
            auto_offset_reset="earliest" if from_start else "latest",
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )

    async def _consumer(self, what: str, *topics: str, **options: Any) -> AIOKafkaConsumer:
        """A started consumer of this service (stopped by `stop`): offsets are committed by
        the caller, only committed transactions are read (docs/high-availability.md)."""
        consumer: AIOKafkaConsumer = await self._retry(
            what,
            lambda: AIOKafkaConsumer(
                *topics,
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                enable_auto_commit=False,
                isolation_level=ISOLATION,
                max_partition_fetch_bytes=MAX_MESSAGE_BYTES * 4,
                **options,
                **self.client_options,
            ),
        )
        self._consumers.append(consumer)
        return consumer

    async def tail_consumer(
        self, topics: Iterable[str], *, from_start: bool = False, within: float = 30.0
    ) -> AIOKafkaConsumer:
        """A group-less consumer of every partition, positioned at the end (or the start).

        Subscribing without a group makes aiokafka assign every partition itself; positions
        are resolved before returning, so nothing published after this call is missed.
        """
        names = list(topics)
        consumer = await self._consumer(
            "subscribe", auto_offset_reset="earliest" if from_start else "latest"
        )
        consumer.subscribe(names)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while {tp.topic for tp in consumer.assignment()} != set(names):
            if loop.time() >= deadline:
                raise BusError(f"topics {', '.join(names)} have no partitions (do they exist?)")
            await asyncio.sleep(0.05)
        partitions = sorted(consumer.assignment())

        async def positions() -> None:
            if from_start:
                await consumer.seek_to_beginning(*partitions)
            else:
                await consumer.seek_to_end(*partitions)
            for tp in partitions:
                await consumer.position(tp)

        # Each partition's leader answers: without one (a cluster without a majority) it waits.
        await self.watched(positions(), "not answered (to find where the topics end)")
        return consumer

    async def assigned_consumer(
        self, partitions: Iterable[TopicPartition], group_id: str | None
    ) -> AIOKafkaConsumer:
        """A consumer of exactly these partitions (no rebalancing), at their committed offsets
        in `group_id` (or the start); the caller may seek elsewhere before reading."""
        wanted = list(partitions)
        consumer = await self._consumer(
            "start a consumer", group_id=group_id, auto_offset_reset="earliest"
        )
        consumer.assign(wanted)
        return consumer

    async def partitions_of(self, topics: Iterable[str]) -> list[TopicPartition]:
        """Every partition of these topics, as the cluster's metadata knows them."""
        producer = self._producer
        if producer is None:
            raise BusError("bus not started")
        found: list[TopicPartition] = []
        for name in topics:
            numbers = await self.watched(producer.partitions_for(name), "not answered")
            found.extend(TopicPartition(name, number) for number in sorted(numbers))
        return found

    async def ping(self, within: float = 2.0) -> bool:
        """True when the broker answers a metadata request within `within` seconds."""
        if self._producer is None:
            return False
        try:
            async with asyncio.timeout(within):
                await self._producer.client.fetch_all_metadata()
        except (KafkaError, TimeoutError, OSError):
            return False
        return True

    async def stop(self) -> None:
        """Flush the producer, close every consumer (idempotent).

        A cancelled stop stays cancelled; what it had not closed yet is closed by the next call.
        """
        while self._consumers:
            consumer = self._consumers.pop(0)
            asked = _cancel_requests()
            try:
                await consumer.stop()
            except KafkaError:
                log.debug("consumer stop failed", exc_info=True)
            except asyncio.CancelledError:
                if _cancel_requests() > asked:
                    raise  # this stop was cancelled: so be it
                # aiokafka may cancel its own fetcher while stopping a fresh consumer, and that
                # cancellation can leak out of stop(): it is not ours, the stop goes on.
                log.debug("consumer stop failed", exc_info=True)
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except KafkaError:
                log.debug("producer stop failed", exc_info=True)


def _cancel_requests() -> int:
    """How many times the running task has been asked to cancel (and not uncancelled)."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def _bus_error(exc: BaseException) -> BusError:
    return exc if isinstance(exc, BusError) else BusError(f"cannot publish: {type(exc).__name__}")


# --- consuming ------------------------------------------------------------------------------

Record: TypeAlias = ConsumerRecord[bytes, bytes]
Records: TypeAlias = dict[TopicPartition, list[Record]]
P = TypeVar("P")


async def consume(
    consumer: AIOKafkaConsumer,
    handle: Callable[[Records], Awaitable[None] | None],
    *,
    what: str,
    backoff: Backoff | None = None,
    poll_ms: int = 200,
    max_records: int | None = None,
    on_failure: Callable[[KafkaError], None] | None = None,
) -> None:
    """Poll `consumer` (getmany) and hand each poll's records, by partition, to `handle`.

    `handle` (plain or async) is called after every poll that succeeds, an empty one too (no
    record within `poll_ms`), so that it can look at positions; what it raises propagates. A poll
    that fails with KafkaError is logged in one line naming `what`, reported to `on_failure`, and
    tried again after the backoff's next delay (jitter, cap; 0.5 s up to 5 s by default), which
    resets once a poll succeeds. Returns when the consumer is stopped.
    """
    await _poll(
        lambda: consumer.getmany(timeout_ms=poll_ms, max_records=max_records),
        handle,
        what,
        backoff,
        on_failure,
    )


async def consume_each(
    consumer: AIOKafkaConsumer,
    handle: Callable[[Record], Awaitable[None] | None],
    *,
    what: str,
    backoff: Backoff | None = None,
    on_failure: Callable[[KafkaError], None] | None = None,
) -> None:
    """`consume` one record at a time (getone): `handle` sees each record as it comes."""
    await _poll(consumer.getone, handle, what, backoff, on_failure)


async def _poll(
    poll: Callable[[], Awaitable[P]],
    handle: Callable[[P], Awaitable[None] | None],
    what: str,
    backoff: Backoff | None,
    on_failure: Callable[[KafkaError], None] | None,
) -> None:
    backoff = backoff or Backoff(maximum=5.0)
    while True:
        try:
            polled = await poll()
        except ConsumerStoppedError:
            return
        except KafkaError as exc:
            if on_failure is not None:
                on_failure(exc)
            delay = backoff.next_delay()
            log.warning(
                "cannot read %s from Kafka (%s); retrying in %.1f s",
                what,
                type(exc).__name__,
                delay,
            )
            await asyncio.sleep(delay)
            continue
        if backoff.attempt:
            log.info("reading %s from Kafka again", what)
            backoff.reset()
        handled = handle(polled)
        if handled is not None:
            await handled
