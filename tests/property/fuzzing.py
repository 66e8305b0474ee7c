"""Hypothesis strategies for the property tests: random and damaged frames, JSON and text."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from hypothesis import strategies as st

from shared import messages as m
from shared.framing import ACK, ETX, NACK, STX, encode_frame, lrc

M = TypeVar("M", bound=m.Message)

SEEDED_CPS = frozenset(f"CP{n:03d}" for n in range(1, 11))

identifiers = st.from_regex(r"[A-Za-z0-9_.-]{1,32}", fullmatch=True)
message_ids = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
timestamps = st.floats(1.7e9, 1.9e9)


def instances(model: type[M], **fields: Any) -> st.SearchStrategy[M]:
    """Instances of a message model whose id and time are drawn too (not random, not the
    clock): the same examples on every run, as derandomized Hypothesis promises."""
    return st.builds(model, id=message_ids, ts=timestamps, **fields)


unknown_cp_ids = identifiers.filter(lambda i: i not in SEEDED_CPS)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=10,
)


def flip(data: bytes, positions: list[int], values: list[int]) -> bytes:
    """`data` with the bytes at `positions` (modulo its length) changed to other values."""
    out = bytearray(data)
    for position, value in zip(positions, values, strict=False):
        if out:
            i = position % len(out)
            out[i] = value if value != out[i] else value ^ 0xFF
    return bytes(out)


byte_values = st.sampled_from([STX, ETX, ACK, NACK, 0x00, 0x7F, 0xFF]) | st.integers(0, 255)


@st.composite
def flipped(draw: st.DrawFn, data: bytes, most: int = 3) -> bytes:
    n = draw(st.integers(1, most))
    positions = draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n))
    values = draw(st.lists(byte_values, min_size=n, max_size=n))
    return flip(data, positions, values)


@st.composite
def mutated_json(draw: st.DrawFn, message: dict[str, Any]) -> bytes:
    """A real message as a JSON object with fields changed, dropped, added or retyped."""
    fields = dict(message)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["set", "drop", "add", "version", "type", "huge"]))
        name = draw(st.sampled_from(sorted(fields))) if fields else "type"
        if how == "set":
            fields[name] = draw(json_values)
        elif how == "drop":
            fields.pop(name, None)
        elif how == "add":
            fields[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
        elif how == "version":
            fields["v"] = draw(st.sampled_from([0, 2, "1", 1.5, None, True]))
        elif how == "type":
            fields["type"] = draw(st.sampled_from(MESSAGE_TYPES + ["", "AUTH", "sealed"]))
        else:
            fields[name] = "x" * draw(st.sampled_from([501, 4097, 70_000]))
    return json.dumps(fields, ensure_ascii=draw(st.booleans())).encode()


MESSAGE_TYPES = [
    "auth",
    "auth_result",
    "heartbeat",
    "fault",
    "recovered",
    "cp_status",
    "hello",
    "health_check",
    "health_report",
    "key",
    "login",
    "supply_request",
    "stop_request",
    "status_query",
    "ticket_ack",
    "history_query",
    "cp_plugged",
    "cp_telemetry",
    "cp_supply_ended",
    "cp_request",
    "authorize_supply",
    "end_supply",
    "set_service",
    "cp_state",
    "health_sample",
]


def as_dict(message: m.Message) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(m.encode(message))
    return loaded


def bad_lrc(data: bytes, delta: int) -> bytes:
    """A frame around `data` whose LRC is wrong by `delta` (1-255)."""
    return bytes([STX]) + data + bytes([ETX, lrc(data) ^ delta])


def framed_if_possible(data: bytes) -> bytes:
    """A well-formed frame around `data`, or (when DATA holds STX/ETX or is too long to
    frame) the same bytes between STX and ETX with the LRC a frame would have."""
    try:
        return encode_frame(data)
    except ValueError:
        return bytes([STX]) + data + bytes([ETX, lrc(data)])
