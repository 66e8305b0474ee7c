"""HTTP responses for the dashboards' `websockets` servers (their process_request hook).

The `websockets` library answers plain GET requests through process_request; these helpers
build those responses with the headers every page needs (CSP, no sniffing, no caching of API
answers).
"""

from __future__ import annotations

import email.utils
import http
import json
import socket
from collections.abc import Iterable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Response

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def response(status: int, body: bytes, content_type: str, *, cache: bool = False) -> Response:
    headers = Headers()
    headers["Date"] = email.utils.formatdate(usegmt=True)  # lets a client compare clocks
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    if not cache:
        headers["Cache-Control"] = "no-store"
    phrase = http.HTTPStatus(status).phrase
    return Response(status, phrase, headers, body)


def json_response(data: Any, status: int = 200) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return response(status, body, "application/json; charset=utf-8")


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}


def static_response(package: str, name: str) -> Response:
    """A file of `package`'s static/ folder, or of the shared one for /static/ev.* names.

    Only plain file names of the known types are served: no paths, no dot files.
    """
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in CONTENT_TYPES:
        return error_response(404, "not found")
    owner = "shared" if name.startswith("ev.") else package
    try:
        body = resources.files(owner).joinpath("static", name).read_bytes()
    except (OSError, ValueError):
        # Missing, a directory, a name too long for the file system, a NUL byte: not found.
        return error_response(404, "not found")
    return response(200, body, CONTENT_TYPES[suffix], cache=False)


def bound_port(sockets: Iterable[socket.socket], requested: int) -> int:
    """The port a server really listens on (the one the OS chose when asked for port 0)."""
    for sock in sockets:
        return int(sock.getsockname()[1])
    return requested


def split_path(target: str) -> tuple[str, dict[str, str]]:
    """The path and the first value of each query parameter."""
    parts = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(parts.query).items() if v}
    return parts.path, query
