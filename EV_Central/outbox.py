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
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from EV_Central.db import Database
from EV_Central.metrics import Histogram
from shared.backoff import Backoff
from shared.bus import KafkaBus

log = logging.getLogger(__name__)

BATCH_ROWS = 200


class OutboxRelay:
    def __init__(
        self,
        db: Database,
        bus: KafkaBus,
        *,
        in_flight: int = 4,
        stage_seconds: collections.defaultdict[str, Histogram] | None = None,
    ) -> None:
        self.db = db
        self.bus = bus
        self.max_in_flight = in_flight
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
                rows = await self.db.outbox_batch(BATCH_ROWS, after=self._sent_up_to)
                if not rows:
                    return
                oldest = time.time() - min(r["created_at"] for r in rows)
                self.stage_seconds["outbox"].observe(max(0.0, oldest))
                answer = await self.bus.start_batch(
                    [(r["topic"], r["key"].encode(), bytes(r["payload"])) for r in rows]
                )
                self._in_flight.append(([r["seq"] for r in rows], time.perf_counter(), answer))
                self._sent_up_to = rows[-1]["seq"]
                self._wake.set()  # the relay's task waits for this batch's answer

    async def run(self) -> None:
        """Confirm, delete, retry; runs until cancelled."""
        while True:
            failure = await self._confirm()
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
