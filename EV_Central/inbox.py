"""Central's Kafka inbox: consume, open the sealed messages, dispatch them, commit offsets.

One consumer in the group `ev-central` reads driver requests and CP events. Each record is
opened at the gate (EV_Central/gate.py) and handed to the part it is for; every handler that
changes state does so in a transaction of its own, and offsets are committed only once what
they cover is durable (telemetry is flushed first). A record that is refused, invalid or makes
a handler fail is counted and logged, and the next one is read: one bad message never stops
Central.

In high-availability mode (docs/high-availability.md) the consumer is not in a group: the
active Central reads every partition itself, from the positions saved in its database with
what the records changed (`consumer_positions`, replicated like every other table), so the
Central that takes over reads on exactly from where the changes it has stop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaError

from EV_Central.authorisation import SupplyAsk
from EV_Central.clocks import Clocks
from EV_Central.context import Context
from EV_Central.drivers import Drivers
from EV_Central.gate import SealedGate
from EV_Central.outbox import OutboxRelay
from EV_Central.supplies import Supplies
from shared.bus import Records, Topics, consume
from shared.clock import broker_time
from shared.errors import MessageError
from shared.messages import (
    CPAuthorisation,
    CPPlugged,
    CPRequest,
    CPSupplyEnded,
    CPTelemetry,
    SupplyRequest,
)
from shared.sealing import SealError

log = logging.getLogger(__name__)

CONSUMER_GROUP = "ev-central"
# Consumer offsets are committed at most this often (and whenever the topics go quiet), not
# after every poll: a commit is a round trip to the broker during which nothing is read. What a
# crash can redeliver is at most this much more, and every handler is idempotent.
COMMIT_INTERVAL = 0.2


class Inbox:
    def __init__(
        self,
        context: Context,
        gate: SealedGate,
        supplies: Supplies,
        drivers: Drivers,
        outbox: OutboxRelay,
        *,
        saved_positions: bool = False,
    ) -> None:
        self._bus = context.bus
        self._store = context.store
        self._saved_positions = saved_positions
        self._stats = context.stats
        self._gate = gate
        self._supplies = supplies
        self._drivers = drivers
        self._outbox = outbox
        self._clocks = context.clocks
        self._committed_at = 0.0  # when offsets were last committed (monotonic)
        self._uncommitted = False  # records were handled since

    async def run(self) -> None:
        """Read, handle and commit until cancelled."""
        topics = [Topics.DRIVER_REQUESTS, Topics.CP_EVENTS]
        if self._saved_positions:
            consumer = await self._positioned_consumer(topics)
        else:
            consumer = await self._bus.group_consumer(topics, CONSUMER_GROUP)
        await consume(
            consumer,
            lambda batches: self._poll(consumer, batches),
            what="driver requests and CP events",
            poll_ms=500,
            max_records=500,
        )

    async def _positioned_consumer(self, topics: list[str]) -> AIOKafkaConsumer:
        """Every partition, at the positions saved with the database (else the group's)."""
        partitions = await self._bus.partitions_of(topics)
        consumer = await self._bus.assigned_consumer(partitions, CONSUMER_GROUP)
        saved = await self._store.positions()
        for tp in partitions:
            offset = saved.get((tp.topic, tp.partition))
            if offset is not None:
                consumer.seek(tp, offset)
        log.info("reading %s from %d saved positions", " and ".join(topics), len(saved))
        return consumer

    async def _poll(self, consumer: AIOKafkaConsumer, batches: Records) -> None:
        """One poll's records: handle them, make them durable, commit now and then."""
        if not batches and not self._uncommitted:
            return
        # Driver requests first: they wait for an answer, telemetry does not. Different
        # topics have no order between them, so this reorders nothing that has one.
        for tp, records in sorted(
            batches.items(), key=lambda item: item[0].topic != Topics.DRIVER_REQUESTS
        ):
            for record in records:
                await self.dispatch(tp.topic, record)
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag = highwater - (records[-1].offset + 1)
                self._stats.consumer_lag[f"{tp.topic}/{tp.partition}"] = max(0, lag)
        try:
            await self._supplies.flush_telemetry()
        except Exception:
            self._stats.counters["handler_errors"] += 1
            log.exception("writing a batch of telemetry failed")
        if self._saved_positions and batches:
            read = {(tp.topic, tp.partition): rs[-1].offset + 1 for tp, rs in batches.items() if rs}
            async with self._store.transaction() as tx:
                await tx.save_positions(read)
        # Everything read so far is durable now: its offsets may be committed.
        self._uncommitted = True
        now = time.monotonic()
        if batches and now - self._committed_at < COMMIT_INTERVAL:
            return
        try:
            await consumer.commit()
            self._committed_at, self._uncommitted = now, False
        except KafkaError as exc:
            # Not fatal: handlers are idempotent, a redelivery changes nothing.
            log.warning("cannot commit offsets (%s); will retry", type(exc).__name__)

    async def dispatch(self, topic: str, record: ConsumerRecord[bytes, bytes]) -> None:
        """Open one record and hand it to the part it is for."""
        key = record.key.decode("utf-8", "replace") if record.key else ""
        started = time.perf_counter()
        counters = self._stats.counters
        arrival = Arrival.of(record, self._clocks)
        try:
            if topic == Topics.DRIVER_REQUESTS:
                kind = await self._driver_request(record.value or b"", key, arrival)
            else:
                kind = await self._cp_event(record.value or b"", key, arrival)
            self._stats.handler_seconds[kind].observe(time.perf_counter() - started)
        except SealError as exc:
            counters["rejected"] += 1
            log.warning(
                "rejected a message on %s (offset %d, key %r): %s", topic, record.offset, key, exc
            )
            await self._gate.rejected(topic, key, str(exc))
        except MessageError as exc:
            counters["invalid"] += 1
            log.warning(
                "skipped an invalid message on %s (offset %d): %s", topic, record.offset, exc
            )
        except Exception:
            # A bug must not stop Central from serving everyone else; the log has the details.
            counters["handler_errors"] += 1
            log.exception("handler failed for %s offset %d", topic, record.offset)
        await self._outbox.hand_over_new()  # the reply leaves now, not on the relay's next turn

    async def _driver_request(self, value: bytes, key: str, arrival: Arrival) -> str:
        request = self._gate.open_driver_request(value, key, arrival.at)
        self._stats.counters[request.type] += 1
        self._clocks.from_kafka("driver", request.driver_id, request.ts, arrival.stamped)
        # Telemetry staged so far is written before anything else is handled.
        await self._supplies.flush_telemetry()
        if isinstance(request, SupplyRequest):
            waited = arrival.now - self._clocks.sent_at("driver", request.driver_id, request.ts)
            self._stats.stage_seconds["arrival"].observe(max(0.0, waited))
            self._clocks.hops.add("driver → Central", waited)
            await self._supplies.request(
                SupplyAsk(request.id, arrival.at, request.driver_id, request.cp_id, request.origin)
            )
        else:
            await self._drivers.handle(request, arrival.at)
        return str(request.type)

    async def _cp_event(self, value: bytes, key: str, arrival: Arrival) -> str:
        event = self._gate.open_cp_event(value, key, arrival.at)
        self._stats.counters[event.type] += 1
        self._clocks.from_kafka("engine", event.cp_id, event.ts, arrival.stamped)
        sent_at = self._clocks.sent_at("engine", event.cp_id, event.ts)
        if isinstance(event, CPTelemetry):
            self._clocks.hops.add("engine → Central", arrival.now - sent_at)
            self._supplies.stage_telemetry(event)
            return str(event.type)
        # Keep the order of one CP's events: its earlier telemetry is written first.
        await self._supplies.flush_telemetry()
        match event:
            case CPRequest():
                ask = SupplyAsk(event.id, arrival.at, event.driver_id, event.cp_id, "cp")
                await self._supplies.request(ask)
            case CPAuthorisation():
                await self._supplies.answered(event, sent_at)
            case CPPlugged():
                await self._supplies.plugged(event, arrival.at)
            case CPSupplyEnded():
                started = event.started_at
                if started is not None:
                    started = self._clocks.sent_at("engine", event.cp_id, started)
                await self._supplies.engine_ended(event, started)
        return str(event.type)


@dataclass(frozen=True)
class Arrival:
    """When a record reached Central, on Central's clock: `at`, when the broker appended it
    (its stamp, converted with Central's measured offset; never later than `now`); `now`, when
    Central read it; `stamped`, the broker's stamp itself (the network's clock)."""

    at: float
    now: float
    stamped: float | None

    @classmethod
    def of(cls, record: ConsumerRecord[bytes, bytes], clocks: Clocks) -> Arrival:
        now = time.time()
        stamped = broker_time(record)
        at = now if stamped is None else min(now, clocks.central_time(stamped))
        return cls(at, now, stamped)
