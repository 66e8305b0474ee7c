"""Central's side of each charging point's link: who it is, whether its monitor and engine are
alive, and whether it is in service.

The monitor server (EV_Central/monitor_server.py) reports connections, heartbeats, faults and
losses here; the admin panel, `ctl` and the console register CPs, stop and resume them, and
revoke or reset their credentials. Whatever ends a supply goes through `Supplies.end`.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from EV_Central.audit import AuditLog
from EV_Central.context import Context, Part
from EV_Central.kafka_logins import CpKafkaLogins, KafkaLoginError
from EV_Central.keys import ChannelKey, KeyStore
from EV_Central.passwords import hash_secret, new_secret, verify_secret
from EV_Central.registry import ChargingPoint
from EV_Central.store import RegisteredCP, StoreTx
from EV_Central.supplies import Supplies
from EV_Central.weather import resume_refusal
from shared.bus import Topics
from shared.messages import EndReason, SetService

log = logging.getLogger(__name__)


class MonitorLink(Protocol):
    """An authenticated monitor connection, as the monitor server keeps it."""

    async def close(self) -> None: ...

    async def removed(self, reason: str) -> None: ...


class CPLinks(Part):
    def __init__(
        self,
        context: Context,
        keys: KeyStore,
        audit: AuditLog,
        supplies: Supplies,
        *,
        heartbeat_timeout: float,
        kafka_logins: CpKafkaLogins | None = None,
    ) -> None:
        super().__init__(context)
        self._keys = keys
        self._audit = audit
        self._supplies = supplies
        # The CPs' engines' logins on a secured Kafka (EV_Central/kafka_logins.py).
        self._kafka_logins = kafka_logins or CpKafkaLogins("", None)
        self._heartbeat_timeout = heartbeat_timeout
        self._links: dict[str, MonitorLink] = {}  # the current monitor link of each CP
        self._counters = context.stats.counters  # at hand: every heartbeat counts itself

    async def load(self) -> int:
        """Every registered CP, DESCONECTADO until its monitor authenticates."""
        for row in await self._store.registered_cps():
            self._registry.add(
                ChargingPoint(
                    id=row.id,
                    location=row.location,
                    price_eur_kwh=row.price_eur_kwh,
                    max_kw=row.max_kw,
                    in_service=row.in_service,
                )
            )
        return len(self._registry.cps)

    def cp(self, cp_id: str) -> ChargingPoint | None:
        return self._registry.get(cp_id)

    def link_of(self, cp_id: str) -> MonitorLink | None:
        return self._links.get(cp_id)

    # --- the monitor's link --------------------------------------------------------------------

    async def authenticate(self, cp_id: str, secret: str, source: str) -> ChannelKey | str:
        """Check a monitor's credentials; on success issue the CP's fresh key (rotation).

        A failure only says why: the monitor port audits failures (`audit_failed`), a flood
        of them as summaries."""
        cp = self._registry.get(cp_id)
        stored = await self._store.secret_hash(cp_id)
        if cp is None or not verify_secret(secret, stored):
            return "unknown CP or wrong secret" if stored or cp is None else "CP has no secret"
        async with self._store.transaction() as tx:
            key = await self._keys.issue_cp_key(tx, cp_id)
        await self._audit.record("cp_auth", "ok", actor=cp_id, source=source)
        await self._audit.record("key_issued", "ok", actor=cp_id, source=source, detail=key.key_id)
        return key

    async def audit_failed(self, cp_id: str, source: str, why: str) -> None:
        """A monitor failed to authenticate as `cp_id` from `source`."""
        await self._audit.record("cp_auth", "failed", actor=cp_id, source=source, detail=why)

    async def audit_failures(self, source: str, count: int, window: float) -> None:
        """One audit row for failed authentications from `source` that had no row each."""
        await self._audit.record(
            "cp_auth",
            "failed",
            source=source,
            detail=f"{count} more failed authentications in {window:g} s (summarised)",
        )

    async def audit_block(self, source: str, failures: int, blocked_for: float) -> None:
        """An address that keeps failing is refused for a while: say so in the audit log."""
        await self._audit.record(
            "throttle",
            "blocked",
            source=source,
            detail=f"{failures} failed CP authentications: connections refused for "
            f"{blocked_for:g} s",
        )

    async def connected(self, cp: ChargingPoint, link: MonitorLink) -> None:
        """A monitor authenticated (a previous link of the CP's is closed first)."""
        previous = self._links.get(cp.id)
        self._links[cp.id] = link
        if previous is not None and previous is not link:
            await previous.close()  # a monitor that reconnects replaces its stale connection
        cp.connected = True
        cp.last_heartbeat = time.time()
        self._feed.changed(cp)
        self._feed.note("connected", f"{cp.id}: monitor authenticated", cp.id)
        if not cp.serving:
            # A restarted engine reads commands from the end: tell it again that it is stopped.
            await self._bus.post(
                Topics.CP_COMMANDS, cp.id, SetService(cp_id=cp.id, in_service=False)
            )

    def is_current(self, cp: ChargingPoint, link: MonitorLink) -> bool:
        return self._links.get(cp.id) is link

    async def lost(self, cp: ChargingPoint, why: str, link: MonitorLink | None = None) -> None:
        """The monitor's link ended (or went silent): DESCONECTADO."""
        if link is not None and not self.is_current(cp, link):
            return  # a stale connection that another monitor login replaced
        self._links.pop(cp.id, None)
        if not cp.connected:
            return
        cp.connected = False
        self._feed.changed(cp)
        self._feed.note("disconnected", f"{cp.id}: DESCONECTADO ({why})", cp.id)
        await self._supplies.end(cp, EndReason.MONITOR_LOST)

    def heartbeat_fast(
        self, cp: ChargingPoint, engine_ok: bool, link: MonitorLink, speed: float = 1.0
    ) -> bool:
        """The common heartbeat, handled without awaiting: True when nothing else changes."""
        if cp.engine_ok != engine_ok or cp.speed != speed or self._links.get(cp.id) is not link:
            return False  # a health or time-scale change, reconnection or stale link: full path
        cp.last_heartbeat = time.time()
        self._counters["heartbeat"] += 1
        return True

    async def heartbeat(
        self, cp: ChargingPoint, engine_ok: bool, link: MonitorLink, speed: float = 1.0
    ) -> None:
        current = self._links.get(cp.id)
        if current is None:
            # Heartbeats resumed on a connection that had gone silent: connected again.
            await self.connected(cp, link)
        elif current is not link:
            return  # a stale connection that another monitor login replaced
        cp.last_heartbeat = time.time()
        self._stats.counters["heartbeat"] += 1
        if cp.speed != speed:
            cp.speed = speed
            self._feed.changed(cp)
        if cp.engine_ok != engine_ok:
            await self.engine_health(cp, engine_ok, "")

    async def engine_health(self, cp: ChargingPoint, ok: bool, detail: str) -> None:
        if cp.engine_ok == ok:
            return
        cp.engine_ok = ok
        self._feed.changed(cp)
        if ok:
            self._feed.note("recovered", f"{cp.id}: engine recovered", cp.id)
            return
        self._feed.note("fault", f"{cp.id}: AVERIADO ({detail or 'engine KO'})", cp.id)
        await self._supplies.end(cp, EndReason.ENGINE_FAULT)

    async def check_heartbeats(self, now: float) -> None:
        """Connected CPs silent for longer than the heartbeat timeout are DESCONECTADO."""
        for cp in self._registry.stale(now, self._heartbeat_timeout):
            await self.lost(cp, f"no heartbeat for {self._heartbeat_timeout:g} s")

    # --- administration --------------------------------------------------------------------------

    async def set_service(self, target: str, in_service: bool) -> list[str]:
        """Stop (PARADO) or resume one CP or all; returns the CP ids affected.

        Resuming a CP that frost holds is refused (ValueError, with the reason); `resume all`
        leaves such CPs as they are (EV_Central/weather.py).
        """
        if target.lower() == "all":
            cps = self._registry.sorted()
            if in_service:
                cps = [cp for cp in cps if resume_refusal(cp.id, cp.weather_hold) is None]
        else:
            cp = self._registry.get(target)
            if cp is None:
                raise LookupError(f"unknown CP {target!r}")
            refusal = resume_refusal(cp.id, cp.weather_hold) if in_service else None
            if refusal is not None:
                raise ValueError(refusal)
            cps = [cp]
        async with self._store.transaction() as tx:
            await tx.set_in_service([cp.id for cp in cps], in_service)
        for cp in cps:
            cp.in_service = in_service
            self._feed.changed(cp)
            await self._bus.post(
                Topics.CP_COMMANDS, cp.id, SetService(cp_id=cp.id, in_service=cp.serving)
            )
            if not in_service:
                await self._supplies.end(cp, EndReason.STOPPED_BY_ADMIN)
        verb = "resumed" if in_service else "stopped"
        self._feed.note(
            verb, f"{verb} {', '.join(c.id for c in cps) if len(cps) < 4 else 'all CPs'}"
        )
        return [cp.id for cp in cps]

    async def register(
        self, cp_id: str, location: str, price_eur_kwh: float, max_kw: float
    ) -> tuple[ChargingPoint, str, tuple[str, str] | None]:
        """Register a new CP and issue its secret (returned once, stored only as a hash), and
        on a secured Kafka its engine's login (user, password: returned once, kept by Kafka).

        The CP shows DESCONECTADO until its monitor authenticates with that secret. When Kafka
        does not make the login, nothing is registered (ValueError).
        """
        if self._registry.get(cp_id) is not None:
            raise ValueError(f"CP {cp_id} is already registered")
        try:
            kafka = await self._kafka_logins.issue(cp_id)
        except KafkaLoginError as exc:
            raise ValueError(str(exc)) from None
        secret = new_secret()
        try:
            async with self._store.transaction() as tx:
                await tx.insert_cp(
                    RegisteredCP(cp_id, location, price_eur_kwh, max_kw, in_service=True),
                    hash_secret(secret),
                    time.time(),
                )
        except BaseException:
            await self._kafka_logins.withdraw(cp_id)
            raise
        cp = ChargingPoint(id=cp_id, location=location, price_eur_kwh=price_eur_kwh, max_kw=max_kw)
        self._registry.add(cp)
        self._feed.changed(cp)
        self._feed.note("registered", f"{cp_id}: registered at {location}", cp_id)
        return cp, secret, kafka

    async def revoke_key(self, cp_id: str) -> None:
        """Revoke a CP's keys: it is out of service until its monitor authenticates again."""
        self._known(cp_id)
        async with self._store.transaction() as tx:
            revoked = await self._keys.revoke_principal(tx, "cp", cp_id)
        # The admin interface audits the command, with who gave it.
        self._feed.note(
            "revoked", f"{cp_id}: key revoked ({', '.join(revoked) or 'none live'})", cp_id
        )
        await self._disconnect(cp_id)

    async def reset_secret(self, cp_id: str) -> str:
        """Issue a CP a new secret (returned once); the old one and its keys stop working."""
        self._known(cp_id)
        async with self._store.transaction() as tx:
            secret = await self._replace_secret(tx, cp_id)
        self._feed.note("secret", f"{cp_id}: new secret issued, keys revoked", cp_id)
        await self._disconnect(cp_id)
        return secret

    async def redeem_enrolment(self, cp_id: str, token_hash: str) -> str | None:
        """A new secret for the CP in exchange for its enrolment token (used up in the same
        transaction), as `reset_secret`; None when the CP or a valid token is not there."""
        if self._registry.get(cp_id) is None:
            return None
        async with self._store.transaction() as tx:
            if not await tx.consume_enrolment(token_hash, cp_id, time.time()):
                return None
            secret = await self._replace_secret(tx, cp_id)
        self._feed.note("enrolled", f"{cp_id}: enrolled with a one-time token", cp_id)
        await self._disconnect(cp_id)
        return secret

    async def _replace_secret(self, tx: StoreTx, cp_id: str) -> str:
        secret = new_secret()
        await tx.set_secret_hash(cp_id, hash_secret(secret))
        await self._keys.revoke_principal(tx, "cp", cp_id)
        return secret

    async def deregister(self, cp_id: str) -> str | None:
        """Remove a CP for good; returns the id of the supply it settled, if any.

        A supply in progress is ended as an admin's stop does and settled (its ticket goes to
        the driver) before anything else, while the CP's key still opens the engine's final
        figures. Then, in one transaction (with --ha, in the changelog together): its keys are
        revoked, its row with its secret and its enrolment token deleted, and its state
        tombstoned on the state topic, so the dashboards drop it. Its monitor is closed last;
        its next authentication finds no such CP.
        """
        cp = self._known(cp_id)
        cp.in_service = False  # no new supply while the current one is settled
        self._feed.changed(cp)
        settled = await self._supplies.end_and_settle(cp, EndReason.STOPPED_BY_ADMIN)
        async with self._store.transaction() as tx:
            await self._keys.revoke_principal(tx, "cp", cp_id)
            await tx.delete_cp(cp_id)
        self._registry.remove(cp_id)
        self._feed.note("deregistered", f"{cp_id}: deregistered", cp_id)
        link = self._links.get(cp_id)
        if link is not None:  # told first, so that it stops instead of being refused again
            await link.removed("deregistered by an admin")
        await self._disconnect(cp_id)
        # Its engine's Kafka login goes too: the broker refuses it from now on.
        if not await self._kafka_logins.withdraw(cp_id):
            self._feed.note(
                "deregistered", f"{cp_id}: Kafka did not remove its engine's login", cp_id
            )
        return settled

    def _known(self, cp_id: str) -> ChargingPoint:
        cp = self._registry.get(cp_id)
        if cp is None:
            raise LookupError(f"unknown CP {cp_id!r}")
        return cp

    async def _disconnect(self, cp_id: str) -> None:
        link = self._links.get(cp_id)
        if link is not None:
            await link.close()
