"""A driver's login at Central and the key it gets: seal requests, open updates, token files.

Pure (no I/O but the token file): the command line (app.py) and the driver dashboard both log
in through it. The login itself travels in clear on Kafka, but the password inside is encrypted
to Central's identity key and the key Central hands back is encrypted for the requester only
(see shared/sealing.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from shared.errors import MessageError
from shared.messages import (
    DRIVER_UPDATES,
    DriverUpdate,
    LoginRequest,
    LoginResult,
    Message,
    decode,
    encode,
    new_id,
)
from shared.sealing import (
    ReplayGuard,
    Sealer,
    SealError,
    b64,
    login_wrap,
    open_reply,
    open_sealed,
    parse,
    unb64,
)

log = logging.getLogger(__name__)

# A token file older than this margin before its key expires is not worth using.
EXPIRY_MARGIN_S = 60.0


class LoginRefused(Exception):
    """Central refused the login (or its answer could not be opened)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class DriverSession:
    """One login: the driver's key at Central, and the state to seal and open with it."""

    driver_id: str
    key_id: str
    key: bytes
    expires_at: float
    balance_eur: float | None = None
    sealer: Sealer = field(init=False, repr=False)
    replay: ReplayGuard = field(default_factory=lambda: ReplayGuard(max_streams=64), repr=False)

    def __post_init__(self) -> None:
        self.sealer = Sealer("driver-request", self.driver_id, self.key_id, self.key)

    @property
    def expired(self) -> bool:
        return time.time() > self.expires_at

    def seal(self, message: Message) -> bytes:
        return self.sealer.seal(message.id, encode(message))

    def open(self, value: bytes) -> DriverUpdate | None:
        """The update in a sealed record; None when it was sealed for another login."""
        envelope = parse(value)
        if envelope.key_id != self.key_id:
            return None
        if envelope.principal != self.driver_id or envelope.ch != "driver-update":
            raise SealError("an envelope for another driver or channel")
        self.replay.check(envelope)
        update = decode(DRIVER_UPDATES, open_sealed(envelope, self.key))
        if update.id != envelope.id:
            raise SealError("the sealed update does not match its envelope")
        self.replay.accept(envelope)
        return update

    # --- token files (the command line's "stay logged in") -----------------------------------

    def save(self, path: Path, central_key: str) -> None:
        """Write the session to a file only its owner can read."""
        data = {
            "driver_id": self.driver_id,
            "key_id": self.key_id,
            "key": b64(self.key),
            "expires_at": self.expires_at,
            "central_key": central_key,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, driver_id: str) -> tuple[DriverSession, str] | None:
        """A still valid session of `driver_id` from a token file, and Central's key; else None."""
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            if data["driver_id"] != driver_id:
                return None
            session = cls(
                driver_id=driver_id,
                key_id=str(data["key_id"]),
                key=unb64(str(data["key"]), "key"),
                expires_at=float(data["expires_at"]),
            )
            central_key = str(data.get("central_key", ""))
        except (OSError, ValueError, KeyError, TypeError, SealError):
            return None
        if session.expires_at - EXPIRY_MARGIN_S < time.time():
            return None
        return session, central_key


def login_key(path: Path) -> X25519PrivateKey:
    """This app's login key for a driver, kept in PATH (mode 0600), made on first use.

    Central slows down and blocks the *source* of failed logins, and over Kafka a source is
    the login key; sources that have never logged in to an account share a budget of
    failures. A key kept from one run to the next makes this app a source that logged in
    before, so a guesser who makes up a new key per guess cannot hold it back
    (docs/security.md, "Abuse"). A key that cannot be read is replaced; one that cannot be
    written is used for this run only (logged).
    """
    try:
        return X25519PrivateKey.from_private_bytes(unb64(path.read_text().strip(), "login key"))
    except FileNotFoundError:
        pass
    except (OSError, MessageError, ValueError) as exc:
        log.warning("the login key %s is unusable (%s): making a new one", path, exc)
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(b64(raw) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot keep the login key in %s (%s): a new one each run", path, exc)
    return key


@dataclass(frozen=True)
class PendingLogin:
    request: LoginRequest
    reply_key: bytes


def start_login(
    central_key: str, driver_id: str, password: str, client: X25519PrivateKey | None = None
) -> PendingLogin:
    """A login request for Central (encrypted to its key) and what opens its answer; `client`:
    the asker's login key, the same for all its logins (a new one when None)."""
    request_id = new_id()
    wrapped = login_wrap(central_key, driver_id, request_id, password, client)
    request = LoginRequest(
        id=request_id,
        driver_id=driver_id,
        client_key=wrapped.client_key,
        nonce=wrapped.nonce,
        sealed_password=wrapped.sealed_password,
    )
    return PendingLogin(request, wrapped.reply_key)


def finish_login(pending: PendingLogin, result: LoginResult) -> DriverSession:
    """Central's answer to `pending`: the session, or LoginRefused with the reason."""
    if not result.ok:
        raise LoginRefused(result.reason or "login refused", result.retry_after)
    if not (result.key_id and result.nonce and result.sealed and result.expires_at):
        raise LoginRefused("Central's answer carries no key")
    try:
        secret = json.loads(
            open_reply(
                pending.reply_key,
                pending.request.driver_id,
                pending.request.id,
                result.nonce,
                result.sealed,
            )
        )
        key = unb64(str(secret["key"]), "key")
        balance = secret.get("balance_eur")
    except (SealError, MessageError, ValueError, KeyError, TypeError) as exc:
        raise LoginRefused(f"Central's answer could not be opened: {exc}") from None
    return DriverSession(
        driver_id=pending.request.driver_id,
        key_id=result.key_id,
        key=key,
        # On this PC's clock: what Central gave, counted from when it answered (the two
        # clocks may disagree; a duration on one clock does not).
        expires_at=time.time() + (result.expires_at - result.ts),
        balance_eur=float(balance) if balance is not None else None,
    )
