"""Properties of the frame codec (shared.framing) and of message decoding, over random input.

Hypothesis runs derandomized (the same examples on every run) so that a CI failure can be
reproduced; `database=None` keeps it from writing an example database into the repository.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from shared import messages as m
from shared.errors import MessageError
from shared.framing import (
    ACK,
    ACK_BYTE,
    ETX,
    NACK,
    NACK_BYTE,
    STX,
    Ack,
    BadFrame,
    Frame,
    FrameDecoder,
    FrameEvent,
    Garbage,
    Nack,
    Oversized,
    encode_frame,
    lrc,
)

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)

SMALL_MAX = 64  # a small frame limit, so that random input often crosses it

# DATA a sender may put in a frame: anything without STX or ETX.
frame_data = st.binary(max_size=SMALL_MAX).filter(lambda d: STX not in d and ETX not in d)

identifiers = st.from_regex(r"[A-Za-z0-9_.-]{1,32}", fullmatch=True)

# Real messages of the socket channels, built with the models the services use.
socket_messages = st.one_of(
    st.builds(m.MonitorAuth, cp_id=identifiers, secret=st.none() | st.text(max_size=40)),
    st.builds(m.Heartbeat, cp_id=identifiers, engine_ok=st.booleans(), seq=st.integers(0, 10**9)),
    st.builds(m.FaultReport, cp_id=identifiers, detail=st.text(max_size=80)),
    st.builds(m.RecoveryReport, cp_id=identifiers),
    st.builds(m.EngineHello, cp_id=identifiers),
    st.builds(
        m.HealthCheck,
        seq=st.integers(0, 10**9),
        central_ok=st.booleans(),
        cp_state=st.none() | st.sampled_from(m.CPState),
    ),
)

ADAPTERS: list[TypeAdapter[Any]] = [
    m.MONITOR_TO_CENTRAL,
    m.CENTRAL_TO_MONITOR,
    m.MONITOR_TO_ENGINE,
    m.ENGINE_TO_MONITOR,
    m.DRIVER_REQUESTS,
    m.DRIVER_UPDATES,
    m.CP_COMMANDS,
    m.CP_EVENTS,
    m.CP_STATE,
    m.CP_HEALTH,
]

SOCKET_ADAPTERS: list[TypeAdapter[Any]] = [m.MONITOR_TO_CENTRAL, m.MONITOR_TO_ENGINE]


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """`data` in chunks, cut at the given offsets (any order, repeats allowed)."""
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[start:cut]
        start = cut
    yield data[start:]


def feed_all(decoder: FrameDecoder, chunks: Iterator[bytes] | list[bytes]) -> list[FrameEvent]:
    events: list[FrameEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events


def summary(events: list[FrameEvent]) -> tuple[list[object], int, int, int]:
    """What must not depend on how the bytes were chunked.

    Frames, bad frames and an oversized frame keep their order; stray bytes are counted in
    total (a run of them is reported when a chunk ends, so chunking may split one run);
    the size of an oversized frame is the size read so far, which depends on the chunks.
    """
    frames: list[object] = []
    garbage = acks = nacks = 0
    for event in events:
        if isinstance(event, Garbage):
            garbage += event.count
        elif isinstance(event, Ack):
            acks += 1
        elif isinstance(event, Nack):
            nacks += 1
        elif isinstance(event, Oversized):
            frames.append("oversized")
        else:
            frames.append(event)
    return frames, garbage, acks, nacks


@PROPERTY
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_random_bytes_in_any_chunks_never_raise_and_give_sane_events(
    data: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder(max_size=SMALL_MAX)
    events = feed_all(decoder, split(data, cuts))
    assert all(isinstance(e, Frame | BadFrame | Oversized | Garbage | Ack | Nack) for e in events)
    for event in events:
        if isinstance(event, Frame):
            assert STX not in event.data and ETX not in event.data
            assert len(event.data) <= SMALL_MAX
        if isinstance(event, Garbage):
            assert event.count > 0
    oversized = [e for e in events if isinstance(e, Oversized)]
    assert decoder.failed == bool(oversized)
    if oversized:
        # Nothing follows an oversized frame, and nothing more is trusted from the stream.
        assert events[-1] is oversized[0] and oversized[0].size > SMALL_MAX
        assert decoder.feed(encode_frame(b"ok")) == []
    # Chunking changes nothing that matters.
    assert summary(events) == summary(FrameDecoder(max_size=SMALL_MAX).feed(data))


@PROPERTY
@given(
    frames=st.lists(st.tuples(frame_data, st.sampled_from([b"", ACK_BYTE, NACK_BYTE])), max_size=6),
    cuts=st.lists(st.integers(0, 600), max_size=10),
)
def test_encoded_frames_round_trip_with_acks_between_them(
    frames: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(data, SMALL_MAX) + control for data, control in frames)
    expected: list[FrameEvent] = []
    for data, control in frames:
        expected.append(Frame(data))
        if control:
            expected.append(Ack() if control == ACK_BYTE else Nack())
    decoder = FrameDecoder(max_size=SMALL_MAX)
    assert feed_all(decoder, split(stream, cuts)) == expected
    assert not decoder.failed


@PROPERTY
@given(data=st.binary(max_size=2 * SMALL_MAX))
def test_encode_accepts_exactly_what_a_frame_may_carry(data: bytes) -> None:
    if STX in data or ETX in data or len(data) > SMALL_MAX:
        with pytest.raises(ValueError):
            encode_frame(data, SMALL_MAX)
    else:
        frame = encode_frame(data, SMALL_MAX)
        assert frame == bytes([STX]) + data + bytes([ETX, lrc(data)])


def mutate(frame: bytes, position: int, value: int) -> bytes:
    """The frame with the byte at `position` (modulo its length) changed to `value`, or to
    its complement when it already is `value`."""
    position %= len(frame)
    new = value if value != frame[position] else value ^ 0xFF
    return frame[:position] + bytes([new]) + frame[position + 1 :]


# The control bytes are the interesting replacements; any other byte is as good as random.
replacement = st.sampled_from([STX, ETX, ACK, NACK]) | st.integers(0, 255)


@PROPERTY
@given(
    message=socket_messages,
    position=st.integers(0, 10**6),
    value=replacement,
    cuts=st.lists(st.integers(0, 2000), max_size=4),
)
def test_a_single_changed_byte_never_yields_a_message(
    message: m.Message, position: int, value: int, cuts: list[int]
) -> None:
    """Any one-byte change to a frame is caught: by the LRC, by the framing, or (when the
    change cuts the frame short with an early ETX) because a cut JSON object is invalid."""
    data = m.encode(message)
    frame = encode_frame(data)
    damaged = mutate(frame, position, value)
    events = feed_all(FrameDecoder(), split(damaged, cuts))
    assert Frame(data) not in events
    for event in events:
        if isinstance(event, Frame):
            # Only an early ETX can end a frame with a matching LRC: DATA is then cut short.
            assert data.startswith(event.data) and len(event.data) < len(data)
            for adapter in SOCKET_ADAPTERS:
                with pytest.raises(MessageError):
                    m.decode(adapter, event.data)


def test_an_early_etx_that_passes_the_lrc_still_yields_no_message() -> None:
    """The rare case above, every time: an ETX written over each byte of real frames. The LRC
    is a parity check, so some cut frames pass it; the message layer refuses all of them."""
    passed_lrc = 0
    for seq in range(20):
        data = m.encode(
            m.Heartbeat(id=f"{seq:032x}", ts=1772445600.0, cp_id="CP001", engine_ok=True, seq=seq)
        )
        frame = encode_frame(data)
        for position in range(1, len(frame) - 1):
            events = FrameDecoder().feed(mutate(frame, position, ETX))
            for event in events:
                if isinstance(event, Frame):
                    passed_lrc += 1
                    assert data.startswith(event.data) and event.data != data
                    with pytest.raises(MessageError):
                        m.decode(m.MONITOR_TO_CENTRAL, event.data)
    assert passed_lrc > 0  # the case is really exercised


@PROPERTY
@given(
    message=socket_messages,
    position=st.integers(0, 10**6),
    value=replacement,
    following=st.lists(frame_data, min_size=2, max_size=2),
)
def test_the_stream_recovers_after_a_damaged_frame(
    message: m.Message, position: int, value: int, following: list[bytes]
) -> None:
    """A damaged frame costs at most the frame after it: the next one arrives intact."""
    damaged = mutate(encode_frame(m.encode(message)), position, value)
    decoder = FrameDecoder()
    decoder.feed(damaged)
    after = feed_all(decoder, [encode_frame(data) for data in following])
    assert after and after[-1] == Frame(following[-1])
    assert not decoder.failed


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)


FIELD_NAMES = ["id", "ts", "v", "type", "cp_id", "driver_id", "session_id", "seq", "secret"]
TYPE_NAMES = [
    "auth",
    "heartbeat",
    "fault",
    "recovered",
    "hello",
    "health_check",
    "health_report",
    "login",
    "supply_request",
    "cp_plugged",
    "cp_telemetry",
    "cp_state",
    "health_sample",
    "sealed",
]


@st.composite
def message_like(draw: st.DrawFn) -> bytes:
    """JSON objects that look like messages: a known type, then random or missing fields."""
    fields = draw(st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=6))
    if draw(st.booleans()):
        fields["type"] = draw(st.sampled_from(TYPE_NAMES))
    return json.dumps(fields).encode()


@PROPERTY
@given(data=st.binary(max_size=300) | message_like())
def test_decoding_anything_raises_only_message_error(data: bytes) -> None:
    for adapter in ADAPTERS:
        try:
            m.decode(adapter, data)
        except MessageError as exc:
            assert str(exc)  # a reason to log and to answer with
