"""Central's monitor port (:5000) against random and damaged frames.

Each example opens its own connection, writes its bytes and reads every byte of the answer.
Central must answer only NACKs and refusals, close the connection, stay healthy, connect no CP
and change no row of its database.
"""

from __future__ import annotations

import pytest
from fuzzing import (
    SEEDED_CPS,
    as_dict,
    bad_lrc,
    flipped,
    framed_if_possible,
    identifiers,
    instances,
    mutated_json,
    unknown_cp_ids,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from property_stack import PROPERTY, CentralSnapshot, RawPeer, Stack

from shared import messages as m
from shared.errors import MessageError
from shared.framing import ETX, STX, BadFrame, Frame, FrameDecoder, Garbage, Oversized, encode_frame

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

# Real messages Central must never accept as a first frame, or at all on this port.
not_an_auth = st.one_of(
    instances(m.Heartbeat, cp_id=identifiers, engine_ok=st.booleans(), seq=st.integers(0, 99)),
    instances(m.FaultReport, cp_id=identifiers, detail=st.text(max_size=40)),
    instances(m.RecoveryReport, cp_id=identifiers),
)
wrong_channel = st.one_of(
    instances(m.EngineHello, cp_id=identifiers),
    instances(m.HealthCheck, seq=st.integers(0, 99), central_ok=st.booleans()),
    instances(m.HealthReport, seq=st.integers(0, 99), ok=st.booleans()),
    instances(m.AuthResult, cp_id=st.sampled_from(sorted(SEEDED_CPS)), accepted=st.just(True)),
    instances(m.CPStatusNotice, cp_id=identifiers, state=st.sampled_from(m.CPState)),
    instances(m.SupplyRequest, driver_id=identifiers, cp_id=identifiers),
)
unknown_auth = instances(m.MonitorAuth, cp_id=unknown_cp_ids, secret=st.none() | st.text())
seeds = st.one_of(unknown_auth, not_an_auth, wrong_channel)


@st.composite
def bad_chunks(draw: st.DrawFn) -> bytes:
    """One piece of hostile input: garbage, a damaged frame, or a frame Central must refuse."""
    message = draw(seeds)
    data = m.encode(message)
    kind = draw(
        st.sampled_from(
            ["random", "flipped", "bad_lrc", "mutated", "wrong_channel", "valid", "huge", "cut"]
        )
    )
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=200))
    if kind == "flipped":
        return draw(flipped(encode_frame(data)))
    if kind == "bad_lrc":
        return bad_lrc(data, draw(st.integers(1, 255)))
    if kind == "mutated":
        return framed_if_possible(draw(mutated_json(as_dict(message))))
    if kind == "wrong_channel":
        return encode_frame(m.encode(draw(wrong_channel)))
    if kind == "valid":
        return encode_frame(data)
    if kind == "huge":
        # A length past the limit: no ETX for more than 64 KiB.
        return bytes([STX]) + b"{" * draw(st.sampled_from([65_537, 100_000]))
    return encode_frame(data)[: draw(st.integers(1, len(data)))]  # cut short, never ended


def local_view(payload: bytes) -> tuple[int, list[m.Message]]:
    """What Central should make of `payload`: its bad inputs and its valid messages, in order
    (decoded with the project's codec, exactly as the server decodes)."""
    bad = 0
    valid: list[m.Message] = []
    for event in FrameDecoder().feed(payload):
        if isinstance(event, BadFrame | Garbage | Oversized):
            bad += 1
        elif isinstance(event, Frame):
            try:
                valid.append(m.decode(m.MONITOR_TO_CENTRAL, event.data))
            except MessageError:
                bad += 1
    return bad, valid


def accepted_anywhere(stack: Stack, messages: list[m.Message]) -> bool:
    """Would Central accept any of these messages as an authentication (the CP's secret)?"""
    return any(
        isinstance(x, m.MonitorAuth) and x.secret == stack.system.secret(x.cp_id) for x in messages
    )


