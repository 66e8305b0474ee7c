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
the triggers queued and the messages), plus what `KafkaBus.post` handed over meanwhile. Up to
`TRANSACTIONS_IN_FLIGHT` transactions are open at once, on the producers in turn: each sends
once the one before has its records in the log, and commits once that one has committed. So
every partition has them in Central's order, readers (read_committed) see them in that order,
and a failed transaction takes the later ones down with it; their rows are sent again. Using
the producers in turn also spares each transactional id Kafka's wait between its transactions
(its last commit markers must reach the followers first: bench/transactions.py).
When another Central has started the same transactional producers, a commit fails with
ProducerFenced, and `run` raises `Fenced`: this Central is not the active one any more, and
nothing it queued since has reached anyone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, ProducerFenced

from EV_Central.db import Database
from EV_Central.metrics import Histogram
from shared.backoff import Backoff
from shared.bus import BusError, KafkaBus, Topics

log = logging.getLogger(__name__)

BATCH_ROWS = 200
# Kafka transactions of the high-availability relay open at once: each sends once the one
# before has its records in the log, and commits once that one has committed.
TRANSACTIONS_IN_FLIGHT = 4
# A transaction's sends or commit not answered by then never will be: past the transactions'
# timeout (15 s) Kafka has aborted it. aiokafka's producer also stops for good when the broker
# answers a commit with an error it does not know (UNKNOWN_SERVER_ERROR, seen while another
# Central fences this one), and what waits on it then waits forever. Either way this Central's
# term ends (Fenced): it starts again as a standby and, if it keeps the lease, with new
# producers.
TRANSACTION_STALL = 30.0
CHANGELOG = Topics.CENTRAL_CHANGELOG


class Fenced(Exception):
    """Another Central started the same transactional producer: this one is not active."""


@dataclass(eq=False)
class _Batch:
    """Rows with the producer: one batch, or in high-availability mode one Kafka transaction."""

    seqs: list[int]  # the outbox rows it carries
    taken: bool = True  # a transaction takes its rows when its turn comes
    sent_at: float | None = field(default_factory=time.perf_counter)  # None: not taken yet
    appended: asyncio.Event = field(default_factory=asyncio.Event)  # its records are in the log
    answer: asyncio.Future[None] = field(init=False)  # the broker's answer, or the failure


