"""The sealed channels at Central's edge: what comes in is opened and checked, what goes out
to engines and drivers is sealed with their keys (docs/security.md).

A driver's login and identity query travel in clear (it has no key yet); everything else a
driver sends, and everything an engine sends, must be sealed with the sender's own key, name
the sender as its principal and its owner, and not be a replay. A refusal raises `SealError`
and is audited, at most once per principal every `REJECTION_AUDIT_INTERVAL` seconds.
"""

from __future__ import annotations

import json
import time
from typing import Any

from EV_Central.audit import AuditLog
from EV_Central.keys import ChannelKey, KeyStore
from shared.bus import Topics
from shared.errors import MessageError
from shared.messages import (
    CP_EVENTS,
    DRIVER_REQUESTS,
    IdentityQuery,
    LoginRequest,
    decode,
)
from shared.sealing import Channel, Sealed, SealError, is_sealed, parse

# Driver updates that travel in clear: the answers a driver gets before it has a key.
CLEAR_DRIVER_UPDATES = (b'"type":"login_result"', b'"type":"central_identity"')
# Rejected sealed messages are audited at most once per principal in this many seconds.
REJECTION_AUDIT_INTERVAL = 10.0


class SealedGate:
    def __init__(self, keys: KeyStore, audit: AuditLog) -> None:
        self._keys = keys
        self._audit = audit
        self._rejections_audited: dict[str, float] = {}

    # --- coming in ---------------------------------------------------------------------------

    def open_driver_request(self, value: bytes, key: str, at: float | None = None) -> Any:
        """A driver's request under record key `key`, opened and checked; `at` is when the
        broker appended it, on Central's clock (now when not known)."""
        if not is_sealed(value):
            request = decode(DRIVER_REQUESTS, value)
            if not isinstance(request, LoginRequest | IdentityQuery):
                raise SealError(f"a {request.type} must be sealed with the driver's key")
            if request.driver_id != key:
                raise MessageError(f"key {key!r} does not match driver {request.driver_id!r}")
            return request
        request, envelope = self._open_sealed(value, key, "driver", "driver-request", at)
        if isinstance(request, LoginRequest | IdentityQuery):
            raise SealError(f"a {request.type} is not sent sealed")
        self._keys.accepted(envelope)
        return request

    def open_cp_event(self, value: bytes, key: str, at: float | None = None) -> Any:
        """An engine's event under record key `key`, opened and checked (`at`: as above)."""
        if not is_sealed(value):
            raise SealError("CP events must be sealed with the CP's key")
        event, envelope = self._open_sealed(value, key, "cp", "cp-event", at)
        self._keys.accepted(envelope)
        return event

    def _open_sealed(
        self, value: bytes, key: str, kind: str, channel: Channel, at: float | None
    ) -> tuple[Any, Sealed]:
        """The message in an envelope under record key `key`, authenticated (not yet accepted:
        the caller accepts it once its own checks pass)."""
        envelope = parse(value)
        if envelope.principal != key:
            raise SealError(f"key {key!r} does not match sealed principal {envelope.principal!r}")
        plaintext, channel_key = self._keys.open(envelope, kind, channel)
        message: Any = (
            decode(DRIVER_REQUESTS, plaintext) if kind == "driver" else decode(CP_EVENTS, plaintext)
        )
        now = time.time()
        _check_opened(envelope.id, envelope.principal, message, channel_key, at or now, now)
        return message, envelope

    async def rejected(self, topic: str, principal: str, why: str) -> None:
        """Audit a refused message (rate-limited per principal)."""
        now = time.monotonic()
        if now - self._rejections_audited.get(principal, -1e9) < REJECTION_AUDIT_INTERVAL:
            return
        if len(self._rejections_audited) > 10_000:
            self._rejections_audited.clear()
        self._rejections_audited[principal] = now
        await self._audit.record(
            "message_rejected", "refused", actor=principal[:32], source=topic, detail=why
        )

    # --- going out ---------------------------------------------------------------------------

    def seal_outgoing(self, topic: str, key: str, value: bytes) -> list[bytes]:
        """What Central publishes to engines and drivers goes sealed with their keys."""
        if topic == Topics.CP_COMMANDS:
            return self._keys.seal_for_cp(key, json.loads(value)["id"], value)
        if topic == Topics.DRIVER_UPDATES:
            if any(marker in value for marker in CLEAR_DRIVER_UPDATES):
                return [value]
            return self._keys.seal_for_driver(key, json.loads(value)["id"], value)
        return [value]


def _check_opened(
    envelope_id: str, principal: str, message: Any, key: ChannelKey, at: float, now: float
) -> None:
    """The sealed message must be the one the envelope names, from the key's owner, and its
    key still good when the broker took it (`at`: the sender's clock is not trusted)."""
    if message.id != envelope_id:
        raise SealError("the sealed message id differs from the envelope's")
    owner = getattr(message, "driver_id", None) if key.kind == "driver" else message.cp_id
    if owner != principal:
        raise SealError(f"a message of {owner!r} sealed with {principal!r}'s key")
    refusal = key.refusal(at, now)
    if refusal is not None:
        raise SealError(refusal)
