"""Free TCP ports on the loopback, for the tools that start servers (bench, chaos)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_run(n: int, tries: int = 50) -> int:
    """A port P such that P .. P+n-1 are all free now (a Kafka cluster's client ports)."""
    for _ in range(tries):
        base = free_port()
        if base + n >= 65536:
            continue
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no run of {n} free ports found")
