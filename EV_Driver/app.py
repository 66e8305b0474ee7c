"""The driver app's asyncio layer: Kafka in and out, timers, and printing.

The decisions live in flow.DriverFlow; this module only moves messages and keeps time.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from EV_Driver.config import DriverSettings, ExitCode
from EV_Driver.flow import (
    DriverFlow,
    Failure,
    Notice,
    Outcome,
    Reaction,
    Requested,
    update_driver_id,
)
from EV_Driver.output import Output
from EV_Driver.session import (
    DriverSession,
    LoginRefused,
    finish_login,
    login_key,
    start_login,
)
from shared.backoff import Backoff
from shared.bus import BusError, KafkaBus, Topics, consume_each
from shared.clock import NetworkClock
from shared.errors import EVError, MessageError
from shared.lifecycle import Shutdown, first_error
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
from shared.sealing import SealError, fingerprint, is_sealed

log = logging.getLogger(__name__)

AnswerT = TypeVar("AnswerT", LoginResult, CentralIdentity)

# While only waiting for accepted/denied, give up after this many reply timeouts of silence.
ANSWER_TIMEOUT_FACTOR = 5
INBOX_SIZE = 1000


class LoginFailed(EVError):
    """The driver could not log in (refused, no password, Central unreachable)."""


def outcome_exit_code(outcomes: Sequence[Outcome], requests: int) -> ExitCode:
    """The exit code for the outcomes of `requests` requests: the worst one decides.

    No answer is worse than a missing outcome (stopped before it came), which is worse than
    a denial: a script learns first whether Central can be relied on at all.
    """
    if Outcome.ERROR in outcomes:
        return ExitCode.FAILED
    if len(outcomes) < requests:
        return ExitCode.STOPPED
    if Outcome.DENIED in outcomes:
        return ExitCode.DENIED
    return ExitCode.OK


class DriverApp:
    """Runs the driver's requests one at a time; `exit_code` says how it went."""

    def __init__(
        self,
        settings: DriverSettings,
        output: Output,
        shutdown: Shutdown,
        bus: KafkaBus | None = None,
        session: DriverSession | None = None,
    ) -> None:
        self.settings = settings
        self.output = output
        self.shutdown = shutdown
        self.bus = bus or KafkaBus(
            settings.broker, client_id=f"ev-driver-{settings.driver_id}", login=settings.kafka
        )
        self.flow = DriverFlow(settings.driver_id)
        self._failed = False  # the app gave up by itself: no login, or an unknown driver
        self._logged_in = False  # `login`: the login is done (and saved)
        self._inbox: asyncio.Queue[DriverUpdate] = asyncio.Queue(maxsize=INBOX_SIZE)
        self._key = settings.driver_id.encode()
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.session = session  # a login made beforehand (else _login makes one)

    @property
    def exit_code(self) -> ExitCode:
        """How the run went so far; read at the end, it is the process's exit code."""
        if self._failed:
            return ExitCode.FAILED
        if self.settings.login_only:
            return ExitCode.OK if self._logged_in else ExitCode.STOPPED
        return outcome_exit_code(self.flow.outcomes, len(self.settings.cp_ids))

    async def run(self) -> None:
        """Connect, follow every request to its outcome, stop the bus."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                work = group.create_task(self._main(), name="driver-requests")
                stop = group.create_task(self.shutdown.wait(), name="driver-shutdown")
                self._tasks += [work, stop]
                await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
                for task in self._tasks:
                    task.cancel()
        except BaseExceptionGroup as failures:
            raise first_error(failures) from None
        finally:
            self._group = None
            await self.bus.stop()

    async def _main(self) -> None:
        await self.bus.start()
        # Positioned at the end before anything is sent, so no answer can be missed.
        consumer = await self.bus.tail_consumer([Topics.DRIVER_UPDATES])
        assert self._group is not None
        self._tasks.append(
            self._group.create_task(self._read_updates(consumer), name="driver-updates")
        )
        # This PC's clock against the network's: one line when it is off, and how to fix it.
        clock = NetworkClock(self.bus.probe_clock, who="driver app", warn=self._clock_warning)
        self._tasks.append(self._group.create_task(clock.run(), name="driver-clock"))
        try:
            await self._login()
        except LoginFailed as exc:
            self.output.emit(Failure(self.settings.driver_id, str(exc)))
            self._failed = True
            return
        if self.settings.login_only:
            self._logged_in = True
            where = self.settings.token_file or "memory only"
            self.output.emit(
                Notice(self.settings.driver_id, f"logged in; token saved ({where})", "info")
            )
            return
        await self._work()

    def _clock_warning(self, text: str) -> None:
        self.output.emit(Notice(self.settings.driver_id, text, "warning"))

    # --- login ---------------------------------------------------------------------------------

    async def _login(self) -> None:
        """A key for this driver: from the token file while it lasts, else a password login."""
        settings = self.settings
        if self.session is not None and not self.session.expired:
            return
        token = Path(settings.token_file) if settings.token_file else None
        if token is not None and settings.password is None:
            stored = DriverSession.load(token, settings.driver_id)
            if stored is not None:
                self.session = stored[0]
                log.info("using the login in %s (key %s)", token, self.session.key_id)
                return
        password = settings.password
        if password is None:
            if not sys.stdin.isatty():
                raise LoginFailed(
                    "a password is needed: --password-file PATH or EV_PASSWORD "
                    "(or a valid --token-file)"
                )
            password = await asyncio.to_thread(
                getpass.getpass, f"password for {settings.driver_id}: "
            )
        central_key = settings.central_key or await self._central_key()
        client = login_key(settings.login_key_file) if settings.login_key_file else None
        pending = start_login(central_key, settings.driver_id, password, client)
        await self._send_clear(pending.request)
        reply = await self._answer(LoginResult, pending.request.id, "the login")
        try:
            self.session = finish_login(pending, reply)
        except LoginRefused as exc:
            wait = ""
            if exc.retry_after and "try again" not in exc.reason:
                wait = f" (try again in {exc.retry_after:.0f} s)"
            raise LoginFailed(f"login refused: {exc.reason}{wait}") from None
        log.info("logged in (key %s)", self.session.key_id)
        if token is not None:
            self.session.save(token, central_key)

    async def _central_key(self) -> str:
        query = IdentityQuery(driver_id=self.settings.driver_id)
        await self._send_clear(query)
        identity = await self._answer(CentralIdentity, query.id, "Central's key")
        self.output.emit(
            Notice(
                self.settings.driver_id,
                "Central's key is not pinned; using the one Central sent, fingerprint "
                f"{identity.fingerprint} (pin it with --central-key)",
                "info",
            )
        )
        if fingerprint(identity.public_key) != identity.fingerprint:
            raise LoginFailed("Central's key does not match its fingerprint")
        return identity.public_key

    async def _answer(self, kind: type[AnswerT], request_id: str, what: str) -> AnswerT:
        loop = asyncio.get_running_loop()
        reply_timeout = self.settings.reply_timeout
        deadline = loop.time() + ANSWER_TIMEOUT_FACTOR * reply_timeout
        note_at: float | None = loop.time() + reply_timeout  # say once that it takes long
        while True:
            update = await self._next_update(min(deadline, note_at or deadline) - loop.time())
            if update is None and note_at is not None and loop.time() < deadline:
                note_at = None
                text = (
                    f"no answer from Central to {what} after {reply_timeout:g} s; "
                    f"waiting up to {deadline - loop.time():.0f} s more (is Central running?)"
                )
                self.output.emit(Notice(self.settings.driver_id, text, "info"))
                continue
            if update is None:
                raise LoginFailed(f"cannot reach Central: no answer to {what}")
            if isinstance(update, kind) and getattr(update, "request_id", None) == request_id:
                return update

    # --- the Kafka reader --------------------------------------------------------------------

    async def _read_updates(self, consumer: AIOKafkaConsumer) -> None:
        """Keep this driver's valid updates; skip everything else."""
        await consume_each(consumer, self._on_record, what="driver updates", backoff=Backoff())

    async def _on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.key != self._key:
            return
        try:
            update = self._open(record.value or b"")
            if update is None:
                return
        except MessageError as exc:
            log.debug(
                "skipping invalid record %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            return
        if update_driver_id(update) != self.settings.driver_id:
            log.debug("skipping an update for another driver at offset %d", record.offset)
            return
        await self._inbox.put(update)

    def _open(self, value: bytes) -> DriverUpdate | None:
        """An update for this login: sealed with its key, or one of the two clear answers."""
        if is_sealed(value):
            if self.session is None:
                return None
            try:
                return self.session.open(value)
            except SealError as exc:
                log.warning("refused an update that failed authentication: %s", exc)
                return None
        update = decode(DRIVER_UPDATES, value)
        if not isinstance(update, LoginResult | CentralIdentity):
            log.warning("ignored an update that was not sealed (%s)", update.type)
            return None
        return update

    # --- the request flow ---------------------------------------------------------------------

    async def _work(self) -> None:
        if not await self._ask_status():
            return
        if self.flow.busy:
            await self._follow()
        for index, cp_id in enumerate(self.settings.cp_ids):
            if index:
                await asyncio.sleep(self.settings.pause)
            request = self.flow.request(cp_id)
            self.output.emit(Requested(self.settings.driver_id, cp_id, request.id))
            await self._send(request)
            await self._follow()

    async def _ask_status(self) -> bool:
        """Ask Central who we are until it answers; False for an unknown driver."""
        timeout = self.settings.reply_timeout
        loop = asyncio.get_running_loop()
        said_unreachable = False
        while self.flow.status is None:
            await self._send(self.flow.status_query())
            deadline = loop.time() + timeout
            while self.flow.status is None:
                update = await self._next_update(deadline - loop.time())
                if update is None:
                    break
                await self._apply(self.flow.handle(update))
            if self.flow.status is None:
                if not said_unreachable:
                    self.output.emit(
                        Failure(self.settings.driver_id, "cannot reach Central; waiting")
                    )
                    said_unreachable = True
                else:
                    log.info("still no answer from Central; asking again")
        if said_unreachable:
            log.info("Central answered")
        if self.flow.unknown_driver:
            self._failed = True
            return False
        return True

    async def _follow(self) -> None:
        """Wait until the current request or session has its outcome."""
        timeout = self.settings.reply_timeout
        answer_timeout = ANSWER_TIMEOUT_FACTOR * timeout
        silence_note = ANSWER_TIMEOUT_FACTOR * timeout
        loop = asyncio.get_running_loop()
        last_news = loop.time()
        noted_silence = False
        while self.flow.busy:
            if self.flow.awaiting_answer:
                wait = last_news + answer_timeout - loop.time()
            else:
                wait = silence_note
            update = await self._next_update(wait)
            if update is None:
                current = self.flow.current
                assert current is not None
                if self.flow.awaiting_answer:
                    await self._apply(
                        self.flow.give_up(
                            f"no answer from Central about {current.cp_id} "
                            f"after {answer_timeout:g} s"
                        )
                    )
                elif not noted_silence:
                    noted_silence = True
                    self.output.emit(
                        Notice(
                            self.settings.driver_id,
                            f"no news from Central for {silence_note:g} s; still waiting",
                            "info",
                            current.cp_id,
                            current.session_id,
                        )
                    )
                continue
            reaction = self.flow.handle(update)
            if reaction.relevant:
                last_news = loop.time()
                noted_silence = False
            await self._apply(reaction)

    async def _next_update(self, timeout: float) -> DriverUpdate | None:  # noqa: ASYNC109
        if timeout <= 0:
            return None
        try:
            async with asyncio.timeout(timeout):
                return await self._inbox.get()
        except TimeoutError:
            return None

    async def _apply(self, reaction: Reaction) -> None:
        for event in reaction.events:
            self.output.emit(event)
        for ack in reaction.acks:
            await self._send(ack)

    async def _send(self, message: Message) -> None:
        """Publish to Central, sealed with this login's key."""
        assert self.session is not None
        await self._publish(self.session.seal(message))

    async def _send_clear(self, message: Message) -> None:
        await self._publish(encode(message))

    async def _publish(self, value: bytes) -> None:
        """Publish to Central, retrying with backoff while the broker is unreachable."""
        backoff = Backoff()
        while True:
            try:
                await self.bus.send_raw(Topics.DRIVER_REQUESTS, self._key, value)
                return
            except BusError as exc:
                delay = backoff.next_delay()
                log.warning("%s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
