"""Sealed envelopes: the Kafka messages between Central and each engine or driver.

Every message on a sealed channel travels encrypted and authenticated with AES-GCM under a key
of its own principal (one CP, or one driver's login). The associated data binds the channel,
the principal (CP id or driver id), the key id, the sender's stream, its sequence number and the
message id, so a message cannot be moved to another CP, another key or another position.

A sender seals with a `Sealer`: a random stream id (chosen when the sealer is made) and a counter
that only grows. A receiver opens with the key named in the envelope and asks a `ReplayGuard`
whether that (key, stream) has already passed this sequence number: a replayed or reordered
copy is refused.

The driver's login (before it has a key) uses `login_wrap`/`login_unwrap`: an X25519 exchange with
Central's identity key, so the password and the key Central hands back are never readable on Kafka.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from shared.errors import MessageError

KEY_BYTES = 32
NONCE_BYTES = 12
MAX_SEALED_BYTES = 96 * 1024

Channel = Literal["cp-event", "cp-command", "driver-request", "driver-update", "cp-health"]
Principal = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
KeyId = Annotated[str, Field(min_length=8, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]
Stream = Annotated[str, Field(min_length=16, max_length=16, pattern=r"^[0-9a-f]+$")]
B64 = Annotated[str, Field(max_length=MAX_SEALED_BYTES * 4 // 3 + 8)]


class SealError(MessageError):
    """A sealed message that cannot be accepted (unknown key, forged, replayed, stale)."""


class Sealed(BaseModel):
    """The envelope on the wire; `ct` holds the encrypted message (with its GCM tag)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["sealed"] = "sealed"
    v: Literal[1] = 1
    ch: Channel
    principal: Principal
    key_id: KeyId
    stream: Stream
    seq: Annotated[int, Field(ge=0, lt=2**53)]
    id: Annotated[str, Field(min_length=1, max_length=64)]
    nonce: Annotated[str, Field(min_length=16, max_length=16)]
    ct: B64


SEALED: TypeAdapter[Sealed] = TypeAdapter(Sealed)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise SealError(f"{what} is not valid base64") from None


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def new_key_id() -> str:
    return secrets.token_hex(8)


def is_sealed(data: bytes) -> bool:
    """A cheap look before parsing: does this payload claim to be an envelope?"""
    return b'"type":"sealed"' in data[:40]


def _aad(envelope: Sealed) -> bytes:
    return "|".join(
        (
            "ev1",
            envelope.ch,
            envelope.principal,
            envelope.key_id,
            envelope.stream,
            str(envelope.seq),
            envelope.id,
        )
    ).encode()


def parse(data: bytes) -> Sealed:
    """The envelope of a payload, not yet opened; SealError when it is not one."""
    if len(data) > MAX_SEALED_BYTES:
        raise SealError(f"sealed message of {len(data)} bytes exceeds {MAX_SEALED_BYTES}")
    try:
        return SEALED.validate_json(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise SealError(f"not a valid sealed envelope at {where}: {first['msg']}") from None


def open_sealed(envelope: Sealed, key: bytes) -> bytes:
    """Decrypt and authenticate; SealError when the key, the data or the binding is wrong."""
    nonce = unb64(envelope.nonce, "nonce")
    ciphertext = unb64(envelope.ct, "ciphertext")
    if len(nonce) != NONCE_BYTES:
        raise SealError("bad nonce length")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, _aad(envelope))
    except InvalidTag:
        raise SealError("authentication failed (wrong key or altered message)") from None


@dataclass
class Sealer:
    """Seals the messages one sender sends under one key: its stream and growing counter."""

    channel: Channel
    principal: str
    key_id: str
    key: bytes
    stream: str = field(default_factory=lambda: secrets.token_hex(8))
    seq: int = 0

    def seal(self, message_id: str, plaintext: bytes) -> bytes:
        self.seq += 1
        nonce = os.urandom(NONCE_BYTES)
        envelope = Sealed(
            ch=self.channel,
            principal=self.principal,
            key_id=self.key_id,
            stream=self.stream,
            seq=self.seq,
            id=message_id,
            nonce=b64(nonce),
            ct="",
        )
        ciphertext = AESGCM(self.key).encrypt(nonce, plaintext, _aad(envelope))
        return envelope.model_copy(update={"ct": b64(ciphertext)}).model_dump_json().encode()


class ReplayGuard:
    """The highest sequence number accepted per (key, stream): anything not above it is a replay."""

    def __init__(self, max_streams: int = 100_000) -> None:
        self.last: dict[tuple[str, str], int] = {}
        self.max_streams = max_streams
        self.dirty: set[tuple[str, str]] = set()

    def check(self, envelope: Sealed) -> None:
        """Raise SealError when this envelope's position was already passed (no change then)."""
        last = self.last.get((envelope.key_id, envelope.stream), 0)
        if envelope.seq <= last:
            raise SealError(f"replayed message (sequence {envelope.seq}, already at {last})")

    def accept(self, envelope: Sealed) -> None:
        """Record an envelope that was opened and handled."""
        where = (envelope.key_id, envelope.stream)
        if where not in self.last and len(self.last) >= self.max_streams:
            self.last.pop(next(iter(self.last)))  # the oldest stream goes first
        self.last[where] = max(envelope.seq, self.last.get(where, 0))
        self.dirty.add(where)

    def forget_key(self, key_id: str) -> None:
        for where in [w for w in self.last if w[0] == key_id]:
            del self.last[where]


# --- a monitor's health samples: sealed with a key of its CP's secret ---------------------


