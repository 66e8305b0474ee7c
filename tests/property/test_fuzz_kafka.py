"""Random, damaged and forged Kafka records on every topic a service reads.

Central reads `ev.driver.requests` and `ev.cp.events`: everything there except a driver's login
(and the query for Central's key) must be sealed with a key Central issued. Plain messages, even
valid ones, damaged bytes, and envelopes sealed with a key of the forger's own must each be
counted as rejected or invalid and change nothing. The engine reads `ev.cp.commands` and must act
on none of these; the site dashboard reads `ev.cp.health` and `ev.cp.state` and counts the
invalid records it skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fuzzing import as_dict, flipped, identifiers, instances, mutated_json
from hypothesis import assume, given
from hypothesis import strategies as st
from property_stack import CONNECTED_CP, PROPERTY, CentralSnapshot, Stack, get

from helpers import scaled
from shared import messages as m
from shared.bus import KafkaBus, Topics
from shared.errors import MessageError
from shared.sealing import Channel, Sealer, is_sealed, open_sealed, parse

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

Record = tuple[str, bytes | None, bytes]  # topic, key, value

DRIVER = "user1"
SESSION = "0123456789abcdef"


class Producer:
    """A Kafka producer of the test's own, driven from synchronous tests."""

    def __init__(self, bootstrap: str) -> None:
        self.runner = asyncio.Runner()
        self.bus = KafkaBus(bootstrap, "property-tests")
        self.runner.run(self.bus.start(ensure_topics=False))

    def send(self, records: list[Record]) -> None:
        async def send_all() -> None:
            for topic, key, value in records:
                await self.bus.send_raw(topic, key, value)

        self.runner.run(send_all())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.runner.run(self.bus.stop())
        self.runner.close()


@pytest.fixture(scope="module")
def producer(stack: Stack) -> Iterator[Producer]:
    p = Producer(stack.system.broker)
    try:
        yield p
    finally:
        p.close()


@dataclass(frozen=True)
class CPKey:
    """CP001's current key, read from Central's database: the tests hold it as the CP's engine
    does, to damage messages that were sealed for real (never to send one undamaged)."""

    key_id: str
    key: bytes

    def opens(self, value: bytes) -> bool:
        """Would this value open with the key (a damaged copy that still authenticates)?"""
        try:
            open_sealed(parse(value), self.key)
        except MessageError:
            return False
        return True


def cp_key(stack: Stack) -> CPKey:
    rows = stack.system.query(
        "SELECT key_id, key FROM channel_keys WHERE kind = 'cp' AND principal = ?"
        " AND revoked_at IS NULL ORDER BY issued_at DESC LIMIT 1",
        CONNECTED_CP,
    )
    assert rows, f"{CONNECTED_CP} has no key"
    return CPKey(str(rows[0][0]), bytes(rows[0][1]))


driver_requests = st.one_of(
    instances(m.SupplyRequest, driver_id=st.just(DRIVER), cp_id=st.just(CONNECTED_CP)),
    instances(m.StopRequest, driver_id=st.just(DRIVER)),
    instances(m.StatusQuery, driver_id=st.just(DRIVER)),
    instances(m.TicketAck, driver_id=st.just(DRIVER), session_id=st.just(SESSION)),
    instances(m.HistoryQuery, driver_id=st.just(DRIVER)),
)
cp_events = st.one_of(
    instances(m.CPRequest, cp_id=st.just(CONNECTED_CP), driver_id=st.just(DRIVER)),
    instances(m.CPPlugged, cp_id=st.just(CONNECTED_CP), session_id=st.just(SESSION)),
    instances(
        m.CPTelemetry,
        cp_id=st.just(CONNECTED_CP),
        session_id=st.just(SESSION),
        seq=st.integers(0, 9),
        kw=st.just(22.0),
        kwh=st.floats(0, 100),
        amount_eur=st.floats(0, 100),
    ),
    instances(
        m.CPSupplyEnded,
        cp_id=st.just(CONNECTED_CP),
        session_id=st.just(SESSION),
        kwh=st.floats(0, 100),
        amount_eur=st.floats(0, 100),
        reason=st.sampled_from(m.EndReason),
    ),
)
cp_commands = st.one_of(
    instances(
        m.AuthorizeSupply,
        cp_id=st.just(CONNECTED_CP),
        session_id=st.just(SESSION),
        driver_id=st.just(DRIVER),
        price_eur_kwh=st.just(0.35),
        max_kw=st.just(22.0),
        expires_at=st.just(time.time() + 3600),
    ),
    instances(m.SetService, cp_id=st.just(CONNECTED_CP), in_service=st.booleans()),
    instances(
        m.EndSupply,
        cp_id=st.just(CONNECTED_CP),
        session_id=st.just(SESSION),
        reason=st.sampled_from(m.EndReason),
    ),
)
CHANNELS: list[Channel] = ["cp-event", "cp-command", "driver-request", "driver-update"]


