"""The keys of the sealed Kafka channels, kept in memory with the database as the record.

Each CP has one current key, issued when its monitor authenticates; the previous one is retired
then (it still opens messages the engine sealed before the rotation, e.g. while Central was away)
and a revoked key opens nothing at all. Each driver login gets a key of its own that expires.
Central also has an identity key pair (X25519) with which drivers encrypt their login.

"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from EV_Central.store import Store, StoreTx
from shared.sealing import (
    Channel,
    ReplayGuard,
    Sealed,
    Sealer,
    SealError,
    identity_public,
    load_identity,
    new_identity,
    new_key,
    new_key_id,
    open_sealed,
)

log = logging.getLogger(__name__)

# A rotated key still opens what reached the broker up to this long after its rotation: what
# the engine sealed just before, and its producer was still sending (a retry takes up to 10 s).
ROTATION_GRACE_S = 30.0
# A driver may be logged in from this many places at once; the oldest login ends first.
MAX_DRIVER_KEYS = 5
# Retired CP keys older than this are not loaded at start-up any more.
RETIRED_KEPT_S = 7 * 24 * 3600.0


@dataclass
class ChannelKey:
    key_id: str
    kind: str  # "cp" or "driver"
    principal: str
    key: bytes
    issued_at: float
    expires_at: float | None = None
    retired_at: float | None = None
    revoked_at: float | None = None
    sealer: Sealer | None = field(default=None, repr=False)

    def refusal(self, sent_at: float, now: float) -> str | None:
        """Why a message with this key that reached the broker at `sent_at` (Central's clock)
        is refused now, or None."""
        if self.revoked_at is not None:
            return "key revoked"
        if self.expires_at is not None and now > self.expires_at:
            return "key expired"
        if self.retired_at is not None and sent_at > self.retired_at + ROTATION_GRACE_S:
            return "key replaced by a newer one"
        return None


class KeyStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.by_id: dict[str, ChannelKey] = {}
        self.current_cp: dict[str, ChannelKey] = {}
        self.drivers: dict[str, list[ChannelKey]] = {}
        self.replay = ReplayGuard()
        self.identity: X25519PrivateKey | None = None
        self.identity_public = ""

    # --- start-up -------------------------------------------------------------------------

    async def load(self) -> None:
        now = time.time()
        for row in await self.store.live_keys(now, now - RETIRED_KEPT_S):
            self._remember(
                ChannelKey(
                    key_id=row["key_id"],
                    kind=row["kind"],
                    principal=row["principal"],
                    key=bytes(row["key"]),
                    issued_at=row["issued_at"],
                    expires_at=row["expires_at"],
                    retired_at=row["retired_at"],
                )
            )
        for row in await self.store.replay_guard():
            if row["key_id"] in self.by_id:
                self.replay.last[(row["key_id"], row["stream"])] = int(row["last_seq"])
        stored = await self.store.meta("identity_key")
        if stored:
            self.identity = load_identity(bytes.fromhex(stored))
        else:
            self.identity, raw = new_identity()
            async with self.store.transaction() as tx:
                await tx.set_meta("identity_key", raw.hex())
        self.identity_public = identity_public(self.identity)

    def _remember(self, key: ChannelKey) -> None:
        self.by_id[key.key_id] = key
        if key.kind == "cp":
            if key.retired_at is None:
                self.current_cp[key.principal] = key
        else:
            self.drivers.setdefault(key.principal, []).append(key)

    # --- issue, rotate, revoke ---------------------------------------------------------------

    async def issue_cp_key(self, tx: StoreTx, cp_id: str) -> ChannelKey:
        """A fresh key for a CP; its previous one is retired (rotation)."""
        now = time.time()
        previous = self.current_cp.get(cp_id)
        if previous is not None:
            await tx.retire_key(previous.key_id, now)
        key = ChannelKey(new_key_id(), "cp", cp_id, new_key(), now)
        await self._insert(tx, key)
        # Memory follows the transaction's commit (the caller's `async with` ends right after).
        if previous is not None:
            previous.retired_at = now
        self._remember(key)
        return key

    async def revoke_principal(self, tx: StoreTx, kind: str, principal: str) -> list[str]:
        """Revoke every key of a CP or a driver; returns the key ids."""
        now = time.time()
        keys = [k for k in self.by_id.values() if k.kind == kind and k.principal == principal]
        await tx.revoke_keys_of(kind, principal, now)
        for key in keys:
            key.revoked_at = now
            self._forget(key)
        return [k.key_id for k in keys]

    async def issue_driver_key(self, tx: StoreTx, driver_id: str, ttl: float) -> ChannelKey:
        now = time.time()
        live = [k for k in self.drivers.get(driver_id, []) if k.refusal(now, now) is None]
        while len(live) >= MAX_DRIVER_KEYS:
            oldest = live.pop(0)
            await tx.revoke_key(oldest.key_id, now)
            oldest.revoked_at = now
            self._forget(oldest)
        key = ChannelKey(new_key_id(), "driver", driver_id, new_key(), now, expires_at=now + ttl)
        await self._insert(tx, key)
        self._remember(key)
        return key

    async def _insert(self, tx: StoreTx, key: ChannelKey) -> None:
        await tx.insert_key(
            key.key_id, key.kind, key.principal, key.key, key.issued_at, key.expires_at
        )

    def _forget(self, key: ChannelKey) -> None:
        self.by_id.pop(key.key_id, None)
        if self.current_cp.get(key.principal) is key:
            del self.current_cp[key.principal]
        if key.kind == "driver":
            remaining = [k for k in self.drivers.get(key.principal, []) if k is not key]
            if remaining:
                self.drivers[key.principal] = remaining
            else:
                self.drivers.pop(key.principal, None)
        self.replay.forget_key(key.key_id)

    # --- opening and sealing ------------------------------------------------------------------

    def open(self, envelope: Sealed, kind: str, channel: Channel) -> tuple[bytes, ChannelKey]:
        """Authenticate and decrypt an envelope; SealError with the reason when refused.

        The replay check happens here too; the caller calls `accepted` once it has handled it.
        """
        if envelope.ch != channel:
            raise SealError(f"envelope for channel {envelope.ch} on {channel}")
        key = self.by_id.get(envelope.key_id)
        if key is None or key.kind != kind:
            raise SealError(f"unknown or revoked key {envelope.key_id}")
        if key.principal != envelope.principal:
            raise SealError(f"key {envelope.key_id} does not belong to {envelope.principal}")
        self.replay.check(envelope)
        return open_sealed(envelope, key.key), key

    def accepted(self, envelope: Sealed) -> None:
        self.replay.accept(envelope)

    def seal_for_cp(self, cp_id: str, message_id: str, plaintext: bytes) -> list[bytes]:
        key = self.current_cp.get(cp_id)
        if key is None:
            return []  # no monitor ever authenticated: no engine could read it anyway
        return [self._sealer(key, "cp-command").seal(message_id, plaintext)]

    def seal_for_driver(self, driver_id: str, message_id: str, plaintext: bytes) -> list[bytes]:
        """One copy per live login of the driver (none when it is logged in nowhere)."""
        now = time.time()
        return [
            self._sealer(key, "driver-update").seal(message_id, plaintext)
            for key in self.drivers.get(driver_id, [])
            if key.refusal(now, now) is None
        ]

    @staticmethod
    def _sealer(key: ChannelKey, channel: Channel) -> Sealer:
        if key.sealer is None:
            key.sealer = Sealer(channel, key.principal, key.key_id, key.key)
        return key.sealer

    def sweep(self, now: float) -> None:
        """Forget expired driver keys from memory (the database keeps the record)."""
        for key in [
            k for k in self.by_id.values() if k.expires_at is not None and k.expires_at < now
        ]:
            self._forget(key)

    async def save_replay_guard(self, now: float) -> None:
        """Persist the replay guard's progress and forget expired keys.

        What a crash loses is at most the progress since the last save; the messages it covers
        were handled already and are idempotent (state-changing ids are recorded, telemetry
        carries its own sequence), so a replay of them changes nothing.
        """
        rows = [
            (key_id, stream, self.replay.last[(key_id, stream)])
            for key_id, stream in self.replay.dirty
            if (key_id, stream) in self.replay.last
        ]
        self.replay.dirty.clear()
        self.sweep(now)
        if rows:
            async with self.store.transaction() as tx:
                await tx.save_replay_guard(rows)