def health_key(cp_id: str, secret: str) -> tuple[str, bytes]:
    """The id and the key a CP's monitor seals its health samples with (`ch` "cp-health").

    Derived from the CP's secret, so that the site dashboard, given the secrets of its site's
    CPs, checks them without any key from Central; knowing it does not give the secret."""
    root = hashlib.sha256(b"ev-health|" + secret.encode()).digest()
    key = hmac.new(root, b"ev-health|" + cp_id.encode(), hashlib.sha256).digest()
    return hashlib.sha256(b"ev-health-id|" + key).hexdigest()[:16], key


# --- the monitor's hello to its engine: proof that it knows the CP's secret ---------------
# The engine opens each connection with a fresh challenge (EngineChallenge) and the proof
# covers it: a recorded hello is refused on any later connection, whatever the clocks say.


def new_challenge() -> str:
    return secrets.token_hex(16)


def hello_proof(secret: str, cp_id: str, message_id: str, challenge: str) -> str:
    """HMAC-SHA256 of the hello's CP id, id and the engine's challenge, keyed with (a hash of)
    the CP's secret."""
    key = hashlib.sha256(b"ev-link|" + secret.encode()).digest()
    data = f"ev-link|{cp_id}|{message_id}|{challenge}".encode()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def check_hello_proof(
    secret: str, cp_id: str, message_id: str, challenge: str, proof: str | None
) -> str | None:
    """Why a hello is refused (no proof, or not for this secret and challenge), or None."""
    if not proof:
        return "no proof of the CP's secret"
    expected = hello_proof(secret, cp_id, message_id, challenge)
    if not hmac.compare_digest(expected, proof):
        return "wrong proof of the CP's secret (or of another connection's challenge)"
    return None


# --- the driver's login: X25519 with Central's identity key --------------------------------


def identity_public(private: X25519PrivateKey) -> str:
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return b64(raw)


def load_identity(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def new_identity() -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return private, raw


def fingerprint(public_b64: str) -> str:
    """A short, readable digest of a public key, for pinning and for people to compare."""
    digest = hashlib.sha256(unb64(public_b64, "public key")).hexdigest()
    return ":".join(digest[i : i + 4] for i in range(0, 32, 4))


def _login_key(shared: bytes, driver_id: str, request_id: str, client_public: bytes) -> bytes:
    info = b"ev-login|" + driver_id.encode() + b"|" + request_id.encode() + b"|" + client_public
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


@dataclass(frozen=True)
class LoginWrap:
    client_key: str  # the driver's ephemeral public key (base64)
    nonce: str
    sealed_password: str
    reply_key: bytes  # kept by the driver to open Central's answer


def login_wrap(
    central_public_b64: str,
    driver_id: str,
    request_id: str,
    password: str,
    client: X25519PrivateKey | None = None,
) -> LoginWrap:
    """Encrypt a password so that only Central (the identity key's holder) can read it.

    `client` is the asker's key, kept across its logins so that Central can hold failures
    against that asker alone (EV_Central/auth.py); a new one is made when None. Every login
    still gets keys of its own: the request id goes into their derivation."""
    try:
        central = X25519PublicKey.from_public_bytes(unb64(central_public_b64, "Central's key"))
    except ValueError:
        raise SealError("Central's public key is not a valid X25519 key") from None
    ephemeral = client if client is not None else X25519PrivateKey.generate()
    client_public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key = _login_key(ephemeral.exchange(central), driver_id, request_id, client_public)
    nonce = os.urandom(NONCE_BYTES)
    aad = f"ev-login|{driver_id}|{request_id}".encode()
    sealed = AESGCM(key).encrypt(nonce, password.encode(), aad)
    return LoginWrap(b64(client_public), b64(nonce), b64(sealed), key)


def login_unwrap(
    identity: X25519PrivateKey,
    driver_id: str,
    request_id: str,
    client_key: str,
    nonce: str,
    sealed_password: str,
) -> tuple[str, bytes]:
    """Central's side: the password and the key to seal the answer with."""
    client_public = unb64(client_key, "client key")
    try:
        shared = identity.exchange(X25519PublicKey.from_public_bytes(client_public))
    except ValueError:
        raise SealError("the client key is not a valid X25519 key") from None
    key = _login_key(shared, driver_id, request_id, client_public)
    aad = f"ev-login|{driver_id}|{request_id}".encode()
    try:
        password = AESGCM(key).decrypt(
            unb64(nonce, "nonce"), unb64(sealed_password, "password"), aad
        )
    except (InvalidTag, ValueError):
        raise SealError("the login could not be opened (wrong Central key or altered)") from None
    try:
        return password.decode("utf-8"), key
    except UnicodeDecodeError:
        raise SealError("the password is not valid UTF-8") from None


def seal_reply(key: bytes, driver_id: str, request_id: str, payload: bytes) -> tuple[str, str]:
    nonce = os.urandom(NONCE_BYTES)
    aad = f"ev-login-reply|{driver_id}|{request_id}".encode()
    return b64(nonce), b64(AESGCM(key).encrypt(nonce, payload, aad))


def open_reply(key: bytes, driver_id: str, request_id: str, nonce: str, sealed: str) -> bytes:
    aad = f"ev-login-reply|{driver_id}|{request_id}".encode()
    try:
        return AESGCM(key).decrypt(unb64(nonce, "nonce"), unb64(sealed, "reply"), aad)
    except (InvalidTag, ValueError):
        raise SealError("Central's answer could not be opened") from None
