"""tools/netem.py without a kernel: netem's words read, each packet's fate drawn, and the
NFQUEUE netlink messages made and read byte for byte (linux/netfilter/nfnetlink_queue.h)."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from tools.netem import (
    NF_ACCEPT,
    NF_DROP,
    NLMSG_ERROR,
    Impairment,
    SpecError,
    attributes,
    bind_message,
    error_code,
    messages,
    packet_id,
    parse_spec,
    verdict_message,
)

QUEUE_CONFIG = (3 << 8) | 2
QUEUE_VERDICT = (3 << 8) | 1
QUEUE_PACKET = (3 << 8) | 0


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("loss 20%", Impairment(loss=0.2)),
        ("delay 200ms", Impairment(delay=0.2)),
        ("delay 200ms 50ms", Impairment(delay=0.2, jitter=0.05)),
        ("delay 1s 500us loss 5%", Impairment(loss=0.05, delay=1.0, jitter=0.0005)),
        ("loss 0.5% delay 30ms", Impairment(loss=0.005, delay=0.03)),
    ],
)
def test_netems_words(words: str, expected: Impairment) -> None:
    assert parse_spec(words.split()) == expected


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("", "nothing to do"),
        ("loss", "cannot read 'loss'"),
        ("loss lots", "a loss is a percentage"),
        ("loss 120%", "a loss is 0% to 100%"),
        ("delay 200", "a time is a number with ms, s or us"),
        ("delay -5ms", "a time is a number with ms, s or us"),
        ("delay 20s", "is over 10 s"),
        ("rate 1mbit", "cannot read 'rate'"),
    ],
)
def test_words_it_cannot_read(words: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(words.split())


def test_each_packet_is_lost_or_held_as_asked() -> None:
    rng = random.Random(1)
    lossy = Impairment(loss=0.3)
    fates = [lossy.hold(rng) for _ in range(10_000)]
    assert 0.28 < fates.count(None) / len(fates) < 0.32
    assert set(fates) == {None, 0.0}
    slow = Impairment(delay=0.2, jitter=0.05)
    holds = [slow.hold(rng) for _ in range(10_000)]
    assert all(h is not None and 0.15 <= h <= 0.25 for h in holds)
    assert 0.195 < sum(h for h in holds if h is not None) / len(holds) < 0.205
    # A jitter larger than the delay never holds a packet for less than nothing.
    assert min(Impairment(delay=0.01, jitter=0.05).hold(rng) or 0.0 for _ in range(1000)) >= 0
    assert str(Impairment(0.2, 0.3, 0.06)) == "delay 300ms 60ms loss 20%"


def test_the_bind_request_names_the_queue_and_asks_for_the_ids_only() -> None:
    data = bind_message(7, seq=1)
    ((kind, seq, payload),) = messages(data)
    assert (kind, seq) == (QUEUE_CONFIG, 1)
    flags = struct.unpack_from("=H", data, 6)[0]
    assert flags == 0x1 | 0x4  # a request, acknowledged (an error comes back as one)
    assert payload[:4] == bytes([socket.AF_UNSPEC, 0]) + struct.pack(">H", 7)
    attrs = attributes(payload)
    assert attrs[1] == bytes([1, 0]) + struct.pack(">H", socket.AF_UNSPEC)  # BIND
    assert attrs[2] == struct.pack(">IB", 0, 1)  # copy nothing but the packet's metadata
    assert attrs[4] == attrs[5] == struct.pack(">I", 1)  # fail open when the queue is full
    assert len(data) % 4 == 0 and struct.unpack_from("=I", data)[0] == len(data)


def test_a_verdict_names_the_queue_the_packet_and_its_fate() -> None:
    for fate in (NF_ACCEPT, NF_DROP):
        ((kind, _seq, payload),) = messages(verdict_message(3, 0xDEADBEEF, fate))
        assert kind == QUEUE_VERDICT
        assert struct.unpack(">H", payload[2:4]) == (3,)
        assert attributes(payload)[2] == struct.pack(">II", fate, 0xDEADBEEF)


def _netlink(kind: int, payload: bytes) -> bytes:
    return (
        struct.pack("=IHHII", 16 + len(payload), kind, 0, 0, 0)
        + payload
        + b"\0" * (-len(payload) % 4)
    )


def test_queued_packets_are_read_by_id_in_one_read() -> None:
    def packet(number: int) -> bytes:
        header = struct.pack(">IHB", number, 0x0800, 3)  # id, IPv4, the OUTPUT hook
        hdr_attr = struct.pack("=HH", 4 + len(header), 1) + header + b"\0"
        mark = struct.pack("=HH", 8, 3) + struct.pack(">I", 0)
        return _netlink(QUEUE_PACKET, struct.pack("=BBH", 2, 0, 0) + hdr_attr + mark)

    data = packet(41) + packet(42) + _netlink(QUEUE_VERDICT, bytes(4))
    assert [packet_id(k, p) for k, _s, p in messages(data)] == [41, 42, None]
    # A read cut short yields the whole messages it holds and stops.
    assert [packet_id(k, p) for k, _s, p in messages(data[:-3])] == [41, 42]


def test_the_kernels_answer_to_a_request() -> None:
    ack = _netlink(NLMSG_ERROR, struct.pack("=i", 0) + bytes(16))
    refused = _netlink(NLMSG_ERROR, struct.pack("=i", -1) + bytes(16))
    assert [error_code(k, p) for k, _s, p in messages(ack + refused)] == [0, 1]
    assert error_code(QUEUE_PACKET, bytes(8)) is None
