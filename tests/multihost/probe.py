"""HTTP reads from inside a simulated host: `ip netns exec NS python probe.py TIMEOUT [CA]`.

Reads one JSON request a line on stdin and answers each with one JSON line on stdout:

    {"get": URL}                                  -> {"status": 200, "body": ...}
    {"login": BASE_URL, "user": U, "password": P} -> {"status": 204, "body": {"user": U, ...}}

or `{"error": "..."}` when nothing answered or a login was refused. A login is Central's
(docs/web-auth.md): the password on a /login WebSocket, the grant it answers redeemed with
GET /session for the session cookie, which every later GET to the same server then carries.
It lives as long as its stdin, so a test reads Central's API from another host without a
process start (or a login) per request. With CA (a PEM file), https:// and wss:// URLs are
verified against it, as the deployment's clients verify Central (docs/tls.md).
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from websockets.exceptions import WebSocketException
from websockets.sync.client import connect

MAX_BODY = 4 * 1024 * 1024

# No proxy from the environment: every request stays inside the simulated network. main()
# replaces both once it knows the CA.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TLS: ssl.SSLContext | None = None
# The session cookie ("name=value") of each server logged in to, by scheme://host:port.
COOKIES: dict[str, str] = {}


def origin_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _body(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return None


def get(url: str, timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url)
    cookie = COOKIES.get(origin_of(url))
    if cookie:
        request.add_header("Cookie", cookie)
    try:
        with OPENER.open(request, timeout=timeout) as resp:
            return {
                "status": resp.status,
                "body": _body(resp.read(MAX_BODY)),
                "set_cookie": resp.headers.get_all("Set-Cookie") or [],
            }
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": _body(exc.read(MAX_BODY))}
    except (OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def login(base_url: str, user: str, password: str, timeout: float) -> dict[str, Any]:
    ws_url = "ws" + base_url.removeprefix("http") + "/login"
    try:
        tls = TLS if ws_url.startswith("wss:") else None
        with connect(
            ws_url, ssl=tls, proxy=None, open_timeout=timeout, close_timeout=timeout
        ) as ws:
            ws.send(json.dumps({"type": "login", "user": user, "password": password}))
            answer = json.loads(ws.recv(timeout=timeout))
    except (OSError, TimeoutError, ValueError, WebSocketException) as exc:
        return {"error": f"login: {type(exc).__name__}: {exc}"}
    if not isinstance(answer, dict) or not answer.get("ok"):
        return {"error": f"login refused: {answer}"}
    grant = urllib.parse.quote(str(answer.pop("grant", "")))
    redeemed = get(f"{base_url}/session?grant={grant}", timeout)
    if "error" in redeemed:
        return redeemed
    # The pair before the attributes (Path, HttpOnly, SameSite, Max-Age) is what is sent back.
    pairs = [c.split(";", 1)[0].strip() for c in redeemed.pop("set_cookie", [])]
    if redeemed["status"] != 204 or not pairs:
        return {"error": f"no session cookie from /session: {redeemed}"}
    COOKIES[origin_of(base_url)] = "; ".join(pairs)
    return {"status": redeemed["status"], "body": answer}


def answer(line: str, timeout: float) -> dict[str, Any]:
    try:
        request = json.loads(line)
        if "login" in request:
            return login(request["login"], request["user"], request["password"], timeout)
        reply = get(request["get"], timeout)
    except (ValueError, KeyError, TypeError) as exc:
        return {"error": f"bad request line {line!r}: {type(exc).__name__}: {exc}"}
    reply.pop("set_cookie", None)
    return reply


def main() -> None:
    global OPENER, TLS
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    if len(sys.argv) > 2:
        TLS = ssl.create_default_context(cafile=sys.argv[2])
        OPENER = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=TLS)
        )
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(answer(line, timeout)), flush=True)


if __name__ == "__main__":
    main()
