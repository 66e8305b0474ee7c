"""Random, oversized and damaged WebSocket messages to every WebSocket of the system.

- the site dashboard's /ws (no login): every message is answered (an error, a pong, a snapshot)
  or the connection is closed with a proper code;
- the logins (/login) of Central's admin web and of the driver dashboard: one refusal, then
  the connection closes; no session, nothing changed but the failure counters;
- /ws of Central and of the driver dashboard without a real session (or from a foreign page):
  the handshake is refused;
- Central's /ws with the admin's session: every damaged command gets a result with ok false,
  and no CP is stopped, registered or given a new secret or key;
- the driver dashboard's /ws with a driver's session: every damaged command gets an error,
  and no supply is asked for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fuzzing import json_values, mutated_json
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st
from property_stack import (
    LOGIN_TABLES,
    PROPERTY,
    CentralSnapshot,
    Stack,
    get,
    may_change,
    web_login,
)
from pydantic import ValidationError
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from EV_Central.admin_api import ADMIN_REQUEST, AdminCommand, RegisterCP
from EV_Driver.dashboard_protocol import parse_command
from helpers import scaled
from shared.errors import MessageError
from shared.websession import parse_login

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

ACCOUNTS = {"admin", "user1", "user2", "user3", "user4", "user5"}

# Text that is JSON or almost: what a broken page or a prober sends.
json_text = json_values.map(json.dumps)
texts = st.one_of(
    st.text(max_size=200),
    json_text,
    st.sampled_from(["", "{}", "[]", "null", '{"type":', '{"type":"ping"}', "\x00" * 10]),
)


def oversized(limit: int) -> st.SearchStrategy[str | bytes]:
    return st.sampled_from(["x" * (limit + 1), b"\x00" * (limit + 1), '{"a":"' + "y" * limit])


def messages(seeds: list[dict[str, Any]], limit: int) -> st.SearchStrategy[str | bytes]:
    """Random text and bytes, damaged real messages, and a few past the size limit."""
    mutated = st.one_of(*[mutated_json(seed) for seed in seeds]).map(lambda b: b.decode())
    return st.one_of(
        texts,
        mutated,
        mutated,
        st.binary(max_size=200),
        st.sampled_from(seeds).map(lambda seed: json.dumps(seed).encode()),  # JSON, as binary
        oversized(limit),
    )


def open_ws(
    port: int, path: str, headers: dict[str, str] | None = None, origin: str | None = None
) -> ClientConnection:
    return connect(
        f"ws://127.0.0.1:{port}{path}",
        additional_headers=headers,
        origin=origin,  # type: ignore[arg-type]
        open_timeout=scaled(5),
        max_size=None,
    )


def replies(ws: ClientConnection, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The next message that `wanted` picks (pushes come in between); raises ConnectionClosed."""
    deadline = time.monotonic() + scaled(10)
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no answer"
        message: dict[str, Any] = json.loads(ws.recv(timeout=left))
        if wanted(message):
            return message


def close_code(ws: ClientConnection) -> int | None:
    received = ws.protocol.close_rcvd
    return received.code if received is not None else None


# --- the site dashboard --------------------------------------------------------------------

SITE_LIMIT = 1024
SITE_SEEDS: list[dict[str, Any]] = [{"type": "ping", "ref": "r1"}, {"type": "snapshot"}]


