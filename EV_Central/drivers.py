"""What drivers ask Central besides a supply: log in, stop, status, history, ticket receipts.

A login costs a slow password hash, and a failure is answered late on purpose, so each runs
as a task of its own beside the consumer (at most `MAX_LOGINS` at once: beyond, a login is
refused at once as busy); this object owns those tasks and cancels and awaits them on
`stop()`. The source a failed login is held against is the login's client key
(EV_Central/auth.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from EV_Central.auth import PeopleAuth
from EV_Central.context import Context, Part
from EV_Central.gate import SealedGate
from EV_Central.keys import KeyStore
from EV_Central.supplies import Supplies
from shared.bus import Topics
from shared.messages import (
    CentralIdentity,
    CPState,
    DriverHistory,
    DriverNotice,
    DriverStatus,
    EndReason,
    HistoryQuery,
    IdentityQuery,
    LoginRequest,
    LoginResult,
    Message,
    StatusQuery,
    StopRequest,
    TicketAck,
)
from shared.sealing import SealError, b64, fingerprint, login_unwrap, seal_reply

log = logging.getLogger(__name__)

# Driver logins in progress at once; PeopleAuth bounds how many hash a password at a time.
MAX_LOGINS = 256
BUSY = "Central has too many logins in progress; try again in a moment"


class Drivers(Part):
    def __init__(
        self,
        context: Context,
        keys: KeyStore,
        people: PeopleAuth,
        gate: SealedGate,
        supplies: Supplies,
        *,
        request_ttl: float,
        session_ttl: float,
    ) -> None:
        super().__init__(context)
        self._keys = keys
        self._people = people
        self._gate = gate
        self._supplies = supplies
        self._request_ttl = request_ttl
        self._session_ttl = session_ttl
        self._logins: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        """Cancel the logins in progress and wait for them."""
        tasks, self._logins = self._logins, set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def handle(self, request: Message, at: float | None = None) -> None:
        """One driver request other than a supply request; `at`: when the broker took it, on
        Central's clock (the age of a login is judged from it, not the driver's clock)."""
        match request:
            case StopRequest():
                await self._stop_supply(request)
            case StatusQuery():
                await self._status(request)
            case TicketAck():
                async with self._store.transaction() as tx:
                    await tx.ack_ticket(request.session_id, request.driver_id, request.revision)
            case LoginRequest():
                if len(self._logins) >= MAX_LOGINS:
                    log.warning("refused a login of %s: too many in progress", request.driver_id)
                    await self._answer(
                        LoginResult(
                            driver_id=request.driver_id,
                            request_id=request.id,
                            ok=False,
                            reason=BUSY,
                            retry_after=1.0,
                        )
                    )
                    return
                arrived = time.time() if at is None else at
                task = asyncio.create_task(self._login_task(request, arrived), name="driver-login")
                self._logins.add(task)
                task.add_done_callback(self._logins.discard)
            case IdentityQuery():
                identity = self._keys.identity_public
                await self._answer(
                    CentralIdentity(
                        driver_id=request.driver_id,
                        request_id=request.id,
                        public_key=identity,
                        fingerprint=fingerprint(identity),
                    ),
                )
            case HistoryQuery():
                await self._history(request)

    async def _answer(self, message: Any) -> None:
        await self._bus.post(Topics.DRIVER_UPDATES, message.driver_id, message)

    async def _stop_supply(self, request: StopRequest) -> None:
        cp = self._registry.session_of_driver(request.driver_id)
        if (
            cp is None
            or cp.session is None
            or (request.session_id and cp.session.session_id != request.session_id)
        ):
            await self._answer(
                DriverNotice(
                    driver_id=request.driver_id, level="error", text="no supply in progress to stop"
                )
            )
            return
        await self._supplies.end(cp, EndReason.DRIVER_STOP)

    async def _status(self, query: StatusQuery) -> None:
        balance = await self._store.driver_balance(query.driver_id)
        active = None
        unseen = []
        if balance is not None:
            cp = self._registry.session_of_driver(query.driver_id)
            if cp is not None and cp.session is not None:
                active = cp.session.info()
            unseen = await self._store.unseen_tickets(query.driver_id)
        await self._answer(
            DriverStatus(
                driver_id=query.driver_id,
                request_id=query.id,
                **_account_fields(balance),
                active_session=active,
                unseen_tickets=unseen,
                available_cps=[
                    cp.summary() for cp in self._registry.sorted() if cp.state == CPState.ACTIVADO
                ],
            )
        )

    async def _history(self, query: HistoryQuery) -> None:
        balance = await self._store.driver_balance(query.driver_id)
        tickets = []
        if balance is not None:
            tickets = await self._store.tickets(query.driver_id, query.limit)
        await self._answer(
            DriverHistory(
                driver_id=query.driver_id,
                request_id=query.id,
                **_account_fields(balance),
                tickets=tickets,
            )
        )

    # --- logins --------------------------------------------------------------------------------

    async def _login_task(self, request: LoginRequest, at: float) -> None:
        try:
            await self._login(request, at)
        except SealError as exc:
            self._stats.counters["rejected"] += 1
            log.warning("rejected a login of %s: %s", request.driver_id, exc)
            await self._gate.rejected(Topics.DRIVER_REQUESTS, request.driver_id, str(exc))
        except Exception:
            self._stats.counters["handler_errors"] += 1
            log.exception("login of %s failed", request.driver_id)

    async def _login(self, request: LoginRequest, at: float) -> None:
        """A driver logs in: open its password, check it, and hand back a key of its own."""
        driver_id = request.driver_id

        async def answer(**fields: Any) -> None:
            await self._answer(LoginResult(driver_id=driver_id, request_id=request.id, **fields))

        assert self._keys.identity is not None
        waited = time.time() - at
        if waited > self._request_ttl:
            reason = f"login request too old: it waited {waited:.0f} s for Central (Kafka's clock)"
            await answer(ok=False, reason=reason)
            return
        try:
            password, reply_key = login_unwrap(
                self._keys.identity,
                driver_id,
                request.id,
                request.client_key,
                request.nonce,
                request.sealed_password,
            )
        except SealError as exc:
            await answer(ok=False, reason=f"the login could not be read: {exc}")
            return
        async with self._store.transaction() as tx:
            replayed = await tx.seen(request.id)
            if not replayed:
                await tx.mark_processed(request.id)
        if replayed:
            raise SealError("replayed login request")
        # The asker's login key is all that tells one driver app (or dashboard host) from
        # another: failures are held against it, not against the account.
        source = f"login key {fingerprint(request.client_key)}"
        outcome = await self._people.login(
            driver_id, password, source=source, channel="driver", role="driver"
        )
        verdict = "ok" if outcome.ok else "refused"
        self._feed.note("login", f"login of {driver_id}: {verdict}", driver_id=driver_id)
        if not outcome.ok:
            await answer(ok=False, reason=outcome.reason, retry_after=outcome.retry_after)
            return
        async with self._store.transaction() as tx:
            key = await self._keys.issue_driver_key(tx, driver_id, self._session_ttl)
        balance = await self._store.driver_balance(driver_id)
        secret = json.dumps(
            {"key": b64(key.key), "balance_eur": balance / 100 if balance is not None else None}
        )
        nonce, sealed = seal_reply(reply_key, driver_id, request.id, secret.encode())
        await answer(
            ok=True, key_id=key.key_id, expires_at=key.expires_at, nonce=nonce, sealed=sealed
        )


def _account_fields(balance_cents: int | None) -> dict[str, Any]:
    """Whether a driver is known, and its balance in euros (None when unknown)."""
    return {
        "known": balance_cents is not None,
        "balance_eur": balance_cents / 100 if balance_cents is not None else None,
    }
