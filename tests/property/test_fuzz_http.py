"""Random and malformed HTTP requests to the three web servers, over raw sockets.

Central's admin web, the driver dashboard and the site dashboard must never answer 5xx, never
serve a file outside their static folders, and stay healthy; Central changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from property_stack import PROPERTY, CentralSnapshot, Stack, get

from helpers import scaled
from procs import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

SERVERS = ("central", "driver", "site")
PACKAGES = {"central": "EV_Central", "driver": "EV_Driver", "site": "EV_CP_M"}


def static_bodies(package: str) -> set[bytes]:
    """Every file a server may send as a page or static file: its own and the shared ones."""
    folders = [REPO_ROOT / package / "static", REPO_ROOT / "shared" / "static"]
    return {path.read_bytes() for folder in folders for path in Path(folder).iterdir()}


STATIC = {server: static_bodies(package) for server, package in PACKAGES.items()}

KNOWN_PATHS = [
    "/",
    "/index.html",
    "/healthz",
    "/metrics",
    "/api/cps",
    "/api/sessions",
    "/api/events",
    "/api/stats",
    "/api/drivers",
    "/api/audit",
    "/api/whoami",
    "/api/site",
    "/session",
    "/login",
    "/ws",
    "/static/ev.css",
    "/static/ev.js",
    "/static/admin.js",
    "/static/driver.js",
    "/static/site.js",
]
# Ways out of a static folder, plain and encoded: none may reach a file.
TRAVERSALS = [
    "/static/../pyproject.toml",
    "/static/../../pyproject.toml",
    "/static/..%2f..%2fpyproject.toml",
    "/static/%2e%2e/%2e%2e/pyproject.toml",
    "/static/%252e%252e%252fpyproject.toml",
    "/static/..\\..\\pyproject.toml",
    "/static/....//....//pyproject.toml",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/.env",
    "/static/.audit-key",
    "/static/ev.css/../../../EV_Central/db.py",
    "/static/__init__.py",
    "/static/../web.py",
    "/../../../../etc/passwd",
    "/static/ev.css%00.js",
    "/static/" + "a" * 300 + ".js",
    "/static/ev." + "b" * 300 + ".css",
    "/static/%C0%AE%C0%AE/pyproject.toml",
]
QUERIES = [
    "",
    "?limit=0",
    "?limit=-1",
    "?limit=99999999999999999999",
    "?limit=%00",
    "?limit=1e3",
    "?driver_id=user1",
    "?driver_id=%27%20OR%201%3D1--",
    "?grant=",
    "?grant=" + "A" * 5000,
    "?a=1&a=2&limit=5",
    "?%ff%fe=%ff",
]

text_segments = st.text(max_size=30).map(lambda t: quote(t, safe="/%?=&."))
raw_bytes = st.binary(min_size=1, max_size=40).map(
    lambda b: b.replace(b" ", b"").replace(b"\r", b"")
)


# Hypothesis favours the first element of a list and small numbers: the usual case comes first.
rarely = st.sampled_from([False] * 9 + [True])


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    pick = draw(st.sampled_from(["known"] * 3 + ["traversal"] * 2 + ["text"] * 2 + ["long"]))
    if pick == "known":
        base = draw(st.sampled_from(KNOWN_PATHS))
    elif pick == "traversal":
        base = draw(st.sampled_from(TRAVERSALS))
    elif pick == "text":
        base = "/" + draw(text_segments)
    else:
        base = "/" + "x" * draw(st.sampled_from([4000, 9000, 70_000]))
    target = (base + draw(st.sampled_from(QUERIES))).encode("utf-8")
    if draw(rarely):
        target += draw(raw_bytes)  # raw bytes, non-ASCII and control characters included
    return target


header_names = st.sampled_from(
    ["Host", "Cookie", "Origin", "Upgrade", "Connection", "Content-Length", "X-Forwarded-For"]
) | st.from_regex(r"[A-Za-z0-9-]{1,40}", fullmatch=True)
header_values = st.one_of(
    st.from_regex(r"[ -~]{0,80}", fullmatch=True).map(str.encode),
    st.sampled_from([b"websocket", b"Upgrade", b"-1", b"99999999999", b"ev_admin_session=x"]),
    st.sampled_from([b"null", b"http://evil.example", b"http://127.0.0.1"]),
)
odd_header_values = st.one_of(
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=80),
    st.sampled_from([b"A" * 9000, b"B" * 70_000]),
)


@dataclass(frozen=True)
class Request:
    server: str
    data: bytes


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """Mostly requests a server parses (so they reach its handlers), some it must refuse."""
    server = draw(st.sampled_from(SERVERS))
    method = draw(st.sampled_from([b"GET"] * 12 + [b"POST", b"HEAD", b"PUT", b"get", b"G\x00T"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 12 + [b"HTTP/1.0", b"HTTP/2", b"HTTP/9", b""]))
    lines = [method + b" " + draw(targets()) + b" " + version]
    if not draw(rarely):
        lines.append(b"Host: 127.0.0.1")
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=5))
    if draw(rarely):
        headers.append((draw(header_names), draw(odd_header_values)))
    lines += [name.encode() + b": " + value for name, value in headers]
    if draw(rarely):
        lines += [b"X-Many: %d" % i for i in range(300)]
    ending = draw(st.sampled_from([b"\r\n"] * 5 + [b"\n"]))
    body = draw(st.sampled_from([b""] * 5 + [b"{}", b"x" * 5000]))
    return Request(server, ending.join(lines) + ending + ending + body)


@dataclass
class Reply:
    status: int | None
    headers: dict[str, str]
    body: bytes


def exchange(port: int, data: bytes, timeout: float = 5.0) -> Reply:
    """Send raw bytes; read the answer until it is complete, the server closes, or the
    timeout passes (a server may also close without answering a malformed request)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(timeout)) as sock:
        with contextlib.suppress(OSError):  # the server may close before reading everything
            sock.sendall(data)
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline and not complete(received):
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
    if not received:
        return Reply(None, {}, b"")
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 "), received[:200]
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split()[1]), headers, body)