async def _appended(previous: _Batch) -> None:
    """Wait until the previous transaction's records are in the log; BusError if it failed
    before that."""
    appended: asyncio.Future[Any] = asyncio.ensure_future(previous.appended.wait())
    try:
        await asyncio.wait({appended, previous.answer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        appended.cancel()
    if not previous.appended.is_set():
        raise BusError("an earlier Kafka transaction failed")


async def _committed(previous: _Batch) -> None:
    """Wait until the previous transaction has committed; BusError if it did not."""
    await asyncio.wait({previous.answer})
    if previous.answer.cancelled() or previous.answer.exception() is not None:
        raise BusError("an earlier Kafka transaction failed")


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
        # A producer has one transaction at a time: no more in flight than there are producers.
        self.max_in_flight = (
            min(TRANSACTIONS_IN_FLIGHT, len(self._txn)) if transactions else in_flight
        )
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
        self._in_flight: collections.deque[_Batch] = collections.deque()  # oldest first
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
            if self._txn:
                self._next_transaction()
                return
            while len(self._in_flight) < self.max_in_flight:
                rows = await self.db.outbox_batch(BATCH_ROWS, after=self._sent_up_to)
                if not rows:
                    return
                self._observe_waiting(rows)
                answer = await self.bus.start_batch(
                    [(r["topic"], r["key"].encode(), bytes(r["payload"])) for r in rows]
                )
                batch = _Batch([r["seq"] for r in rows])
                batch.answer = answer
                self._in_flight.append(batch)
                self._sent_up_to = rows[-1]["seq"]
                self._wake.set()  # the relay's task waits for this batch's answer

    def _observe_waiting(self, rows: list[Any]) -> None:
        oldest = time.time() - min(r["created_at"] for r in rows)
        self.stage_seconds["outbox"].observe(max(0.0, oldest))

    def _next_transaction(self) -> None:
        """Start the next Kafka transaction, unless the newest one has not taken its rows yet
        (it takes everything waiting when its turn comes) or the in-flight limit is reached."""
        newest = self._in_flight[-1] if self._in_flight else None
        if newest is not None and not newest.taken:
            return
        if len(self._in_flight) >= self.max_in_flight:
            return
        producer = self._txn[self._turn % len(self._txn)]
        self._turn += 1
        batch = _Batch([], taken=False, sent_at=None)
        batch.answer = asyncio.ensure_future(self._transaction(producer, batch, newest))
        self._in_flight.append(batch)
        self._wake.set()  # the relay's task waits for this batch's answer

    async def _transaction(
        self, producer: AIOKafkaProducer, batch: _Batch, previous: _Batch | None
    ) -> None:
        """One Kafka transaction of the pipeline; raise Fenced or BusError.

        It waits until the previous transaction's records are in the log, takes every row
        waiting (whole SQLite transactions) and the posts handed over meanwhile, sends them,
        and commits once the previous transaction has committed. So each transaction's
        records follow the previous one's in every partition, and they commit in that order:
        a reader (read_committed) sees them in the order Central made them, and a failed one
        takes every later one down with it (they are sent again from the outbox).
        """
        if previous is not None:
            await _appended(previous)
        # Taken at once after the read, with no wait in between: a transaction committed
        # after the read sees `taken` and starts the next Kafka transaction.
        rows = await self.db.outbox_all(after=self._sent_up_to)
        posts, self._posts = self._posts, []
        batch.taken = True
        batch.seqs = [r["seq"] for r in rows]
        batch.sent_at = time.perf_counter()
        if rows:
            self._sent_up_to = rows[-1]["seq"]
            self._observe_waiting(rows)
        if not rows and not posts:
            batch.sent_at = None  # nothing sent: no `publish` time to count
            batch.appended.set()
            if previous is not None:
                await _committed(previous)
            return
        began = False
        try:
            await producer.begin_transaction()
            began = True
            deliveries = [
                await producer.send(topic, value, key=key.encode())
                for topic, key, value in self._records(rows, posts)
            ]
            # Said once when Kafka keeps it waiting (a cluster without a majority), and again
            # when it answers.
            await self._within(asyncio.gather(*deliveries), "taken no message")
            appended = time.perf_counter()
            self.stage_seconds["append"].observe(appended - batch.sent_at)
            batch.appended.set()
            if previous is not None:
                await _committed(previous)
            await self._within(producer.commit_transaction(), "not committed a transaction")
            self.stage_seconds["commit"].observe(time.perf_counter() - appended)
        except ProducerFenced as exc:
            raise Fenced("another Central has fenced this one (its producer is fenced)") from exc
        except AssertionError as exc:
            # aiokafka's transaction states: its producer stopped (a fatal error), and it
            # refuses to begin or abort another transaction.
            raise Fenced(f"this Central's Kafka producer stopped ({exc})") from exc
        except (KafkaError, BusError) as exc:
            if began:
                await self._abort(producer)
            if isinstance(exc, BusError):
                raise
            raise BusError(f"a Kafka transaction failed: {type(exc).__name__}") from exc

    async def _abort(self, producer: AIOKafkaProducer) -> None:
        """Abort a transaction that failed; Fenced when that fails too: a producer left in a
        transaction cannot begin another, and this Central starts again with new ones."""
        try:
            async with asyncio.timeout(TRANSACTION_STALL):
                await producer.abort_transaction()
        except (KafkaError, TimeoutError, AssertionError) as exc:
            raise Fenced(
                f"a failed Kafka transaction could not be aborted ({type(exc).__name__})"
            ) from exc

    async def _within(self, request: Awaitable[Any], what: str) -> None:
        """Await a transaction's request; Fenced when Kafka has not answered it in time."""
        try:
            async with asyncio.timeout(TRANSACTION_STALL):
                await self.bus.watched(request, what)
        except TimeoutError:
            raise Fenced(
                f"Kafka has {what} for {TRANSACTION_STALL:g} s in a transaction (cut off from"
                " the cluster, or the producer stopped)"
            ) from None

    def _records(
        self, rows: list[Any], posts: list[tuple[str, str, bytes]]
    ) -> list[tuple[str, str, bytes | None]]:
        """What one transaction sends: its rows, then the posts, sealed in that order."""
        records: list[tuple[str, str, bytes | None]] = []
        # A row changed several times since the last transaction goes once, as it is now:
        # the transaction is applied whole or not at all, and the topic keeps the newest.
        newest = {row["key"]: row["seq"] for row in rows if row["topic"] == CHANGELOG}
        for row in rows:
            topic, key, payload = row["topic"], row["key"], row["payload"]
            if topic == CHANGELOG and newest[key] != row["seq"]:
                continue
            if not payload:
                # A tombstone: a deleted row's changelog key, a deregistered CP's state.
                records.append((topic, key, None))
            elif topic == CHANGELOG:
                records.append((topic, key, payload.encode()))  # a row as JSON text
            else:
                records.extend((topic, key, v) for v in self.bus.values(topic, key, bytes(payload)))
        # A CP's state posted before its deregistration must not follow its tombstone.
        gone = {(row["topic"], row["key"]) for row in rows if not row["payload"]}
        # Sealed here, in the order they are sent: a reader refuses a sequence number below
        # one it has seen (shared/sealing.py).
        for topic, key, value in posts:
            if (topic, key) not in gone:
                records.extend(
                    (topic, key, sealed) for sealed in self.bus.values(topic, key, value)
                )
        return records

    async def run(self) -> None:
        """Confirm, delete, retry; runs until cancelled."""
        while True:
            failure = await self._confirm()
            if isinstance(failure, Fenced):
                await self._abandon()
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
        while self._in_flight and self._in_flight[0].answer.done():
            batch = self._in_flight.popleft()
            failure = batch.answer.exception()
            if failure is not None:
                # Nothing more is handed over until `_start_again` has sent this batch's rows
                # again: a batch started now would carry rows after them, before them.
                self._paused_until = math.inf
                break
            if batch.sent_at is not None:
                self.stage_seconds["publish"].observe(time.perf_counter() - batch.sent_at)
            acked.extend(batch.seqs)
        if acked:
            await self.db.outbox_done(acked)
            self.acked_up_to = max(self.acked_up_to, max(acked))
            self._acked.set()
            self._backoff.reset()
        return failure

    async def _abandon(self) -> None:
        """Fenced: the transactions after the fenced one are cancelled (their failures are
        the fence's)."""
        answers = [batch.answer for batch in self._in_flight]
        self._in_flight.clear()
        for answer in answers:
            answer.cancel()
        await asyncio.gather(*answers, return_exceptions=True)

    async def _start_again(self, failure: BaseException) -> None:
        """After a failed batch: let the rest finish, pause, then resend from the oldest row."""
        delay = self._backoff.next_delay()
        log.warning("cannot publish to Kafka (%s); retrying in %.1f s", failure, delay)
        async with self._lock:
            self._paused_until = time.monotonic() + delay
            answers = [batch.answer for batch in self._in_flight]
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
            waits.append(self._in_flight[0].answer)
        try:
            await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for signal in signals:
                signal.cancel()
