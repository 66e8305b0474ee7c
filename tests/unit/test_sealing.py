"""Sealed envelopes: what opens, what never does (forged, moved, altered, replayed)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.messages import CPTelemetry, encode
from shared.sealing import (
    ReplayGuard,
    Sealer,
    SealError,
    check_hello_proof,
    fingerprint,
    hello_proof,
    identity_public,
    login_unwrap,
    login_wrap,
    new_challenge,
    new_identity,
    new_key,
    open_reply,
    open_sealed,
    parse,
    seal_reply,
)

KEY = new_key()
OTHER_KEY = new_key()


def telemetry(cp_id: str = "CP001") -> CPTelemetry:
    return CPTelemetry(cp_id=cp_id, session_id="s1", seq=1, kw=22, kwh=0.5, amount_eur=0.18)


def sealed(message: CPTelemetry, key: bytes = KEY, principal: str = "CP001") -> bytes:
    return Sealer("cp-event", principal, "key0000001", key).seal(message.id, encode(message))


def test_a_sealed_message_opens_with_its_key_only() -> None:
    message = telemetry()
    envelope = parse(sealed(message))
    assert open_sealed(envelope, KEY) == encode(message)
    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(envelope, OTHER_KEY)


def test_the_envelope_hides_the_message() -> None:
    data = sealed(telemetry())
    assert b"session_id" not in data and b"0.18" not in data


@pytest.mark.parametrize(
    "field, value",
    [
        ("principal", "CP002"),  # moved to another CP
        ("key_id", "key0000002"),  # claimed under another key
        ("seq", 99),  # moved to another position
        ("id", "another-id"),
        ("ch", "cp-command"),  # sent back the other way
        ("stream", "0" * 16),
    ],
)
def test_every_bound_field_is_authenticated(field: str, value: object) -> None:
    envelope = json.loads(sealed(telemetry()))
    envelope[field] = value
    with pytest.raises(SealError):
        open_sealed(parse(json.dumps(envelope).encode()), KEY)


@settings(max_examples=150, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_altered_byte_is_refused(position: int, flip: int) -> None:
    message = telemetry()
    data = bytearray(sealed(message))
    data[position % len(data)] ^= flip
    try:
        envelope = parse(bytes(data))
    except SealError:
        return  # no longer an envelope at all
    try:
        plaintext = open_sealed(envelope, KEY)
    except SealError:
        return
    # Only a change that decodes to the same bytes (a base64 character's unused low bits)
    # may still open, and then it is exactly the original message.
    assert plaintext == encode(message)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_are_never_an_envelope_that_opens(data: bytes) -> None:
    with pytest.raises(SealError):
        open_sealed(parse(data), KEY)


def test_the_replay_guard_refuses_a_position_already_passed() -> None:
    sealer = Sealer("cp-event", "CP001", "key0000001", KEY)
    first = parse(sealer.seal("a", b"{}"))
    second = parse(sealer.seal("b", b"{}"))
    guard = ReplayGuard()
    guard.check(first)
    guard.accept(first)
    guard.check(second)
    guard.accept(second)
    with pytest.raises(SealError, match="replayed"):
        guard.check(first)
    with pytest.raises(SealError, match="replayed"):
        guard.check(second)
    # A new stream (a restarted sender) starts afresh; its positions are its own.
    restarted = parse(Sealer("cp-event", "CP001", "key0000001", KEY).seal("c", b"{}"))
    guard.check(restarted)


def test_a_login_is_readable_by_central_only() -> None:
    identity, _ = new_identity()
    public = identity_public(identity)
    wrap = login_wrap(public, "user1", "req1", "pass1")
    assert "pass1" not in wrap.sealed_password
    password, key = login_unwrap(
        identity, "user1", "req1", wrap.client_key, wrap.nonce, wrap.sealed_password
    )
    assert password == "pass1" and key == wrap.reply_key
    impostor, _ = new_identity()
    with pytest.raises(SealError):
        login_unwrap(impostor, "user1", "req1", wrap.client_key, wrap.nonce, wrap.sealed_password)
    # Bound to the driver and the request: it cannot be replayed as someone else's login.
    with pytest.raises(SealError):
        login_unwrap(identity, "user2", "req1", wrap.client_key, wrap.nonce, wrap.sealed_password)
    nonce, reply = seal_reply(key, "user1", "req1", b'{"key": "k"}')
    assert open_reply(wrap.reply_key, "user1", "req1", nonce, reply) == b'{"key": "k"}'
    with pytest.raises(SealError):
        open_reply(wrap.reply_key, "user1", "req2", nonce, reply)
    assert len(fingerprint(public).split(":")) == 8


def test_a_hello_proves_the_secret_over_the_engines_challenge() -> None:
    challenge = new_challenge()
    proof = hello_proof("s3cret", "CP001", "h1", challenge)
    assert check_hello_proof("s3cret", "CP001", "h1", challenge, proof) is None
    assert "wrong proof" in (check_hello_proof("other", "CP001", "h1", challenge, proof) or "")
    assert check_hello_proof("s3cret", "CP002", "h1", challenge, proof) is not None  # moved
    assert check_hello_proof("s3cret", "CP001", "h2", challenge, proof) is not None
    assert check_hello_proof("s3cret", "CP001", "h1", challenge, None) is not None
    # Recorded and replayed on a later connection, which has a challenge of its own.
    assert check_hello_proof("s3cret", "CP001", "h1", new_challenge(), proof) is not None
    assert new_challenge() != new_challenge()