def complete(received: bytes) -> bool:
    """Has a whole response (head and a body of its Content-Length) arrived?"""
    head, found, body = received.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return True


def port_of(stack: Stack, server: str) -> int:
    ports: dict[str, int] = {
        "central": stack.system.http_port,
        "driver": stack.driver_port,
        "site": stack.site_port,
    }
    return ports[server]


@settings(PROPERTY, max_examples=80)
@given(request=requests())
def test_no_request_gets_a_5xx_or_a_file_outside_the_static_folder(
    stack: Stack, central_before: CentralSnapshot, request: Request
) -> None:
    port = port_of(stack, request.server)
    reply = exchange(port, request.data)
    event(f"{request.server}: {reply.status or 'closed without an answer'}")
    if reply.status is not None:
        assert reply.status < 500, (reply, request)
        kind = reply.headers.get("content-type", "")
        if reply.status == 200 and not kind.startswith(("application/json", "text/plain")):
            assert reply.body in STATIC[request.server], (reply.headers, reply.body[:200])
    status, body = get(port, "/healthz")
    assert status == 200, body
    stack.assert_central_unchanged(central_before)


@PROPERTY
@given(
    path=st.sampled_from(
        ["/api/cps", "/api/sessions", "/api/events", "/api/drivers", "/api/audit"]
    ),
    query=st.sampled_from(QUERIES) | text_segments.map(lambda t: "?" + t),
    cookie=st.sampled_from(["", "ev_admin_session=", "ev_admin_session=forged"])
    | st.text(max_size=60).map(lambda t: "ev_admin_session=" + quote(t)),
)
def test_the_admin_api_refuses_every_request_without_a_real_session(
    stack: Stack, central_before: CentralSnapshot, path: str, query: str, cookie: str
) -> None:
    assume(cookie != stack.admin_cookie)
    status, body = get(stack.system.http_port, path + query, headers={"Cookie": cookie})
    assert status in (400, 401), (status, body)
    assert "error" in json.loads(body)
    stack.assert_central_unchanged(central_before)


@PROPERTY
@given(
    path=st.sampled_from(["/api/sessions", "/api/audit", "/api/cps", "/api/events"]),
    query=st.sampled_from(QUERIES) | text_segments.map(lambda t: "?" + t),
)
def test_the_admin_api_answers_any_query_clearly(
    stack: Stack, central_before: CentralSnapshot, path: str, query: str
) -> None:
    status, body = stack.admin_get(path + query)
    assert status in (200, 400, 404), (status, body)
    answer = json.loads(body)
    assert status == 200 or "error" in answer
    stack.assert_central_unchanged(central_before)


def test_every_way_out_of_the_static_folder_is_a_clear_404(
    stack: Stack, central_before: CentralSnapshot
) -> None:
    """Each traversal on each server, every time (the property above samples them)."""
    for server in SERVERS:
        port = port_of(stack, server)
        for path in TRAVERSALS:
            reply = exchange(port, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert reply.status in (400, 404), (server, path, reply)
            assert "error" in json.loads(reply.body), (server, path, reply)
        status, body = get(port, "/healthz")
        assert status == 200, body
    stack.assert_central_unchanged(central_before)