class SiteSocket:
    """One /ws connection to the site dashboard, opened again whenever the server closes it.

    Before each example a ping with a fresh `ref` is answered, and everything before its pong
    is skipped: what an example reads is the answer to its own message, even after an example
    that failed half-way.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.ws: ClientConnection | None = None
        self.syncs = 0

    def current(self) -> ClientConnection:
        if self.ws is None:
            self.ws = open_ws(self.port, "/ws").__enter__()
        self.syncs += 1
        ref = f"sync-{self.syncs}"
        self.ws.send(json.dumps({"type": "ping", "ref": ref}))
        replies(self.ws, lambda m: m["type"] == "pong" and m["ref"] == ref)
        return self.ws

    def close(self) -> None:
        if self.ws is not None:
            self.ws.__exit__(None, None, None)
            self.ws = None


@pytest.fixture(scope="module")
def site_socket(stack: Stack) -> Iterator[SiteSocket]:
    socket = SiteSocket(stack.site_port)
    yield socket
    socket.close()


def answer_to(raw: str | bytes) -> set[str]:
    """What the site dashboard may answer to `raw`."""
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {"error"}
    if isinstance(raw, str) and isinstance(message, dict) and set(message) <= {"type", "ref"}:
        ref = message.get("ref")
        if isinstance(ref, str | type(None)) and (ref is None or len(ref) <= 64):
            kind = str(message.get("type"))
            return {{"ping": "pong", "snapshot": "snapshot"}.get(kind, "error")}
    return {"error"}


@settings(PROPERTY, max_examples=60)
@given(raw=messages(SITE_SEEDS, SITE_LIMIT))
def test_the_site_dashboard_answers_every_message_or_closes_properly(
    stack: Stack, site_socket: SiteSocket, raw: str | bytes
) -> None:
    ws = site_socket.current()
    try:
        ws.send(raw)
        answer = replies(ws, lambda m: m["type"] in ("error", "pong", "snapshot"))
    except ConnectionClosed:
        site_socket.close()
        event(f"closed with {close_code(ws)}")
        # Too big (1009), or too many invalid messages on one connection (1008).
        assert close_code(ws) in (1008, 1009), close_code(ws)
        assert close_code(ws) == 1008 or len(raw) > SITE_LIMIT
    else:
        event(f"answered {answer['type']}")
        assert len(raw) <= SITE_LIMIT, "a message past the limit was read"
        assert answer["type"] in answer_to(raw), (raw, answer)
        if answer["type"] == "error":
            assert answer["detail"], answer
    status, body = get(stack.site_port, "/healthz")
    assert status == 200, body
    assert stack.site.running


# --- logins: Central's admin web and the driver dashboard -----------------------------------

LOGIN_SEEDS: list[dict[str, Any]] = [
    {"type": "login", "user": "nobody-here", "password": "not the password"},
    {"type": "login", "user": "x", "password": "y"},
]


def a_real_account_login(raw: str | bytes) -> bool:
    """A well-formed login for an account that exists: left out (it would count toward
    locking out a real person, which is that feature's own test)."""
    try:
        return parse_login(raw).user in ACCOUNTS
    except MessageError:
        return False


def one_refusal(port: int, raw: str | bytes) -> None:
    """Send one login message: the answer is one refusal (or a close for a message past the
    limit), then the server closes the connection."""
    with open_ws(port, "/login") as ws:
        ws.send(raw)
        try:
            answer = json.loads(ws.recv(timeout=scaled(15)))
            event(f"refused: {str(answer.get('reason'))[:30]}")
        except ConnectionClosed:
            assert close_code(ws) == 1009 and len(raw) > 1024, close_code(ws)
            return
        assert answer["type"] == "login_result" and answer["ok"] is False, answer
        assert answer["reason"] and "grant" not in answer, answer
        with pytest.raises(ConnectionClosed):
            ws.send('{"type":"login","user":"admin","password":"admin"}')
            ws.recv(timeout=scaled(5))


# A well-formed login for nobody, every run: the whole path to the password check.
WELL_FORMED = json.dumps(LOGIN_SEEDS[0])


@may_change(*LOGIN_TABLES)
@settings(PROPERTY, max_examples=20)
@given(raw=messages(LOGIN_SEEDS, 4096))
@example(raw=WELL_FORMED)
def test_central_login_refuses_anything_but_a_right_password(
    stack: Stack, central_before: CentralSnapshot, raw: str | bytes
) -> None:
    assume(not a_real_account_login(raw))
    one_refusal(stack.system.http_port, raw)
    stack.assert_central_unchanged(central_before)


@may_change(*LOGIN_TABLES)
@settings(PROPERTY, max_examples=12)
@given(raw=messages(LOGIN_SEEDS, 4096))
@example(raw=WELL_FORMED)
def test_driver_dashboard_login_refuses_anything_but_a_right_password(
    stack: Stack, central_before: CentralSnapshot, raw: str | bytes
) -> None:
    assume(not a_real_account_login(raw))
    one_refusal(stack.driver_port, raw)
    status, body = get(stack.driver_port, "/healthz")
    assert status == 200, body
    assert json.loads(body)["drivers"] == 0, body  # nobody logged in
    stack.assert_central_unchanged(central_before)


# --- /ws without a session ------------------------------------------------------------------

cookies = st.one_of(
    st.just(""),
    st.text(max_size=60).map(lambda t: "ev_admin_session=" + t.encode().hex()),
    st.text(max_size=60).map(lambda t: "ev_driver_session=" + t.encode().hex()),
    st.from_regex(r"[ -~]{0,100}", fullmatch=True),
)
origins = st.sampled_from([None, "null", "http://evil.example", "https://127.0.0.1.evil.example"])


@PROPERTY
@given(server=st.sampled_from(["central", "driver"]), cookie=cookies, origin=origins)
def test_a_websocket_without_a_real_session_is_refused_at_the_handshake(
    stack: Stack, central_before: CentralSnapshot, server: str, cookie: str, origin: str | None
) -> None:
    port = stack.system.http_port if server == "central" else stack.driver_port
    headers = {"Cookie": cookie} if cookie else None
    with pytest.raises(InvalidStatus) as refused, open_ws(port, "/ws", headers, origin):
        pass
    assert refused.value.response.status_code in (401, 403), refused.value.response


@PROPERTY
@given(origin=st.sampled_from(["null", "http://evil.example", "http://localhost:1"]))
def test_the_admin_session_is_useless_from_a_foreign_page(
    stack: Stack, central_before: CentralSnapshot, origin: str
) -> None:
    port, cookie = stack.system.http_port, {"Cookie": stack.admin_cookie}
    with pytest.raises(InvalidStatus) as refused, open_ws(port, "/ws", cookie, origin):
        pass
    assert refused.value.response.status_code == 403


# --- Central's /ws with the admin's session -------------------------------------------------

ADMIN_LIMIT = 4096
ADMIN_SEEDS: list[dict[str, Any]] = [
    {"type": "command", "action": "stop", "target": "CP999", "ref": "r1"},
    {"type": "command", "action": "resume", "target": "NOPE", "ref": "r2"},
    {
        "type": "register_cp",
        "id": "CP001",  # registered already: refused
        "location": "Alicante",
        "price_eur_kwh": 0.35,
        "max_kw": 22.0,
        "ref": "r3",
    },
    {"type": "revoke_key", "target": "CP999", "ref": "r4"},
    {"type": "reset_secret", "target": "ZZZ", "ref": "r5"},
]


def changes_state(raw: str | bytes, registered: set[str]) -> bool:
    """Would Central carry this command out? (Then it is not hostile input but an order.)"""
    try:
        command = ADMIN_REQUEST.validate_json(raw)
    except ValidationError:
        return False
    if isinstance(command, RegisterCP):
        return command.id not in registered
    if isinstance(command, AdminCommand) and command.target.lower() == "all":
        return True
    return command.target in registered


class AdminSocket:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.ws: ClientConnection | None = None

    def current(self) -> ClientConnection:
        if self.ws is None:
            headers = {"Cookie": self.stack.admin_cookie}
            self.ws = open_ws(self.stack.system.http_port, "/ws", headers).__enter__()
            replies(self.ws, lambda m: m["type"] == "snapshot")
        return self.ws

    def close(self) -> None:
        if self.ws is not None:
            self.ws.__exit__(None, None, None)
            self.ws = None


@pytest.fixture(scope="module")
def admin_socket(stack: Stack) -> Iterator[AdminSocket]:
    socket = AdminSocket(stack)
    yield socket
    socket.close()


@settings(PROPERTY, max_examples=60)
@given(raw=messages(ADMIN_SEEDS, ADMIN_LIMIT))
def test_the_admin_websocket_refuses_every_damaged_command(
    stack: Stack, central_before: CentralSnapshot, admin_socket: AdminSocket, raw: str | bytes
) -> None:
    assume(not changes_state(raw, set(central_before.cps)))
    ws = admin_socket.current()
    try:
        ws.send(raw)
        answer = replies(ws, lambda m: m["type"] == "result")
    except ConnectionClosed:
        admin_socket.close()
        event(f"closed with {close_code(ws)}")
        assert close_code(ws) == 1009 and len(raw) > ADMIN_LIMIT, close_code(ws)
    else:
        event(f"refused: {str(answer.get('detail'))[:24]}")
        assert len(raw) <= ADMIN_LIMIT, "a message past the limit was read"
        assert answer["ok"] is False and answer["detail"], answer
        assert "secret" not in answer and "cps" not in answer, answer
    stack.assert_central_unchanged(central_before)


# --- the driver dashboard's /ws with a driver's session -------------------------------------

DRIVER_LIMIT = 64 * 1024
DRIVER_SEEDS: list[dict[str, Any]] = [
    {"type": "request", "cp_id": "CP001"},
    {"type": "stop"},
    {"type": "run_file", "name": "trip.txt", "text": "CP001\nCP002\n"},
    {"type": "cancel_run"},
    {"type": "refresh"},
]


def a_driver_command(raw: str | bytes) -> bool:
    """Would the dashboard carry this out (text that is a valid command)? Then it is no
    hostile input: a supply request or a run would change things on purpose."""
    if isinstance(raw, bytes):
        return False
    try:
        parse_command(raw)
    except MessageError:
        return False
    return True


class DriverSocket:
    """user1's browser on the driver dashboard: logged in once, /ws opened again when closed.

    Before each example an invalid message naming a fresh tag is sent, and everything up to
    its error is skipped, so an example reads the answer to its own message.
    """

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.cookie = web_login(stack.driver_port, "user1", "pass1")
        self.ws: ClientConnection | None = None
        self.syncs = 0

    def current(self) -> ClientConnection:
        if self.ws is None:
            headers = {"Cookie": self.cookie}
            self.ws = open_ws(self.stack.driver_port, "/ws", headers).__enter__()
        self.syncs += 1
        tag = f"sync-{self.syncs}"
        self.ws.send(json.dumps({"type": tag}))
        replies(self.ws, lambda m: m["type"] == "error" and tag in m.get("detail", ""))
        return self.ws

    def close(self) -> None:
        if self.ws is not None:
            self.ws.__exit__(None, None, None)
            self.ws = None


@pytest.fixture(scope="module")
def driver_socket(stack: Stack) -> Iterator[DriverSocket]:
    socket = DriverSocket(stack)
    socket.current()
    settle(stack)
    yield socket
    socket.close()


def settle(stack: Stack) -> None:
    """Wait until Central's database is quiet after a login: the driver's key, and the replay
    guard of its first sealed queries, which Central saves once a second."""
    deadline = time.monotonic() + scaled(15)
    previous = stack.db_rows()
    while True:
        time.sleep(1.5)
        now = stack.db_rows()
        if now == previous:
            return
        assert time.monotonic() < deadline, "Central's database never settled"
        previous = now


# Requests that would change something at Central (the others only read).
ACTING_REQUESTS = ("supply_request", "stop_request", "ticket_ack")


# The logged-in page's own status and history queries are sealed; Central's replay guard
# records how far each sealed stream has got, so it may move on while a test runs.
@may_change("replay_guard")
@settings(PROPERTY, max_examples=40)
@given(raw=messages(DRIVER_SEEDS, DRIVER_LIMIT))
def test_the_driver_websocket_refuses_every_damaged_command(
    stack: Stack,
    driver_socket: DriverSocket,
    central_before: CentralSnapshot,
    raw: str | bytes,
) -> None:
    assume(not a_driver_command(raw))
    acting = [stack.stats().get(kind, 0) for kind in ACTING_REQUESTS]
    ws = driver_socket.current()
    try:
        ws.send(raw)
        answer = replies(ws, lambda m: m["type"] == "error")
    except ConnectionClosed:
        driver_socket.close()
        event(f"closed with {close_code(ws)}")
        assert close_code(ws) == 1009 and len(raw) > DRIVER_LIMIT, close_code(ws)
    else:
        event(f"error: {answer['detail'][:24]}")
        assert len(raw) <= DRIVER_LIMIT, "a message past the limit was read"
        assert answer["detail"], answer
    status, body = get(stack.driver_port, "/healthz")
    assert status == 200, body
    assert [stack.stats().get(kind, 0) for kind in ACTING_REQUESTS] == acting
    stack.assert_central_unchanged(central_before)
