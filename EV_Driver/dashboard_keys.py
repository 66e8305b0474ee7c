"""The drivers' keys at Central, for the dashboard: logins over Kafka, sealing, opening.

A browser's login on the dashboard is a driver's login at Central (EV_Driver.session): the
password goes to Central encrypted to its key, and the answer carries the driver's session
key. This keeps one key per logged-in driver, seals each driver's requests with it and opens
the updates sealed for it. The answer to a refused login keeps Central's `retry_after` as a
number, all the way to the browser.

Logins from one browser host go to Central with one login key of their own (kept for the
dashboard's life): Central holds failures against that key, so a host that guesses slows down
and blocks itself, not the drivers who log in from elsewhere on the same dashboard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from EV_Driver.session import DriverSession, LoginRefused, finish_login, start_login
from shared.bus import BusError, KafkaBus, Topics
from shared.messages import (
    DRIVER_UPDATES,
    CentralIdentity,
    DriverUpdate,
    IdentityQuery,
    LoginResult,
    Message,
    decode,
    encode,
)
from shared.sealing import SealError, is_sealed, parse
from shared.webapp import LoginOutcome, host_of
from shared.websession import WebLogin, WebSession

log = logging.getLogger(__name__)

Answer = LoginResult | CentralIdentity

MAX_CLIENT_KEYS = 10_000  # browser hosts with a login key kept (the least recent are dropped)


class DriverKeys:
    """Each logged-in driver's key at Central (by driver, and by key id for updates)."""

    def __init__(
        self,
        bus: KafkaBus,
        *,
        reply_timeout: float,
        central_key: str | None,
        ready: Callable[[], bool],
    ) -> None:
        self.bus = bus
        self.reply_timeout = reply_timeout
        self.sessions: dict[str, DriverSession] = {}
        self._by_key: dict[str, DriverSession] = {}
        self._central_key = central_key
        self._ready = ready
        self._waiters: dict[str, asyncio.Future[Answer]] = {}
        self._client_keys: dict[str, X25519PrivateKey] = {}

    def live(self, session: WebSession) -> bool:
        """Is the key of a browser session's driver still live? Without it nothing goes out."""
        at_central = self.sessions.get(session.user_id)
        return at_central is not None and not at_central.expired

    def balance(self, driver_id: str) -> float | None:
        at_central = self.sessions.get(driver_id)
        return at_central.balance_eur if at_central is not None else None

    async def login(self, form: WebLogin, peer: str) -> LoginOutcome:
        """Log a driver in at Central: keep its key, or say why there is none."""
        driver_id = form.user
        if not self._ready():
            return _refused("the dashboard is not connected to Kafka yet; try again in a moment")
        try:
            if self._central_key is None:
                query = IdentityQuery(driver_id=driver_id)
                identity = await self._ask(query, query.id)
                if not isinstance(identity, CentralIdentity):
                    return _refused("Central answered something else")
                self._central_key = identity.public_key
                log.warning(
                    "Central's key is not pinned (--central-key); using the one it sent, "
                    "fingerprint %s",
                    identity.fingerprint,
                )
            pending = start_login(
                self._central_key, driver_id, form.password, self._client_key(host_of(peer))
            )
            result = await self._ask(pending.request, pending.request.id)
            if not isinstance(result, LoginResult):
                return _refused("Central answered something else")
            session = finish_login(pending, result)
        except LoginRefused as exc:
            reason = exc.reason
            if exc.retry_after and "try again" not in reason:
                reason += f"; try again in {exc.retry_after:.0f} s"
            return _refused(reason, exc.retry_after or None)
        except SealError as exc:
            return _refused(f"cannot log in: {exc}")
        except BusError:
            return _refused("cannot reach Kafka; try again in a moment")
        except TimeoutError:
            return _refused("Central did not answer; is it running?")
        previous = self.sessions.get(driver_id)
        if previous is not None:
            self._by_key.pop(previous.key_id, None)
        self.sessions[driver_id] = session
        self._by_key[session.key_id] = session
        return LoginOutcome(True, driver_id, "driver")

    def _client_key(self, host: str) -> X25519PrivateKey:
        """The login key of a browser host (made at its first login)."""
        key = self._client_keys.pop(host, None) or X25519PrivateKey.generate()
        self._client_keys[host] = key  # the most recent last: dropped last
        while len(self._client_keys) > MAX_CLIENT_KEYS:
            del self._client_keys[next(iter(self._client_keys))]
        return key

    async def _ask(self, message: Message, request_id: str) -> Answer:
        """Send a clear request (identity query, login) and wait for its answer."""
        waiter: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        driver_id = getattr(message, "driver_id", "")
        try:
            await self.bus.send_raw(Topics.DRIVER_REQUESTS, driver_id.encode(), encode(message))
            async with asyncio.timeout(self.reply_timeout):
                return await waiter
        finally:
            self._waiters.pop(request_id, None)

    def answered(self, answer: Answer) -> None:
        """Central's answer to a login or identity query: wake the login waiting for it."""
        waiter = self._waiters.get(answer.request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def open(self, value: bytes) -> DriverUpdate | None:
        """An update sealed for one of our logins, or a clear answer to a login; else None.

        Raises MessageError for a clear record that is no driver update."""
        if is_sealed(value):
            envelope = parse(value)
            session = self._by_key.get(envelope.key_id)
            if session is None:
                return None  # another login's (another dashboard, a command line)
            try:
                return session.open(value)
            except SealError as exc:
                log.warning("refused an update that failed authentication: %s", exc)
                return None
        update = decode(DRIVER_UPDATES, value)
        if isinstance(update, LoginResult | CentralIdentity):
            return update
        log.debug("ignored an update that was not sealed (%s)", update.type)
        return None

    async def publish(self, message: Message) -> None:
        """Send a driver's request to Central, sealed with that driver's key."""
        driver_id = getattr(message, "driver_id", None)
        assert isinstance(driver_id, str)
        session = self.sessions.get(driver_id)
        if session is None or session.expired:
            raise BusError(f"{driver_id} is not logged in at Central (log in again)")
        await self.bus.send_raw(Topics.DRIVER_REQUESTS, driver_id.encode(), session.seal(message))


def _refused(reason: str, retry_after: float | None = None) -> LoginOutcome:
    return LoginOutcome(False, reason=reason, retry_after=retry_after)
