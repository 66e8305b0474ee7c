"""The lease of EV_Central/ha.py on a real broker: one holder, handed on, given up when hung."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from EV_Central import ha
from EV_Central.ha import Lease
from helpers import wait_for
from shared.bus import HA_TOPICS, KafkaBus

pytestmark = [pytest.mark.kafka]


async def ha_topics(bootstrap: str) -> None:
    bus = KafkaBus(bootstrap, "test-lease")
    await bus.start(ensure_topics=False)
    try:
        await bus.ensure_topics(HA_TOPICS)
    finally:
        await bus.stop()


async def stable_members(bootstrap: str, count: int) -> bool:
    """True once the lease group has settled with `count` members."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-lease-view")
    await admin.start()
    try:
        [answer] = await admin.describe_consumer_groups([ha.LEASE_GROUP])
        _, _, state, _, _, members = answer.groups[0]
        return bool(state == "Stable" and len(members) == count)
    finally:
        await admin.close()


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


async def test_one_holder_and_the_lease_moves_when_it_leaves(kafka_bootstrap: str) -> None:
    await ha_topics(kafka_bootstrap)
    first = Lease(kafka_bootstrap, "test-lease-a", 3.0)
    second = Lease(kafka_bootstrap, "test-lease-b", 3.0)
    a = asyncio.create_task(first.run())
    try:
        await asyncio.wait_for(first.held.wait(), 30)
        first.term = 7  # it took over: its claim outranks a newcomer's
        b = asyncio.create_task(second.run())
        try:
            # The group forms again with both members: the lease stays with the first.
            await wait_for(lambda: stable_members(kafka_bootstrap, 2), 20)
            assert first.held.is_set() and not second.held.is_set()
            assert not first.lost.is_set()
            left_at = time.monotonic()
            await stopped(a)  # leaving the group hands the lease on at once
            await asyncio.wait_for(second.held.wait(), 10)
            assert time.monotonic() - left_at < 3.0
        finally:
            await stopped(b)
    finally:
        await stopped(a)


async def test_a_hung_central_gives_the_lease_up(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ha_topics(kafka_bootstrap)
    monkeypatch.setattr(ha, "WATCHDOG_SECONDS", 1.5)
    lease = Lease(kafka_bootstrap, "test-lease-hung", 3.0)
    task = asyncio.create_task(lease.run())
    try:
        await asyncio.wait_for(lease.held.wait(), 30)
        time.sleep(2.5)  # noqa: ASYNC251 - the event loop hangs, on purpose; the thread does not
        await wait_for(task.done, 10, message="the lease was kept by a hung Central")
        assert lease.lost.is_set() and not lease.held.is_set()
        with pytest.raises(ha._TermOver):
            task.result()  # the term ends
    finally:
        await stopped(task)