@st.composite
def hostile_value(
    draw: st.DrawFn, message: m.Message, principal: str, channel: Channel, real: CPKey
) -> bytes:
    """The message as a forger or a broken client would publish it: in clear, damaged, sealed
    with a key of the forger's own (naming a real key id or not), or sealed with the CP's
    real key and then damaged."""
    plain = m.encode(message)
    forger = Sealer(
        draw(st.sampled_from([channel, channel, *CHANNELS])),
        draw(st.sampled_from([principal, principal, "CP002", "user2"])),
        draw(st.sampled_from([real.key_id, secrets.token_hex(8)])),
        secrets.token_bytes(32),
    )
    forged = forger.seal(message.id, plain)
    genuine = Sealer(channel, principal, real.key_id, real.key).seal(message.id, plain)
    assert real.opens(genuine)  # the key read from the database is the CP's real one
    kind = draw(
        st.sampled_from(
            ["damaged_genuine", "plain", "forged", "flipped", "mutated", "envelope", "random"]
        )
    )
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "plain":
        return plain
    if kind == "flipped":
        return draw(flipped(draw(st.sampled_from([plain, forged])), most=4))
    if kind == "mutated":
        return draw(mutated_json(as_dict(message)))
    if kind == "forged":
        return forged
    if kind == "envelope":
        return draw(mutated_json(json.loads(forged)))
    damaged = draw(flipped(genuine, most=2) | mutated_json(json.loads(genuine)))
    # A change that still opens (base64 has spare bits) is the same message, not a forgery.
    assume(not real.opens(damaged))
    return damaged


@st.composite
def central_records(draw: st.DrawFn, real: CPKey) -> Record:
    channel: Channel
    message: m.Message
    if draw(st.booleans()):
        topic, channel, message = Topics.DRIVER_REQUESTS, "driver-request", draw(driver_requests)
        principal = DRIVER
    else:
        topic, channel, message = Topics.CP_EVENTS, "cp-event", draw(cp_events)
        principal = CONNECTED_CP
    value = draw(hostile_value(message, principal, channel, real))
    # Mostly the record key a real sender would use: the message must fail on its own merits.
    key = draw(st.sampled_from([principal] * 4 + ["CP002", "user2", ""]) | identifiers)
    return topic, key.encode() or None, value


def a_login_in_clear(value: bytes) -> bool:
    """Central takes a driver's login (and the query for its key) unsealed: leave them out."""
    if is_sealed(value):
        return False
    try:
        request = m.decode(m.DRIVER_REQUESTS, value)
    except MessageError:
        return False
    return isinstance(request, m.LoginRequest | m.IdentityQuery)


def refused_total(stats: dict[str, int]) -> int:
    return stats.get("rejected", 0) + stats.get("invalid", 0)


def handled_total(stats: dict[str, int]) -> int:
    """Records Central has dealt with: each is counted once, by its type or as refused.
    (Heartbeats come over TCP, not Kafka.)"""
    return sum(count for name, count in stats.items() if name != "heartbeat")


