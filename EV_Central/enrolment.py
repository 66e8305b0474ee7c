"""One-time enrolment tokens: how a new CP gets its secret without an admin typing it in.

An admin (through EV_Registry or the admin WebSocket) asks for a token for a registered CP; it
is random, valid for a limited time, shown once, and only its SHA-256 is kept (the
`enrolment_tokens` table, replicated to a standby Central through the changelog). Whoever
presents the CP's id and that token on the admin web's public `/enrol` WebSocket (the
registry, on behalf of the CP's monitor) gets a fresh secret for the CP, once: the token is
deleted in the same transaction that stores the new secret's hash, so it cannot be used twice,
and the CP's earlier secret and keys stop working.

Redemption needs no login, so guessing is held against the source, as for logins
(shared/abuse.py): each failure is answered later, and a source that keeps failing is refused
for a growing while. A source is the connecting host together with the caller it names (the
registry passes its HTTP client's address): one prober at the registry does not shut out the
registry's other callers, and naming made-up callers gains nothing against 192-bit tokens.
Every issue and every redemption, failed or not, is audited.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass

from EV_Central.admin_api import EnrolRequest, EnrolResult, source_of
from EV_Central.audit import AuditLog
from EV_Central.cp_links import CPLinks
from EV_Central.store import Store
from shared.abuse import Throttle, ThrottleRules

log = logging.getLogger(__name__)

TOKEN_BYTES = 24  # 192 random bits: not guessable, so a plain hash is enough to keep
REFUSED = "unknown CP, or an enrolment token that is wrong, used or expired"
# Failed redemptions from one source: 0.5 s, doubling, at most 3 s; after 5 in a row the
# source is refused for 30 s, doubling up to 5 min (the login rules' numbers).
REDEEM_RULES = ThrottleRules(5, base_delay=0.5, max_delay=3.0, first_block=30.0, max_block=300.0)


def new_token() -> str:
    """A fresh enrolment token (URL-safe text)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    """What the database keeps of a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    cp_id: str
    token: str
    expires_at: float  # seconds since the epoch


class Enrolments:
    def __init__(
        self,
        store: Store,
        cp_links: CPLinks,
        audit: AuditLog,
        *,
        rules: ThrottleRules = REDEEM_RULES,
    ) -> None:
        self._store = store
        self._cp_links = cp_links
        self._audit = audit
        self._failures: Throttle[tuple[str, str]] = Throttle(rules)

    async def issue(self, cp_id: str, ttl_s: float) -> IssuedToken:
        """A new token for a registered CP (LookupError when unknown); any earlier one goes."""
        if self._cp_links.cp(cp_id) is None:
            raise LookupError(f"unknown CP {cp_id!r}")
        token, now = new_token(), time.time()
        async with self._store.transaction() as tx:
            await tx.replace_enrolment(token_hash(token), cp_id, now, now + ttl_s)
        return IssuedToken(cp_id, token, now + ttl_s)

    async def redeem(self, request: EnrolRequest, host: str) -> EnrolResult:
        """Exchange a CP's token for its new secret, once; `host` is the connecting client."""
        now = time.monotonic()
        source = (host, request.caller)
        wait = self._failures.retry_after(source, now)
        where = source_of(request.caller, host)
        if wait:
            return EnrolResult(
                cp_id=request.cp_id,
                ok=False,
                reason=f"too many failed enrolments; try again in {wait:.0f} s",
                retry_after=wait,
            )
        secret = await self._cp_links.redeem_enrolment(request.cp_id, token_hash(request.token))
        if secret is None:
            verdict = self._failures.failed(source, now)
            await self._audit.record(
                "enrolment", "failed", actor=request.cp_id, source=where, detail=REFUSED
            )
            if verdict.blocked_for:
                await self._audit.record(
                    "throttle",
                    "blocked",
                    source=where,
                    detail=f"{verdict.failures} failed enrolments: refused for "
                    f"{verdict.blocked_for:g} s",
                )
            await asyncio.sleep(verdict.delay)
            return EnrolResult(cp_id=request.cp_id, ok=False, reason=REFUSED)
        self._failures.succeeded(source)
        await self._audit.record("enrolment", "ok", actor=request.cp_id, source=where)
        log.info("%s enrolled from %s", request.cp_id, where)
        return EnrolResult(cp_id=request.cp_id, ok=True, secret=secret)
