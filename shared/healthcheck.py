"""Container health checks: `python -m shared.healthcheck CHECK TARGET`, exit 0 when healthy.

    http URL [--ca PEM]   GET answers 2xx (Central's and the dashboards' /healthz); an https
                          URL is verified against PEM (a CA, or the server's own certificate),
                          or the system's CAs without --ca
    tcp HOST:PORT         a TCP connection opens
    listening HOST:PORT   this host has a socket listening on PORT (the engine: connecting to
                          it would replace its monitor's connection, so the check only looks)
    connected HOST:PORT   this host has an established connection to HOST:PORT (the monitor's
                          link to Central; any address of HOST, or any host if it does not
                          resolve)

The socket checks read /proc/net/tcp and /proc/net/tcp6 (Linux, as in the containers). One
line on stdout says what was found; exit 1 when unhealthy, 2 for bad arguments.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.errors import EVError
from shared.tls import client_context, describe_failure

TIMEOUT = 3.0
LISTEN = "0A"
ESTABLISHED = "01"
PROC_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


@dataclass(frozen=True)
class SocketEntry:
    """One row of /proc/net/tcp{,6}."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: str


def _address(field: str) -> tuple[str, int]:
    """'0100007F:1F90' (little-endian words, as the kernel prints them) -> ('127.0.0.1', 8080)."""
    hex_ip, hex_port = field.split(":")
    raw = bytes.fromhex(hex_ip)
    # Each 32-bit word is in host (little-endian) order.
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if len(swapped) == 4:
        ip = ipaddress.IPv4Address(swapped)
    else:
        ip = ipaddress.IPv6Address(swapped)
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    return str(ip), int(hex_port, 16)


def parse_proc_net_tcp(text: str) -> list[SocketEntry]:
    """The sockets of a /proc/net/tcp or /proc/net/tcp6 table (header line skipped)."""
    entries = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        entries.append(SocketEntry(_address(fields[1]), _address(fields[2]), fields[3].upper()))
    return entries


def read_sockets(tables: Iterable[Path] = PROC_TABLES) -> list[SocketEntry]:
    entries: list[SocketEntry] = []
    for table in tables:
        try:
            entries += parse_proc_net_tcp(table.read_text())
        except FileNotFoundError:
            continue
    return entries


def split_target(target: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be empty or '*' for any) -> (host, port); ValueError if malformed."""
    host, sep, port = target.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {target!r}")
    return host.strip("[]"), int(port)


def resolve(host: str) -> set[str]:
    """Every address of `host`; empty when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {str(info[4][0]) for info in infos}


def is_listening(entries: Iterable[SocketEntry], port: int) -> bool:
    return any(e.state == LISTEN and e.local[1] == port for e in entries)


def is_connected(entries: Iterable[SocketEntry], addresses: set[str], port: int) -> bool:
    """An established connection to `port` on one of `addresses` (any address if empty)."""
    return any(
        e.state == ESTABLISHED
        and e.remote[1] == port
        and (not addresses or e.remote[0] in addresses)
        for e in entries
    )


def check_http(url: str, timeout: float = TIMEOUT, ca: str | None = None) -> tuple[bool, str]:
    """GET `url`; healthy on 2xx. An https URL is verified against `ca` (ValueError when `ca`
    is given for a plain http URL, ConfigError when it cannot be read)."""
    context: ssl.SSLContext | None = None
    if url.lower().startswith("https://"):
        context = client_context(ca)
    elif ca is not None:
        raise ValueError(f"--ca is for https URLs, not {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            return 200 <= answer.status < 300, f"{url} answered {answer.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read(300).decode(errors="replace").strip()
        return False, f"{url} answered {exc.code}: {body}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, BaseException):
            reason = describe_failure(reason) or reason
        return False, f"{url} did not answer: {reason}"


def check_tcp(target: str, timeout: float = TIMEOUT) -> tuple[bool, str]:
    host, port = split_target(target)
    try:
        with socket.create_connection((host or "127.0.0.1", port), timeout=timeout):
            return True, f"{host}:{port} accepts connections"
    except OSError as exc:
        return False, f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def check_listening(target: str, entries: Sequence[SocketEntry] | None = None) -> tuple[bool, str]:
    _, port = split_target(target)
    found = is_listening(read_sockets() if entries is None else entries, port)
    return found, f"{'a' if found else 'no'} socket listening on port {port}"


def check_connected(target: str, entries: Sequence[SocketEntry] | None = None) -> tuple[bool, str]:
    host, port = split_target(target)
    found = is_connected(read_sockets() if entries is None else entries, resolve(host), port)
    return found, f"{'connected' if found else 'not connected'} to {host}:{port}"


CHECKS: dict[str, Callable[[str], tuple[bool, str]]] = {
    "http": check_http,
    "tcp": check_tcp,
    "listening": check_listening,
    "connected": check_connected,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ca: str | None = None
    if len(args) == 4 and args[0] == "http" and args[2] == "--ca":
        ca = args.pop(3) or None  # an empty --ca (an unset variable) means the system's CAs
        args.pop(2)
    if len(args) != 2 or args[0] not in CHECKS:
        print(
            f"usage: python -m shared.healthcheck {{{','.join(CHECKS)}}} TARGET "
            "(http URL [--ca PEM])",
            file=sys.stderr,
        )
        return 2
    check, target = args
    run = functools.partial(check_http, ca=ca) if check == "http" else CHECKS[check]
    try:
        healthy, detail = run(target)
    except (ValueError, EVError) as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 2
    print(f"{'healthy' if healthy else 'unhealthy'}: {detail}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