@PROPERTY
@given(data=st.data())
def test_central_rejects_every_unsealed_damaged_or_forged_record(
    stack: Stack, central_before: CentralSnapshot, producer: Producer, data: st.DataObject
) -> None:
    records = data.draw(st.lists(central_records(cp_key(stack)), min_size=1, max_size=4))
    assume(not any(a_login_in_clear(value) for _, _, value in records))
    before = stack.stats()
    producer.send(records)
    deadline = time.monotonic() + scaled(10)
    while handled_total(stack.stats()) < handled_total(before) + len(records):
        assert time.monotonic() < deadline, (before, stack.stats(), records)
        time.sleep(0.02)
    after = stack.stats()
    assert refused_total(after) == refused_total(before) + len(records), (before, after)
    assert after.get("handler_errors", 0) == before.get("handler_errors", 0)
    stack.assert_central_unchanged(central_before)


ENGINE_REFUSALS = re.compile(r"refused a command at offset|skipping an invalid command|: held")
ENGINE_HANDLED = re.compile(ENGINE_REFUSALS.pattern + r"|command \w+ from Central")


@PROPERTY
@given(data=st.data())
def test_the_engine_acts_on_no_forged_command(
    stack: Stack, central_before: CentralSnapshot, producer: Producer, data: st.DataObject
) -> None:
    real = cp_key(stack)
    messages = data.draw(st.lists(cp_commands, min_size=1, max_size=3))
    records: list[Record] = [
        (
            Topics.CP_COMMANDS,
            data.draw(st.sampled_from([CONNECTED_CP.encode(), None])),
            data.draw(hostile_value(message, CONNECTED_CP, "cp-command", real)),
        )
        for message in messages
    ]
    engine = stack.system.engines[CONNECTED_CP]
    start = len(engine.output)
    producer.send(records)
    deadline = time.monotonic() + scaled(10)
    while len(ENGINE_HANDLED.findall(engine.output, start)) < len(records):
        assert time.monotonic() < deadline, engine.output[start:]
        time.sleep(0.02)
    assert "from Central" not in engine.output[start:], engine.output[start:]
    assert len(ENGINE_REFUSALS.findall(engine.output, start)) == len(records)
    assert engine.running
    stack.assert_central_unchanged(central_before)


def site_invalid(stack: Stack) -> int:
    """Records the site dashboard skipped: invalid ones, and health samples it refused (not
    sealed by a CP's monitor)."""
    status, body = get(stack.site_port, "/healthz")
    assert status == 200, body
    status_of = json.loads(body)
    count: int = status_of["invalid_messages"] + status_of["refused_samples"]
    return count


@st.composite
def site_records(draw: st.DrawFn) -> Record:
    topic = draw(st.sampled_from([Topics.CP_HEALTH, Topics.CP_STATE]))
    if topic == Topics.CP_HEALTH:
        seed: m.Message = m.HealthSample(cp_id=CONNECTED_CP, engine_ok=True, central_ok=True)
        adapter: object = m.CP_HEALTH
    else:
        seed = m.CPStateUpdate(
            cp_id=CONNECTED_CP,
            state=m.CPState.AVERIADO,
            location="x",
            price_eur_kwh=0.35,
            max_kw=22.0,
        )
        adapter = m.CP_STATE
    value = draw(
        st.binary(max_size=200)
        | mutated_json(as_dict(seed))
        | flipped(m.encode(seed), most=3)
        | st.just(b"")
    )
    try:
        m.decode(adapter, value)  # type: ignore[arg-type]
    except MessageError:
        return topic, CONNECTED_CP.encode(), value
    assume(False)  # a valid sample or state is not hostile input
    raise AssertionError  # unreachable


@PROPERTY
@given(records=st.lists(site_records(), min_size=1, max_size=4))
def test_the_site_dashboard_counts_and_skips_invalid_records(
    stack: Stack, producer: Producer, records: list[Record]
) -> None:
    before = site_invalid(stack)
    status, view = get(stack.site_port, "/api/site")
    assert status == 200
    producer.send(records)
    deadline = time.monotonic() + scaled(10)
    while site_invalid(stack) < before + len(records):
        assert time.monotonic() < deadline, (before, site_invalid(stack))
        time.sleep(0.02)
    assert site_invalid(stack) == before + len(records)
    status, now = get(stack.site_port, "/api/site")
    assert status == 200
    assert cps_of(now) == cps_of(view)
    assert stack.site.running


def cps_of(body: bytes) -> list[tuple[str, str, str]]:
    return [(cp["id"], cp["state"], cp["engine"]) for cp in json.loads(body)["cps"]]
