"""Health samples on ev.cp.health, sealed: the monitor seals, the site dashboard opens.

A monitor seals each sample (a sealed envelope, shared/sealing.py, channel "cp-health") with a
key derived from its CP's secret (`health_key`); the site dashboard is given the secrets of its
site's CPs (`--cp-secrets`) and shows only the samples that open with the key of the CP they
name, each once: a sample published by anyone else, moved to another CP, altered or replayed
is refused and counted. docs/protocol.md ("ev.cp.health") and docs/security.md say why.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from shared.messages import CP_HEALTH, HealthSample, decode
from shared.sealing import ReplayGuard, Sealer, SealError, health_key, open_sealed, parse


class HealthSealer:
    """The monitor's side: a KafkaBus `outgoing` that seals what goes to ev.cp.health."""

    def __init__(self, cp_id: str, secret: str) -> None:
        key_id, key = health_key(cp_id, secret)
        self._sealer = Sealer("cp-health", cp_id, key_id, key)

    def outgoing(self, topic: str, key: str, value: bytes) -> list[bytes]:
        # The monitor publishes health samples only; the envelope's id is its own.
        return [self._sealer.seal(secrets.token_hex(8), value)]


class HealthOpener:
    """The site dashboard's side: the samples of the CPs whose secrets it was given."""

    def __init__(self, cp_secrets: Mapping[str, str]) -> None:
        self._keys = {cp_id: health_key(cp_id, secret) for cp_id, secret in cp_secrets.items()}
        self._replays = ReplayGuard(max_streams=10_000)

    @property
    def cps(self) -> frozenset[str]:
        return frozenset(self._keys)

    def open(self, value: bytes) -> HealthSample:
        """The sample in a record of ev.cp.health; SealError when it is not to be trusted."""
        envelope = parse(value)
        if envelope.ch != "cp-health":
            raise SealError(f"a {envelope.ch} envelope on the health topic")
        known = self._keys.get(envelope.principal)
        if known is None:
            raise SealError(f"a sample of {envelope.principal}, whose secret is not given here")
        key_id, key = known
        if envelope.key_id != key_id:
            raise SealError(f"a sample of {envelope.principal} under another key (old secret?)")
        self._replays.check(envelope)
        sample = decode(CP_HEALTH, open_sealed(envelope, key))
        if sample.cp_id != envelope.principal:
            raise SealError(f"a sample of {sample.cp_id} sealed as {envelope.principal}'s")
        self._replays.accept(envelope)
        return sample
