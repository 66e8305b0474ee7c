"""Browser sessions, grants, cookies and the Origin check (shared.websession): pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.datastructures import Headers

from shared.errors import MessageError
from shared.websession import (
    SessionStore,
    clear_cookie,
    cookie_value,
    digest,
    login_ok,
    login_refused,
    normalise_origin,
    origin_allowed,
    parse_login,
    session_cookie,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> SessionStore:
    return SessionStore(ttl=100, idle=30, grant_ttl=5, clock=clock)


def headers(*pairs: tuple[str, str]) -> Headers:
    h = Headers()
    for name, value in pairs:
        h[name] = value
    return h


# --- grants and sessions -------------------------------------------------------------------


def test_a_grant_becomes_a_session_once(store: SessionStore) -> None:
    code = store.grant("admin", "admin")
    redeemed = store.redeem(code)
    assert redeemed is not None
    token, session = redeemed
    assert (session.user_id, session.role) == ("admin", "admin")
    assert store.get(token) is session
    assert store.redeem(code) is None  # single use
    assert len(store) == 1


def test_a_grant_expires(store: SessionStore, clock: Clock) -> None:
    code = store.grant("user1", "driver")
    clock.now += 5
    assert store.redeem(code) is None
    assert len(store) == 0


def test_sessions_end_after_their_lifetime_even_when_used(
    store: SessionStore, clock: Clock
) -> None:
    token, session = store.create("user1", "driver")
    for step in (25, 25, 25, 24):
        clock.now += step
        assert store.get(token) is session  # used every 25 s: never idle for 30
    clock.now += 1  # 100 s after the start: the end of its lifetime
    assert store.get(token) is None
    assert not store.valid(session)


def test_idle_sessions_end_and_open_connections_keep_them(
    store: SessionStore, clock: Clock
) -> None:
    idle_token, idle = store.create("user1", "driver")
    busy_token, busy = store.create("user2", "driver")
    clock.now += 20
    store.touch(busy)  # its page is open
    clock.now += 15
    assert store.get(idle_token) is None and not store.valid(idle)
    assert store.get(busy_token) is busy


def test_logout_and_ending_every_session_of_a_user(store: SessionStore) -> None:
    one, _ = store.create("user1", "driver")
    two, _ = store.create("user1", "driver")
    other, _ = store.create("user2", "driver")
    ended = store.end(one)
    assert ended is not None and ended.user_id == "user1"
    assert store.get(one) is None and store.end(one) is None
    assert store.end_user("user1") == 1
    assert store.get(two) is None and store.get(other) is not None


def test_the_store_is_bounded(clock: Clock) -> None:
    store = SessionStore(ttl=100, idle=50, max_sessions=3, max_grants=2, clock=clock)
    tokens = []
    for i in range(3):
        clock.now += 1
        tokens.append(store.create(f"u{i}", "driver")[0])
    clock.now += 1
    store.get(tokens[0])  # u0 used last: u1 is the idlest
    store.create("u3", "driver")
    assert len(store) == 3
    assert store.get(tokens[1]) is None and store.get(tokens[0]) is not None
    codes = [store.grant("a", "driver") for _ in range(3)]
    assert store.redeem(codes[0]) is None and store.redeem(codes[2]) is not None


def test_tokens_are_random_and_only_their_digest_is_kept(store: SessionStore) -> None:
    tokens = {store.create("u", "driver")[0] for _ in range(50)}
    assert len(tokens) == 50 and all(len(t) >= 40 for t in tokens)
    kept = repr(store.__dict__)
    assert not any(t in kept for t in tokens)


@given(st.text(max_size=200))
def test_no_made_up_token_or_grant_opens_anything(guess: str) -> None:
    store = SessionStore()
    store.create("admin", "admin")
    store.grant("admin", "admin")
    assert store.get(guess) is None
    assert store.redeem(guess) is None
    assert store.end(guess) is None


# --- cookies ---------------------------------------------------------------------------------


def test_the_session_cookie_is_out_of_scripts_reach() -> None:
    cookie = session_cookie("ev_admin_session", "tok", 3600, secure=False)
    assert cookie == "ev_admin_session=tok; Path=/; HttpOnly; SameSite=Strict; Max-Age=3600"
    assert session_cookie("n", "t", 5, secure=True).endswith("; Secure")
    assert clear_cookie("n", False) == "n=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"


def test_cookie_values_are_found_by_exact_name() -> None:
    h = headers(("Cookie", "a=1; ev_admin_session_x=2"), ("Cookie", 'ev_admin_session="3"; b=4'))
    assert cookie_value(h, "ev_admin_session") == "3"
    assert cookie_value(h, "a") == "1"
    assert cookie_value(h, "missing") is None
    assert cookie_value(Headers(), "a") is None


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300))
def test_any_cookie_header_parses_without_error(text: str) -> None:
    value = cookie_value(headers(("Cookie", text)), "s")
    assert value is None or isinstance(value, str)


# --- Origin -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "127.0.0.1:8002", True),  # not a browser: ctl, scripts
        ("http://127.0.0.1:8002", "127.0.0.1:8002", True),
        ("http://PC2.local:8002", "pc2.local:8002", True),
        ("http://pc2", "pc2:80", True),
        ("https://pc2", "pc2", True),
        ("https://pc2:443", "pc2", True),
        ("http://[::1]:8002", "[::1]:8002", True),
        ("http://127.0.0.1:8003", "127.0.0.1:8002", False),  # the site dashboard's page
        ("http://evil.example", "127.0.0.1:8002", False),
        ("http://127.0.0.1.evil.example:8002", "127.0.0.1:8002", False),
        ("null", "127.0.0.1:8002", False),
        ("file://", "127.0.0.1:8002", False),
        ("http://127.0.0.1:8002/path", "127.0.0.1:8002", False),
        ("http://user@127.0.0.1:8002", "127.0.0.1:8002", False),
        ("http://127.0.0.1:99999", "127.0.0.1:99999", False),
    ],
)
def test_origin_must_be_the_server_itself(origin: str | None, host: str, allowed: bool) -> None:
    pairs = [("Host", host)] + ([("Origin", origin)] if origin is not None else [])
    assert origin_allowed(headers(*pairs), frozenset()) is allowed


def test_other_origins_only_when_configured() -> None:
    h = headers(("Host", "pc2:8002"), ("Origin", "https://ops.example"))
    assert not origin_allowed(h, frozenset())
    assert origin_allowed(h, frozenset({normalise_origin("https://OPS.example:443")}))
    two = headers(("Host", "pc2:8002"), ("Origin", "http://pc2:8002"), ("Origin", "http://x"))
    assert not origin_allowed(two, frozenset())
    no_host = headers(("Origin", "http://pc2:8002"))
    assert not origin_allowed(no_host, frozenset())


@pytest.mark.parametrize(
    "bad", ["null", "ftp://x", "http://", "http://x/y", "http://u:p@x", "x", "http://x?q"]
)
def test_normalise_origin_refuses_what_is_not_an_origin(bad: str) -> None:
    with pytest.raises(ValueError):
        normalise_origin(bad)


# --- the login message --------------------------------------------------------------------------


def test_login_messages() -> None:
    form = parse_login('{"type":"login","user":"user1","password":"pass1"}')
    assert (form.user, form.password) == ("user1", "pass1")
    for raw, where in [
        ('{"type":"login","user":"user1"}', "password"),
        ('{"type":"login","user":"a b","password":"x"}', "user"),
        ('{"type":"login","user":"u","password":"x","role":"admin"}', "role"),
        ("[]", "message"),
    ]:
        with pytest.raises(MessageError, match=where):
            parse_login(raw)
    with pytest.raises(MessageError, match="exceeds"):
        parse_login('{"type":"login","user":"u","password":"' + "x" * 2000 + '"}')
    assert login_ok("g", "admin", "admin") == {
        "type": "login_result",
        "ok": True,
        "grant": "g",
        "user": "admin",
        "role": "admin",
    }
    assert login_refused("locked", 2.4)["retry_after"] == 2
    assert login_refused("locked", 0.2)["retry_after"] == 1
    assert "retry_after" not in login_refused("wrong user or password")


def test_a_store_that_keeps_its_sessions_elsewhere_is_told_and_takes_them_back(
    store: SessionStore, clock: Clock
) -> None:
    told: list[tuple[str, str | None]] = []
    store.changed = lambda key, session: told.append((key, session and session.user_id))
    token, session = store.create("admin", "admin")
    other, _ = store.create("user1", "driver")
    store.end(other)
    assert told == [(session.key, "admin"), (digest(other), "user1"), (digest(other), None)]
    kept_until = store.wall_time(session.expires_at)

    # Another store (a standby Central taking over) gets the session back: the same token works.
    standby = SessionStore(ttl=100, idle=30, grant_ttl=5, clock=clock)
    standby.restore(session.key, "admin", "admin", kept_until)
    standby.restore("gone", "user2", "driver", kept_until - 200)  # already over: ignored
    restored = standby.get(token)
    assert restored is not None and (restored.user_id, restored.role) == ("admin", "admin")
    assert len(standby) == 1
    clock.now += 29
    told.clear()
    clock.now += 2  # idle past 30 s in the first store: its end is told
    assert store.get(token) is None
    assert told == [(session.key, None)]
