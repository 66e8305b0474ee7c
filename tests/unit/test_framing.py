"""The socket frame codec (shared.framing): pure bytes in, events out."""

from __future__ import annotations

import itertools
import string

import pytest

from shared.framing import (
    ACK,
    ACK_BYTE,
    ETX,
    NACK_BYTE,
    STX,
    Ack,
    BadFrame,
    Frame,
    FrameDecoder,
    Garbage,
    Nack,
    Oversized,
    encode_frame,
    lrc,
)


def data_with_lrc(target: int) -> bytes:
    """Printable data whose LRC byte is `target`."""
    for size in (1, 2, 3):
        for chars in itertools.product(string.ascii_letters + string.digits, repeat=size):
            data = "".join(chars).encode()
            if lrc(data) == target:
                return data
    raise AssertionError(f"no data with LRC 0x{target:02x}")


def test_lrc_is_xor_of_data_and_etx() -> None:
    assert lrc(b"") == ETX
    assert lrc(b"A") == 0x41 ^ ETX
    assert lrc(b"AB") == 0x41 ^ 0x42 ^ ETX


@pytest.mark.parametrize(
    "data", [b"", b"x", b'{"type":"heartbeat","cp_id":"CP001"}', bytes(range(4, 256))]
)
def test_good_frame_round_trips(data: bytes) -> None:
    frame = encode_frame(data)
    assert frame == bytes([STX]) + data + bytes([ETX, lrc(data)])
    assert FrameDecoder().feed(frame) == [Frame(data)]


def test_bad_lrc_is_a_bad_frame_and_the_stream_goes_on() -> None:
    frame = bytearray(encode_frame(b"hello"))
    frame[-1] ^= 0xFF
    decoder = FrameDecoder()
    events = decoder.feed(bytes(frame))
    assert len(events) == 1 and isinstance(events[0], BadFrame)
    assert "LRC" in events[0].reason
    assert decoder.feed(encode_frame(b"next")) == [Frame(b"next")]


def test_oversized_frame_fails_the_decoder() -> None:
    decoder = FrameDecoder(max_size=10)
    events = decoder.feed(bytes([STX]) + b"x" * 11)
    assert events == [Oversized(11)]
    assert decoder.failed
    # Nothing more is trusted from this stream.
    assert decoder.feed(encode_frame(b"ok")) == []


def test_oversized_detected_across_chunks() -> None:
    decoder = FrameDecoder(max_size=8)
    assert decoder.feed(bytes([STX]) + b"12345") == []
    events = decoder.feed(b"6789")
    assert len(events) == 1 and isinstance(events[0], Oversized)
    assert decoder.failed


def test_frame_of_exactly_max_size_is_accepted() -> None:
    data = b"y" * 16
    assert FrameDecoder(max_size=16).feed(encode_frame(data, max_size=16)) == [Frame(data)]


def test_split_reads_byte_by_byte() -> None:
    data = b'{"type":"auth","cp_id":"CP001"}'
    decoder = FrameDecoder()
    events = []
    for byte in encode_frame(data) + ACK_BYTE + encode_frame(b"second"):
        events += decoder.feed(bytes([byte]))
    assert events == [Frame(data), Ack(), Frame(b"second")]


def test_concatenated_frames_in_one_chunk() -> None:
    chunk = encode_frame(b"one") + encode_frame(b"two") + encode_frame(b"three")
    assert FrameDecoder().feed(chunk) == [Frame(b"one"), Frame(b"two"), Frame(b"three")]


def test_ack_and_nack_between_frames() -> None:
    chunk = ACK_BYTE + encode_frame(b"a") + NACK_BYTE + ACK_BYTE + encode_frame(b"b") + NACK_BYTE
    assert FrameDecoder().feed(chunk) == [Ack(), Frame(b"a"), Nack(), Ack(), Frame(b"b"), Nack()]


def test_garbage_outside_frames_is_reported() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"junk" + encode_frame(b"ok") + b"zz") == [
        Garbage(4),
        Frame(b"ok"),
        Garbage(2),
    ]
    assert not decoder.failed


@pytest.mark.parametrize("target", [STX, ACK, ETX])
def test_lrc_byte_equal_to_a_control_byte_is_read_as_lrc(target: int) -> None:
    data = data_with_lrc(target)
    frame = encode_frame(data)
    assert frame[-1] == target
    decoder = FrameDecoder()
    assert decoder.feed(frame + encode_frame(b"after")) == [Frame(data), Frame(b"after")]
    # And split exactly before the LRC byte.
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.feed(frame[-1:]) == [Frame(data)]


def test_stx_inside_frame_data_is_a_bad_frame() -> None:
    data = b"ab" + bytes([STX]) + b"cd"
    raw = bytes([STX]) + data + bytes([ETX, lrc(data)])
    events = FrameDecoder().feed(raw)
    assert len(events) == 1 and isinstance(events[0], BadFrame)


def test_encode_refuses_oversized_data() -> None:
    with pytest.raises(ValueError, match="exceeds the maximum"):
        encode_frame(b"x" * 11, max_size=10)


@pytest.mark.parametrize("control", [STX, ETX])
def test_encode_refuses_stx_or_etx_in_data(control: int) -> None:
    with pytest.raises(ValueError, match="STX or ETX"):
        encode_frame(b"ab" + bytes([control]) + b"cd")


def test_lrc_equals_the_bytewise_xor_for_every_length() -> None:
    # lrc folds the bytes as one integer; it must equal the plain XOR of DATA and ETX.
    import functools
    import random

    rng = random.Random(7)
    for size in [*range(0, 300), 4096, 65536]:
        data = bytes(rng.randrange(256) for _ in range(size))
        expected = functools.reduce(lambda acc, b: acc ^ b, data, 0) ^ ETX
        assert lrc(data) == expected, size
