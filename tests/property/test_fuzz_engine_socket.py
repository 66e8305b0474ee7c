"""The engine's monitor port against random and damaged frames.

The spare engine (SPARE_CP) has no monitor of its own: the tests named it once, and after each
example a well-behaved connection checks that it still is that CP, healthy and idle. Input the
protocol accepts from any monitor (its own `hello`, health checks, the CP's key) is left out:
this is about what the engine must refuse.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
from fuzzing import (
    as_dict,
    bad_lrc,
    flipped,
    framed_if_possible,
    identifiers,
    instances,
    mutated_json,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from property_stack import CONNECTED_CP, PROPERTY, SPARE_CP, RawPeer, Stack, proven_hello

from helpers import scaled, wait_for
from shared import messages as m
from shared.errors import MessageError
from shared.framing import STX, BadFrame, Frame, FrameDecoder, Garbage, Oversized, encode_frame

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

other_cp_ids = identifiers.filter(lambda i: i != SPARE_CP)

# Valid messages of other channels: the engine must refuse every one of them.
wrong_channel = st.one_of(
    instances(m.MonitorAuth, cp_id=st.just(SPARE_CP), secret=st.text(max_size=20)),
    instances(m.Heartbeat, cp_id=st.just(SPARE_CP), engine_ok=st.booleans()),
    instances(m.HealthReport, seq=st.integers(0, 99), ok=st.booleans()),
    instances(m.AuthResult, cp_id=st.just(SPARE_CP), accepted=st.just(True)),
    instances(m.SetService, cp_id=st.just(SPARE_CP), in_service=st.booleans()),
)
# Real monitor messages, used as seeds for damage.
seeds = st.one_of(
    instances(m.EngineHello, cp_id=st.just(SPARE_CP)),
    instances(m.HealthCheck, seq=st.integers(0, 99), central_ok=st.booleans()),
    instances(m.EngineKey, cp_id=st.just(SPARE_CP), key_id=st.just("k" * 16), key=st.none()),
)


@st.composite
def bad_chunks(draw: st.DrawFn) -> bytes:
    data = m.encode(draw(seeds))
    kind = draw(st.sampled_from(["random", "flipped", "bad_lrc", "mutated", "wrong", "huge"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=200))
    if kind == "flipped":
        return draw(flipped(encode_frame(data)))
    if kind == "bad_lrc":
        return bad_lrc(data, draw(st.integers(1, 255)))
    if kind == "mutated":
        return framed_if_possible(draw(mutated_json(as_dict(m.EngineHello(cp_id=SPARE_CP)))))
    if kind == "wrong":
        return encode_frame(m.encode(draw(wrong_channel)))
    return bytes([STX]) + b"[" * 70_000


def accepted_by_engine(payload: bytes) -> bool:
    """Does `payload` hold a frame the engine must act on (a valid monitor message)?"""
    for event in FrameDecoder().feed(payload):
        if isinstance(event, Frame):
            try:
                m.decode(m.MONITOR_TO_ENGINE, event.data)
            except MessageError:
                continue
            return True
    return False


def bad_inputs(payload: bytes) -> int:
    bad = 0
    for event in FrameDecoder().feed(payload):
        if isinstance(event, BadFrame | Garbage | Oversized):
            bad += 1
    return bad


CHECKS = itertools.count(1)


def assert_engine_unchanged(stack: Stack) -> None:
    """The engine answers a health check healthy and idle, and is still SPARE_CP: a hello for
    another CP is refused by closing the connection."""
    engine = stack.system.engines[SPARE_CP]
    assert engine.running, engine.output[-3000:]
    seq = next(CHECKS)
    with RawPeer(stack.spare_engine_port, m.ENGINE_TO_MONITOR) as peer:
        peer.send(encode_frame(m.encode(proven_hello(peer, SPARE_CP))))
        peer.send(encode_frame(m.encode(m.HealthCheck(seq=seq, central_ok=False))))
        answer = peer.read(lambda a: bool(a.messages), timeout=5)
        assert answer.messages, answer
        report = answer.messages[0]
        assert isinstance(report, m.HealthReport) and report.seq == seq, report
        assert report.ok and report.engine_state == "IDLE", report
        peer.send(encode_frame(m.encode(m.EngineHello(cp_id="CP999"))))
        assert peer.read(timeout=5).closed


@settings(PROPERTY, max_examples=60)
@given(chunks=st.lists(bad_chunks(), min_size=1, max_size=4))
def test_hostile_bytes_get_nacks_and_leave_the_engine_as_it_was(
    stack: Stack, chunks: list[bytes]
) -> None:
    payload = b"".join(chunks)
    assume(not accepted_by_engine(payload))
    with RawPeer(stack.spare_engine_port, m.ENGINE_TO_MONITOR) as peer:
        peer.send(payload)
        peer.finish()
        answer = peer.read(timeout=5)
    assert answer.closed, answer
    assert not answer.messages and not answer.invalid and not answer.stray, answer
    assert answer.nacks >= 1 or answer.reset or not bad_inputs(payload), answer
    assert_engine_unchanged(stack)


@settings(PROPERTY, max_examples=15)
@given(cp_id=other_cp_ids)
def test_a_hello_for_another_cp_is_refused(stack: Stack, cp_id: str) -> None:
    with RawPeer(stack.spare_engine_port, m.ENGINE_TO_MONITOR) as peer:
        peer.send(encode_frame(m.encode(m.EngineHello(cp_id=cp_id))))
        answer = peer.read(timeout=5)
    assert answer.closed and answer.acks == 1 and not answer.messages, answer
    assert_engine_unchanged(stack)


def cp_faults(stack: Stack, cp_id: str) -> int:
    status, body = stack.admin_get("/api/events")
    assert status == 200, body
    return sum(1 for e in json.loads(body) if e["kind"] == "fault" and e["cp_id"] == cp_id)


def test_a_stranger_on_the_engine_port_does_not_cut_the_cp_off(stack: Stack) -> None:
    """Bytes from someone who is not the CP's monitor must not displace the monitor's link
    (the monitor would report the engine lost, and a supply in progress would end)."""
    port = stack.system.engine_ports[CONNECTED_CP]
    faults = cp_faults(stack, CONNECTED_CP)
    try:
        with RawPeer(port, m.ENGINE_TO_MONITOR) as peer:
            peer.send(b"not a monitor\r\n")
            peer.finish()
            peer.read(timeout=3)
        time.sleep(scaled(1.5))  # a monitor that lost its engine reports it at once
        assert cp_faults(stack, CONNECTED_CP) == faults
    finally:

        def settled() -> bool:
            return stack.state(CONNECTED_CP) == "ACTIVADO"

        asyncio.run(wait_for(settled, 15, interval=0.2))
