"""The outbox relay: what committed transactions queued goes to Kafka, in order, at least once.

A handler's transaction writes the messages it must publish into the `outbox` table; the relay
hands them to the producer and deletes each row once the broker has acknowledged it. Two
things make it fast without giving up order or durability:

- **Hand-over from the handler.** Right after a transaction commits, the consumer loop calls
  `hand_over()`, which passes the new rows to the producer at once; the relay's own task only
  confirms acknowledgements, deletes rows and retries. A reply does not wait for that task's
  next turn of the event loop.
- **Several batches in flight.** Up to `in_flight` batches are with the producer before the
  oldest is acknowledged, so a new message does not wait for the previous batch's round trip.
  Batches are handed over in outbox order, and the producer keeps that order per partition.

Rows are deleted in outbox order as their batches are acknowledged. After a failure the relay
waits for whatever is still in flight, pauses (backoff), and sends everything not yet
acknowledged again from the oldest row: a message may arrive twice (consumers drop duplicates
by id), never not at all.

**In high-availability mode** (docs/high-availability.md) each batch is one Kafka transaction
of a transactional producer: every row waiting (whole SQLite transactions: the changelog rows
the triggers queued and the messages), plus what `KafkaBus.post` handed over meanwhile. One
transaction is open at a time, taken by the producers in turn: Kafka lets a transactional id
begin its next transaction only once the last one's commit markers have reached the followers
(0.1 to 0.3 s on a busy cluster: bench/transactions.py), which another id does not wait for.
When another Central has started the same transactional producers, a commit fails with
ProducerFenced, and `run` raises `Fenced`: this Central is not the active one any more, and
nothing it queued since has reached anyone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, ProducerFenced

from EV_Central.db import Database
from EV_Central.metrics import Histogram
from shared.backoff import Backoff
from shared.bus import BusError, KafkaBus, Topics

log = logging.getLogger(__name__)

BATCH_ROWS = 200
CHANGELOG = Topics.CENTRAL_CHANGELOG


class Fenced(Exception):
    """Another Central started the same transactional producer: this one is not active."""


class OutboxRelay:
    def __init__(
        self,
        db: Database,
        bus: KafkaBus,
        *,
        in_flight: int = 4,
        stage_seconds: collections.defaultdict[str, Histogram] | None = None,
        transactions: Sequence[AIOKafkaProducer] = (),
    ) -> None:
        self.db = db
        self.bus = bus
        self._txn = list(transactions)  # empty: no transactions (one Central)
        self._turn = 0  # the producer whose turn it is
        self.max_in_flight = 1 if transactions else in_flight
        # Posts handed over by the bus (high-availability mode), sent with the next transaction.
        self._posts: list[tuple[str, str, bytes]] = []  # (topic, key, value not sealed yet)
        if transactions:
            bus.divert = self._queue_post
        self.acked_up_to = 0  # the newest outbox seq the broker has acknowledged
        self._acked = asyncio.Event()
        # "outbox" (committed -> handed over) and "publish" (-> acknowledged), in /metrics
        self.stage_seconds = (
            stage_seconds if stage_seconds is not None else collections.defaultdict(Histogram)
        )
        # (outbox seqs, when handed over, the broker's answer), oldest first
        self._in_flight: collections.deque[tuple[list[int], float, asyncio.Future[None]]] = (
            collections.deque()
        )
        self._sent_up_to = 0  # the highest outbox seq handed to the producer
        self._paused_until = 0.0  # after a failure: no hand-over before this (monotonic)
        self._lock = asyncio.Lock()  # one hand-over or reset at a time: keeps the order
        self._wake = asyncio.Event()  # a batch was handed over: its answer is awaited
        self._new_rows = db.outbox_waiting  # set by the database when rows are committed
        self._backoff = Backoff()

    def _queue_post(self, topic: str, key: str, value: bytes) -> None:
        self._posts.append((topic, key, value))
        self._new_rows.set()

    async def durable(self, within: float = 5.0) -> bool:
        """True once everything committed so far has been acknowledged by Kafka.

        What Central answers directly (a CP's new key over :5000) waits for this in
        high-availability mode, so that a standby has it before anyone relies on it; with one
        Central the SQLite commit is enough, and this is true at once.
        """
        if not self._txn:
            return True
        target = await self.db.outbox_last()
        self.wake()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.acked_up_to < target:
            self._acked.clear()
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), left)
        return True

    def wake(self) -> None:
        """Look at the outbox again (committed transactions do this by themselves)."""
        self._new_rows.set()

    async def hand_over_new(self) -> None:
        """`hand_over()`, when a transaction has queued something since the last look.

        Called from the consumer loop: a failure here is logged and left to the relay's own
        task, which looks again at once; it never stops the caller.
        """
        if not self._new_rows.is_set():
            return
        try:
            await self.hand_over()
        except Exception:
            log.exception("handing the outbox to Kafka failed; the relay will try again")
            self.wake()

    async def hand_over(self) -> None:
        """Pass the rows not yet with the producer to it, as far as the in-flight limit allows."""
        if time.monotonic() < self._paused_until:
            return
        async with self._lock:
            if time.monotonic() < self._paused_until:
                return  # a failure came while this waited for the lock
            self._new_rows.clear()
            while len(self._in_flight) < self.max_in_flight:
                posts: list[tuple[str, str, bytes]] = []
                if not self._txn:
                    rows = await self.db.outbox_batch(BATCH_ROWS, after=self._sent_up_to)
                else:
                    # Everything waiting: a Kafka transaction never splits a SQLite one.
                    rows = await self.db.outbox_all(after=self._sent_up_to)
                    posts, self._posts = self._posts, []
                if not rows and not posts:
                    return
                if rows:
                    oldest = time.time() - min(r["created_at"] for r in rows)
                    self.stage_seconds["outbox"].observe(max(0.0, oldest))
                if not self._txn:
                    answer = await self.bus.start_batch(
                        [(r["topic"], r["key"].encode(), bytes(r["payload"])) for r in rows]
                    )
                else:
                    producer = self._txn[self._turn % len(self._txn)]
                    self._turn += 1
                    answer = asyncio.ensure_future(self._transaction(producer, rows, posts))
                self._in_flight.append(([r["seq"] for r in rows], time.perf_counter(), answer))
                if rows:
                    self._sent_up_to = rows[-1]["seq"]
                self._wake.set()  # the relay's task waits for this batch's answer

    async def _transaction(
        self,
        producer: AIOKafkaProducer,
        rows: list[Any],
        posts: list[tuple[str, str, bytes]],
    ) -> None:
        """Send rows and posts in one Kafka transaction; raise Fenced or BusError."""
        try:
            await producer.begin_transaction()
            deliveries = []
            # A row changed several times since the last transaction goes once, as it is now:
            # the transaction is applied whole or not at all, and the topic keeps the newest.
            newest = {row["key"]: row["seq"] for row in rows if row["topic"] == CHANGELOG}
            for row in rows:
                topic, key, payload = row["topic"], row["key"], row["payload"]
                if topic == CHANGELOG and newest[key] != row["seq"]:
                    continue
                if not payload:
                    # A tombstone: a deleted row's changelog key, a deregistered CP's state.
                    values: list[bytes | None] = [None]
                elif topic == CHANGELOG:
                    values = [payload.encode()]  # a row as JSON text
                else:
                    values = list(self.bus.values(topic, key, bytes(payload)))
                for value in values:
                    deliveries.append(await producer.send(topic, value, key=key.encode()))
            # A CP's state posted before its deregistration must not follow its tombstone.
            gone = {(row["topic"], row["key"]) for row in rows if not row["payload"]}
            # Sealed here, in the order they are sent: a reader refuses a sequence number
            # below one it has seen (shared/sealing.py).
            for topic, key, value in posts:
                if (topic, key) in gone:
                    continue
                for sealed in self.bus.values(topic, key, value):
                    deliveries.append(await producer.send(topic, sealed, key=key.encode()))
            # Said once when Kafka keeps it waiting (a cluster without a majority), and again
            # when it answers.
            await self.bus.watched(asyncio.gather(*deliveries))
            await self.bus.watched(producer.commit_transaction(), "not committed a transaction")
        except ProducerFenced as exc:
            raise Fenced("another Central has taken over (this one's producer is fenced)") from exc
        except KafkaError as exc:
            with contextlib.suppress(KafkaError):
                await producer.abort_transaction()
            raise BusError(f"a Kafka transaction failed: {type(exc).__name__}") from exc

    async def run(self) -> None:
        """Confirm, delete, retry; runs until cancelled."""
        while True:
            failure = await self._confirm()
            if isinstance(failure, Fenced):
                raise failure
            if failure is not None:
                await self._start_again(failure)
                continue
            await self.hand_over()
            await self._wait()

    async def _confirm(self) -> BaseException | None:
        """Delete the rows of the acknowledged batches at the head; return the first failure."""
        acked: list[int] = []
        failure: BaseException | None = None
        while self._in_flight and self._in_flight[0][2].done():
            seqs, sent_at, answer = self._in_flight.popleft()
            failure = answer.exception()
            if failure is not None:
                break
            self.stage_seconds["publish"].observe(time.perf_counter() - sent_at)
            acked.extend(seqs)
        if acked:
            await self.db.outbox_done(acked)
            self.acked_up_to = max(self.acked_up_to, max(acked))
            self._acked.set()
            self._backoff.reset()
        return failure

    async def _start_again(self, failure: BaseException) -> None:
        """After a failed batch: let the rest finish, pause, then resend from the oldest row."""
        delay = self._backoff.next_delay()
        log.warning("cannot publish to Kafka (%s); retrying in %.1f s", failure, delay)
        async with self._lock:
            self._paused_until = time.monotonic() + delay
            answers = [answer for _, _, answer in self._in_flight]
            await asyncio.gather(*answers, return_exceptions=True)
            self._in_flight.clear()
            self._sent_up_to = 0  # every row still in the outbox goes again
        await asyncio.sleep(delay)
        self._paused_until = 0.0

    async def _wait(self) -> None:
        """Until new rows may be waiting, the oldest batch is answered, or a second passes."""
        self._wake.clear()
        signals = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._new_rows.wait()),
        ]
        waits: list[asyncio.Future[Any]] = list(signals)
        if self._in_flight:
            waits.append(self._in_flight[0][2])
        try:
            await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for signal in signals:
                signal.cancel()
