"""The socket frame codec: <STX><DATA><ETX><LRC>, with ACK and NACK bytes.

Pure: bytes in, events out, no I/O. LRC is the XOR of every DATA byte and ETX.
Between frames a peer may send a single ACK (0x06) or NACK (0x15) byte.
"""

from __future__ import annotations

from dataclasses import dataclass

STX = 0x02
ETX = 0x03
ACK = 0x06
NACK = 0x15

ACK_BYTE = bytes([ACK])
NACK_BYTE = bytes([NACK])

DEFAULT_MAX_FRAME = 64 * 1024


def lrc(data: bytes) -> int:
    """XOR of the bytes of DATA and ETX.

    Folds the bytes as one big integer (a few C-level operations) instead of a Python-level
    step per byte: Central computes it for every heartbeat of every CP.
    """
    value = int.from_bytes(data, "little")
    width = len(data)
    while width > 1:
        half = (width + 1) // 2
        value = (value >> (8 * half)) ^ (value & ((1 << (8 * half)) - 1))
        width = half
    return value ^ ETX


def encode_frame(data: bytes, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """Wrap DATA in a frame. DATA must not contain STX or ETX bytes."""
    if len(data) > max_size:
        raise ValueError(f"frame data of {len(data)} bytes exceeds the maximum of {max_size}")
    if STX in data or ETX in data:
        raise ValueError("frame data must not contain STX or ETX bytes")
    return bytes([STX]) + data + bytes([ETX, lrc(data)])


@dataclass(frozen=True, slots=True)
class Frame:
    """A well-formed frame; the receiver answers ACK."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A frame whose LRC did not match; the receiver answers NACK."""

    reason: str


@dataclass(frozen=True, slots=True)
class Oversized:
    """A frame grew past the maximum; the receiver closes the connection."""

    size: int


@dataclass(frozen=True, slots=True)
class Garbage:
    """Bytes outside any frame that are neither ACK nor NACK."""

    count: int


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class Nack:
    pass


FrameEvent = Frame | BadFrame | Oversized | Garbage | Ack | Nack


class FrameDecoder:
    """Incremental decoder: feed it any chunks, get back the events they complete."""

    _IDLE, _DATA, _LRC = range(3)

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_size = max_size
        self._state = self._IDLE
        self._buffer = bytearray()
        self._failed = False

    @property
    def failed(self) -> bool:
        """True once an oversized frame was seen: the stream cannot be trusted any more."""
        return self._failed

    def feed(self, chunk: bytes) -> list[FrameEvent]:
        events: list[FrameEvent] = []
        if self._failed:
            return events
        garbage = 0
        i = 0
        n = len(chunk)
        while i < n:
            if self._state == self._IDLE:
                byte = chunk[i]
                i += 1
                if byte == STX:
                    if garbage:
                        events.append(Garbage(garbage))
                        garbage = 0
                    self._state = self._DATA
                    self._buffer.clear()
                elif byte == ACK:
                    events.append(Ack())
                elif byte == NACK:
                    events.append(Nack())
                else:
                    garbage += 1
            elif self._state == self._DATA:
                end = chunk.find(ETX, i)
                stop = n if end < 0 else end
                self._buffer += chunk[i:stop]
                if len(self._buffer) > self.max_size:
                    self._failed = True
                    events.append(Oversized(len(self._buffer)))
                    return events
                if end < 0:
                    i = n
                else:
                    i = end + 1
                    self._state = self._LRC
            else:
                received = chunk[i]
                i += 1
                self._state = self._IDLE
                data = bytes(self._buffer)
                self._buffer.clear()
                if STX in data:
                    events.append(BadFrame("STX inside frame data"))
                elif received != lrc(data):
                    events.append(
                        BadFrame(f"bad LRC: got 0x{received:02x}, want 0x{lrc(data):02x}")
                    )
                else:
                    events.append(Frame(data))
        if garbage:
            events.append(Garbage(garbage))
        return events
