"""python -m tools.netem: packet loss and delay on a link, in user space (what `tc netem` does).

The kernels this project is tested on (CI's among them) have no `sch_netem`: `tc qdisc add ...
netem` answers "Specified qdisc kind is unknown". They do have netfilter's NFQUEUE, which hands
each packet to a program and waits for its verdict. This is that program: bound to one queue of
the network namespace it runs in, it drops each packet with the given probability and lets the
others through after the given delay (uniform within the jitter, each packet on its own, so that
packets may overtake one another, as with netem). `scripts/netns.sh netem PC SPEC` starts it in
a PC and sends that PC's traffic on eth0, both ways, through its queue; `scripts/netns.sh clear
PC` ends it. Standard library only: the script runs it with the machine's python3 as well.

    python -m tools.netem [--queue N] loss 20%
    python -m tools.netem [--queue N] delay 200ms 50ms [loss 5%]

It prints one line once bound ("ready"), and one with what it did when it ends (SIGTERM or
SIGINT), after letting every packet still held go at once.

The netlink messages (linux/netfilter/nfnetlink_queue.h) are made and read by pure functions
below, tested without a kernel (tests/unit/test_netem.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NETLINK_NO_ENOBUFS = 5
SOL_NETLINK = 270
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1  # the verdict needs the packet's id only, not its bytes
NFQA_CFG_F_FAIL_OPEN = 0x1  # a full queue lets packets pass: no loss beyond the one asked for
NF_DROP = 0
NF_ACCEPT = 1
NLA_TYPE_MASK = 0x3FFF
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_ATTR = struct.Struct("=HH")  # struct nlattr
# A packet's delay is never longer than this, whatever the spec says: a typo must not hold a
# link's traffic for minutes.
MAX_DELAY = 10.0
RECEIVE_BUFFER = 8 << 20


class SpecError(ValueError):
    """A loss or delay that cannot be read."""


@dataclass(frozen=True)
class Impairment:
    """What happens to each packet: lost with probability `loss`, else held `delay` ± `jitter`
    seconds."""

    loss: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0

    def hold(self, rng: random.Random) -> float | None:
        """Seconds to hold one packet before it goes on, or None to drop it."""
        if self.loss and rng.random() < self.loss:
            return None
        if not self.delay:
            return 0.0
        return max(0.0, rng.uniform(self.delay - self.jitter, self.delay + self.jitter))

    def __str__(self) -> str:
        parts = []
        if self.delay:
            parts.append(f"delay {self.delay * 1000:g}ms")
            if self.jitter:
                parts[-1] += f" {self.jitter * 1000:g}ms"
        if self.loss:
            parts.append(f"loss {self.loss * 100:g}%")
        return " ".join(parts) or "nothing"


def parse_spec(words: Sequence[str]) -> Impairment:
    """netem's words: `loss P%`, `delay T [JITTER]` (T in ms, s or us), in any order."""
    loss = delay = jitter = 0.0
    rest = list(words)
    if not rest:
        raise SpecError("nothing to do: give loss P% and/or delay T [JITTER]")
    while rest:
        word = rest.pop(0)
        if word == "loss" and rest:
            loss = _percent(rest.pop(0))
        elif word == "delay" and rest:
            delay = _seconds(rest.pop(0))
            if rest and rest[0][:1].isdigit():
                jitter = _seconds(rest.pop(0))
        else:
            raise SpecError(f"cannot read {word!r}: give loss P% and/or delay T [JITTER]")
    if delay + jitter > MAX_DELAY:
        raise SpecError(f"a delay of {delay:g} s ± {jitter:g} s is over {MAX_DELAY:g} s")
    return Impairment(loss, delay, jitter)


def _percent(text: str) -> float:
    try:
        value = float(text.removesuffix("%"))
    except ValueError:
        raise SpecError(f"a loss is a percentage such as 20%, not {text!r}") from None
    if not 0 <= value <= 100:
        raise SpecError(f"a loss is 0% to 100%, not {text!r}")
    return value / 100


def _seconds(text: str) -> float:
    for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if text.endswith(unit):
            try:
                value = float(text.removesuffix(unit))
            except ValueError:
                break
            if value >= 0:
                return value * scale
            break
    raise SpecError(f"a time is a number with ms, s or us, such as 200ms, not {text!r}")


# --- the netlink messages (pure) ------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    size = _ATTR.size + len(payload)
    return _ATTR.pack(size, kind) + payload + b"\0" * (-size % 4)


def _message(kind: int, flags: int, seq: int, queue: int, attrs: bytes) -> bytes:
    # struct nfgenmsg: the family (none), version 0 and the queue, in network order.
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", queue) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | kind
    return _HEADER.pack(_HEADER.size + len(body), kind, flags, seq, 0) + body


def bind_message(queue: int, seq: int) -> bytes:
    """Bind `queue` to this socket, copying no packet bytes, letting packets pass when full."""
    flags = struct.pack(">I", NFQA_CFG_F_FAIL_OPEN)
    attrs = (
        _attr(NFQA_CFG_CMD, struct.pack(">BxH", NFQNL_CFG_CMD_BIND, socket.AF_UNSPEC))
        + _attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META))
        + _attr(NFQA_CFG_MASK, flags)
        + _attr(NFQA_CFG_FLAGS, flags)
    )
    return _message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue, attrs)