@settings(PROPERTY, max_examples=100)
@given(chunks=st.lists(bad_chunks(), min_size=1, max_size=4))
def test_hostile_bytes_get_nacks_or_refusals_and_change_nothing(
    stack: Stack, central_before: CentralSnapshot, chunks: list[bytes]
) -> None:
    payload = b"".join(chunks)
    bad, valid = local_view(payload)
    assume(not accepted_anywhere(stack, valid))
    with RawPeer(stack.system.central_port, m.CENTRAL_TO_MONITOR) as peer:
        peer.send(payload)
        peer.finish()
        answer = peer.read(timeout=5)
    assert answer.closed, f"Central kept the connection open: {answer}"
    assert not answer.invalid and not answer.stray, answer
    for reply in answer.messages:
        assert isinstance(reply, m.AuthResult) and not reply.accepted, reply
        assert reply.reason
    if bad and not valid:
        assert answer.nacks >= 1 or answer.reset, answer
    stack.assert_central_unchanged(central_before)


# A refused authentication costs Central a deliberate pause: fewer examples here.
@settings(PROPERTY, max_examples=12)
@given(first=st.one_of(unknown_auth, not_an_auth), then=st.lists(not_an_auth, max_size=2))
def test_a_first_frame_that_is_no_valid_auth_is_refused_clearly(
    stack: Stack, central_before: CentralSnapshot, first: m.Message, then: list[m.Message]
) -> None:
    with RawPeer(stack.system.central_port, m.CENTRAL_TO_MONITOR) as peer:
        peer.send(encode_frame(m.encode(first)))
        answer = peer.read(lambda a: bool(a.messages), timeout=5)
        assert answer.acks == 1 and len(answer.messages) == 1, answer
        refusal = answer.messages[0]
        assert isinstance(refusal, m.AuthResult) and not refusal.accepted, refusal
        assert refusal.reason and refusal.key is None, refusal
        for message in then:  # whatever follows is not taken
            peer.send(encode_frame(m.encode(message)))
        answer = peer.read(timeout=3)
    assert answer.closed and len(answer.messages) == 1, answer
    stack.assert_central_unchanged(central_before)


@settings(PROPERTY, max_examples=12)
@given(
    # CP001 included: a wrong secret must not displace the monitor that is connected.
    cp_id=st.sampled_from(sorted(SEEDED_CPS)),
    secret=st.none()
    | st.text(max_size=256)
    | st.sampled_from(["", "demo-secret-CP00", "DEMO-SECRET-CP001"])
    | st.sampled_from(sorted(SEEDED_CPS)).map(lambda other: f"demo-secret-{other}"),
)
def test_an_auth_without_the_cp_secret_is_refused(
    stack: Stack, central_before: CentralSnapshot, cp_id: str, secret: str | None
) -> None:
    """Missing, wrong, or another CP's secret."""
    assume(secret != stack.system.secret(cp_id))
    with RawPeer(stack.system.central_port, m.CENTRAL_TO_MONITOR) as peer:
        peer.send(encode_frame(m.encode(m.MonitorAuth(cp_id=cp_id, secret=secret))))
        answer = peer.read(lambda a: bool(a.messages), timeout=5)
        assert answer.messages, answer
        refusal = answer.messages[0]
        assert isinstance(refusal, m.AuthResult) and not refusal.accepted, refusal
        assert refusal.reason and refusal.key is None
        answer = peer.read(timeout=3)
    assert answer.closed, answer
    stack.assert_central_unchanged(central_before)


def test_a_frame_past_the_size_limit_closes_only_its_connection(
    stack: Stack, central_before: CentralSnapshot
) -> None:
    with RawPeer(stack.system.central_port, m.CENTRAL_TO_MONITOR) as peer:
        sent = peer.send(bytes([STX]) + b"x" * (10 * 1024 * 1024) + bytes([ETX, 0]))
        answer = peer.read(timeout=5)
    assert answer.closed or not sent
    assert answer.nacks <= 1 and not answer.messages
    stack.assert_central_unchanged(central_before)
