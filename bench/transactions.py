"""How fast a transactional id can commit again on a three-node cluster, by follower fetch wait.

    python -m bench.transactions [--waits 500,20] [--gaps 0.03,0.1,0.3,1] [--rounds 40]

For each `replica.fetch.wait.max.ms` in --waits it starts a three-node cluster
(scripts/kafka.sh with EV_KAFKA_REPLICA_FETCH_WAIT_MS) and runs small transactions with one
transactional producer, as Central's outbox relay does (a record to each of two topics, then
the commit), with a pause of each --gaps seconds between a commit and the next transaction.
It counts how often the coordinator refused to add the partitions of the next transaction
because the last one was not finished (CONCURRENT_TRANSACTIONS: the commit markers had not
reached the followers yet; aiokafka then waits 20 ms and asks again), and how long from the
start of a transaction until a `read_committed` consumer has its record.

What it showed here (docs/high-availability.md, "Measured"): with Kafka's default of 500 ms a
transactional id could not begin a new transaction for 0.3 to 1 s after a commit; with 20 ms,
0.1 to 0.3 s on a busy machine. Central's relay took three transactional ids in turn: at tens of
transactions a second each id came back to a refusal and its retries; it now takes eight.

`hop_floor` measures the same on a cluster already running, with plain sends beside the
transactions: `make bench-failover` runs it before its HA fleet, as the floor under the
fleet's request -> authorisation (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.producer import sender

from tools.fleet.stats import summarise
from tools.ports import free_port_run

REPO = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO / "scripts" / "kafka.sh"
TOPICS = ("bench.txn.a", "bench.txn.b")
CONCURRENT_TRANSACTIONS = 51  # Kafka's error code


class RefusalCounter:
    """Counts AddPartitionsToTxn answers that say the last transaction is not finished, while
    it is entered: aiokafka's handler is wrapped inside the `with` block and restored after."""

    def __init__(self) -> None:
        self.refused = 0
        self._original: Any = None

    def __enter__(self) -> RefusalCounter:
        original = self._original = sender.AddPartitionsToTxnHandler.handle_response

        def counting(handler: Any, response: Any) -> Any:
            codes = [code for _topic, parts in response.errors for _p, code in parts]
            if CONCURRENT_TRANSACTIONS in codes:
                self.refused += 1
            return original(handler, response)

        sender.AddPartitionsToTxnHandler.handle_response = counting
        return self

    def __exit__(self, *_exc: object) -> None:
        sender.AddPartitionsToTxnHandler.handle_response = self._original


async def measure(
    bootstrap: str,
    gap: float,
    rounds: int,
    counter: RefusalCounter | None,
    *,
    transactional: bool = True,
) -> dict[str, Any]:
    """`rounds` transactions `gap` s apart, each timed from its begin until a read_committed
    consumer has its record; with `transactional` False, plain sends of the same records
    (acks=all, idempotent), timed from the send."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"bench-txn-{gap}" if transactional else None,
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
    )
    consumer = AIOKafkaConsumer(
        TOPICS[1],
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="latest",
    )
    await producer.start()
    await consumer.start()
    seen: dict[bytes, float] = {}

    async def read() -> None:
        async for record in consumer:
            seen[record.value or b""] = time.perf_counter()

    reader = asyncio.create_task(read())
    await asyncio.sleep(2)  # the consumer has its position
    if counter is not None:
        counter.refused = 0
    latencies = []
    try:
        for n in range(rounds):
            await asyncio.sleep(gap)
            mark = f"{gap}-{n}".encode()
            started = time.perf_counter()
            if transactional:
                await producer.begin_transaction()
            await producer.send(TOPICS[0], b"x", key=b"k")
            await producer.send(TOPICS[1], mark, key=b"k")
            if transactional:
                await producer.commit_transaction()
            for _ in range(500):
                if mark in seen:
                    break
                await asyncio.sleep(0.002)
            latencies.append(seen.get(mark, time.perf_counter()) - started)
    finally:
        reader.cancel()
        await consumer.stop()
        await producer.stop()
    return {
        "gap_s": gap,
        "refused_share": round(counter.refused / rounds, 2) if counter is not None else None,
        "begin_to_read_ms": summarise(latencies),
    }


async def create_topics(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, 1, 3, topic_configs={"min.insync.replicas": "2"}) for t in TOPICS]
        )
    finally:
        await admin.close()


async def run(bootstrap: str, gaps: list[float], rounds: int) -> list[dict[str, Any]]:
    await create_topics(bootstrap)
    with RefusalCounter() as counter:
        return [await measure(bootstrap, gap, rounds, counter) for gap in gaps]


async def hop_floor(bootstrap: str, rounds: int = 200, gap: float = 0.1) -> dict[str, Any]:
    """What one hop costs on an idle three-node cluster, before a fleet runs on it: a Kafka
    transaction from its begin until a read_committed consumer has its record, and a plain
    send (acks=all) until it is read. Central's replies travel the first way in
    high-availability mode, the CPs' events and drivers' requests the second."""
    await create_topics(bootstrap)
    transaction = await measure(bootstrap, gap, rounds, None)
    plain = await measure(bootstrap, gap, rounds, None, transactional=False)
    return {
        "rounds": rounds,
        "gap_s": gap,
        "transaction_ms": transaction["begin_to_read_ms"],
        "plain_ms": plain["begin_to_read_ms"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.transactions", description=__doc__)
    p.add_argument("--waits", default="500,20", help="replica.fetch.wait.max.ms values")
    p.add_argument("--gaps", default="0.03,0.1,0.3,1", help="seconds between transactions")
    p.add_argument("--rounds", type=int, default=40, help="transactions a gap")
    a = p.parse_args(argv)
    gaps = [float(g) for g in a.gaps.split(",")]
    for wait in a.waits.split(","):
        base = free_port_run(3)
        with tempfile.TemporaryDirectory(prefix="ev-bench-txn-") as tmp:
            env = {
                **os.environ,
                "EV_KAFKA_RUN_DIR": str(Path(tmp) / "cluster"),
                "EV_KAFKA_REPLICA_FETCH_WAIT_MS": wait,
            }
            subprocess.run(
                [str(KAFKA_SH), "cluster", "start", "3", str(base)],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            try:
                bootstrap = ",".join(f"127.0.0.1:{base + i}" for i in range(3))
                for row in asyncio.run(run(bootstrap, gaps, a.rounds)):
                    figures = row["begin_to_read_ms"]
                    print(
                        f"replica.fetch.wait.max.ms={wait}: {row['gap_s']:g} s between"
                        f" transactions: {row['refused_share']:.0%} began with a refusal;"
                        f" begin -> read p50 {figures['p50']} ms, p99 {figures['p99']} ms",
                        flush=True,
                    )
            finally:
                subprocess.run(
                    [str(KAFKA_SH), "cluster", "stop", str(base)],
                    env=env,
                    check=False,
                    stdout=subprocess.DEVNULL,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