def unbind_message(queue: int, seq: int) -> bytes:
    cmd = _attr(NFQA_CFG_CMD, struct.pack(">BxH", NFQNL_CFG_CMD_UNBIND, socket.AF_UNSPEC))
    return _message(NFQNL_MSG_CONFIG, NLM_F_REQUEST, seq, queue, cmd)


def verdict_message(queue: int, packet_id: int, verdict: int) -> bytes:
    attrs = _attr(NFQA_VERDICT_HDR, struct.pack(">II", verdict, packet_id))
    return _message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, queue, attrs)


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, payload) of each netlink message in one read; a truncated one ends it."""
    at = 0
    while at + _HEADER.size <= len(data):
        size, kind, _flags, seq, _pid = _HEADER.unpack_from(data, at)
        if size < _HEADER.size or at + size > len(data):
            return
        yield kind, seq, data[at + _HEADER.size : at + size]
        at += (size + 3) & ~3


def attributes(payload: bytes) -> dict[int, bytes]:
    """The attributes after a message's struct nfgenmsg, by type."""
    found: dict[int, bytes] = {}
    at = 4
    while at + _ATTR.size <= len(payload):
        size, kind = _ATTR.unpack_from(payload, at)
        if size < _ATTR.size or at + size > len(payload):
            break
        found[kind & NLA_TYPE_MASK] = payload[at + _ATTR.size : at + size]
        at += (size + 3) & ~3
    return found


def packet_id(kind: int, payload: bytes) -> int | None:
    """The id of a queued packet (NFQNL_MSG_PACKET), None for any other message."""
    if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
        return None
    header = attributes(payload).get(NFQA_PACKET_HDR)
    if header is None or len(header) < 4:
        return None
    return int(struct.unpack_from(">I", header)[0])


def error_code(kind: int, payload: bytes) -> int | None:
    """A NLMSG_ERROR's error (0 for an acknowledgement), None for any other message."""
    if kind != NLMSG_ERROR or len(payload) < 4:
        return None
    return -int(struct.unpack_from("=i", payload)[0])


# --- the queue ------------------------------------------------------------------------------


class Queue:
    """One NFQUEUE queue, bound: every packet gets its verdict, now or after its delay."""

    def __init__(self, number: int, impairment: Impairment, rng: random.Random) -> None:
        self.number = number
        self.impairment = impairment
        self.rng = rng
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.held: dict[int, asyncio.TimerHandle] = {}
        self.seen = self.dropped = self.delayed = 0

    def bind(self) -> None:
        """Bind the queue, or OSError with the kernel's reason (no NFQUEUE, taken already)."""
        self.sock.setsockopt(socket.SOL_SOCKET, 33, RECEIVE_BUFFER)  # SO_RCVBUFFORCE (root)
        # Messages lost to a full buffer leave their packets queued until we end (they then go
        # with the rest): better than a read that fails.
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self.sock.send(bind_message(self.number, 1))
        for kind, _seq, payload in messages(self.sock.recv(65536)):
            code = error_code(kind, payload)
            if code:
                raise OSError(code, os.strerror(code))
        self.sock.setblocking(False)

    def on_readable(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            for kind, _seq, payload in messages(data):
                found = packet_id(kind, payload)
                if found is None:
                    continue
                self.seen += 1
                hold = self.impairment.hold(self.rng)
                if hold is None:
                    self.dropped += 1
                    self._verdict(found, NF_DROP)
                elif hold == 0:
                    self._verdict(found, NF_ACCEPT)
                else:
                    self.delayed += 1
                    self.held[found] = loop.call_later(hold, self._release, found)

    def _release(self, found: int) -> None:
        self.held.pop(found, None)
        self._verdict(found, NF_ACCEPT)

    def _verdict(self, found: int, verdict: int) -> None:
        self.sock.send(verdict_message(self.number, found, verdict))

    def close(self) -> None:
        """Let every held packet go now, unbind, close."""
        for found, timer in self.held.items():
            timer.cancel()
            self._verdict(found, NF_ACCEPT)
        self.held.clear()
        self.sock.send(unbind_message(self.number, 2))
        self.sock.close()

    def summary(self) -> str:
        return f"{self.seen} packets: {self.dropped} dropped, {self.delayed} delayed"


async def serve(queue: Queue) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_reader(queue.sock.fileno(), queue.on_readable)
    print(f"netem: ready on NFQUEUE {queue.number}: {queue.impairment}", flush=True)
    await stop.wait()
    loop.remove_reader(queue.sock.fileno())
    queue.close()
    print(f"netem: done: {queue.summary()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.netem", description=__doc__)
    parser.add_argument("--queue", type=int, default=0, help="the NFQUEUE number (0)")
    parser.add_argument("spec", nargs="+", help="loss P%% and/or delay T [JITTER], as netem")
    args = parser.parse_args(argv)
    try:
        impairment = parse_spec(args.spec)
    except SpecError as exc:
        parser.exit(2, f"netem: {exc}\n")
    queue = Queue(args.queue, impairment, random.Random())
    try:
        queue.bind()
    except OSError as exc:
        parser.exit(1, f"netem: cannot bind NFQUEUE {args.queue}: {exc}\n")
    asyncio.run(serve(queue))
    return 0


if __name__ == "__main__":
    sys.exit(main())
