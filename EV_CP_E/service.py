"""The engine's asyncio layer: monitor socket, Kafka, menu, clock. Rules live in machine.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections import deque
from typing import TextIO

from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError

from EV_CP_E.config import EngineSettings
from EV_CP_E.journal import Held, Journal, Recovered
from EV_CP_E.ledger import Ledger
from EV_CP_E.machine import Authorisation, EngineMachine, EngineState, Outcome
from shared.backoff import Backoff
from shared.bus import BusError, KafkaBus, Topics, consume_each
from shared.clock import NetworkClock, broker_time
from shared.console import stdin_lines
from shared.cp_channel import CPChannel, KeyNotKnown
from shared.errors import ConnectionLost, DeliveryFailed, EVError, MessageError
from shared.framed import FramedConnection, serve_framed
from shared.lifecycle import Shutdown
from shared.messages import (
    MONITOR_TO_ENGINE,
    AuthorizeSupply,
    CPAuthorisation,
    CPRequestDenied,
    CPSupplyEnded,
    CPTelemetry,
    EndSupply,
    EngineChallenge,
    EngineHello,
    EngineKey,
    HealthReport,
    Message,
    MonitorToEngine,
    SetService,
    StartSupply,
)
from shared.sealing import SealError, check_hello_proof, new_challenge

log = logging.getLogger(__name__)

DRIVER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
POLL_INTERVAL = 0.1
FLUSH_TIMEOUT = 3.0
BUS_STOP_TIMEOUT = 1.5
# Central's commands are acted on only while fresh (by the broker's stamp): one that waited
# longer in Kafka, e.g. while the engine was away, is refused. Replays are refused anyway.
COMMAND_MAX_AGE = 60.0
# Commands sealed with a key the monitor has not handed over yet wait for it (this many).
PENDING_COMMANDS = 16
# Keys kept after a rotation, to open commands Central sealed just before it.
OLD_KEYS = 2
# A new connection must say hello within this many seconds.
HELLO_TIMEOUT = 5.0
HELP = "commands: p plug in, u unplug, k report KO, o back to OK, r DRIVER_ID request, q quit"


class EngineError(EVError):
    """The engine cannot run (e.g. its listening address is taken)."""


class EngineService:
    """One engine: owns its tasks, its Kafka bus and the monitor connection."""

    def __init__(
        self, settings: EngineSettings, shutdown: Shutdown, *, screen: TextIO | None = None
    ) -> None:
        self.settings = settings
        self.shutdown = shutdown
        self.screen = screen if screen is not None else sys.stdout
        self.machine = EngineMachine(
            health_timeout=settings.health_timeout,
            auto_plug=settings.auto_plug,
            auto_unplug=settings.auto_unplug,
            speed=settings.speed,
        )
        self.bus = KafkaBus(settings.broker, client_id="ev-cp-engine", login=settings.kafka)
        self.ledger: Ledger | None = None
        if settings.ledger is not None:
            try:
                self.ledger = Ledger(settings.ledger)
            except OSError as exc:
                raise EngineError(
                    f"cannot append to the ledger {settings.ledger}: {exc.strerror or exc}"
                ) from None
        # What must survive a crash (the supply in hand, the events Kafka has not taken), and
        # what the last run left to send again once the monitor says which CP this is.
        self.journal = Journal(settings.journal) if settings.journal is not None else None
        self._recovered: Recovered | None = self.journal.load() if self.journal else None
        self._journaled: tuple[object, ...] | None = None
        # The authorisation being metered, for the ledger: the machine forgets it as the
        # supply ends, before the ended event is recorded.
        self._metering: Authorisation | None = None
        # (key, message, reliable); the head is the one being sent.
        self._outbox: deque[tuple[str, Message, bool]] = deque()
        self._outbox_changed = asyncio.Event()
        self._bus_ready = asyncio.Event()
        self._commands_ready = asyncio.Event()
        self._supply_started = asyncio.Event()
        self._monitor: FramedConnection[MonitorToEngine] | None = None
        self._last_status = ""
        self._last_poll_refusal: str | None = None
        # The CP's keys, handed over by the monitor: events are sealed with the newest.
        self._channel: CPChannel | None = None
        self._key_ready = asyncio.Event()
        self._pending: deque[ConsumerRecord[bytes, bytes]] = deque(maxlen=PENDING_COMMANDS)
        # This PC's clock against the network's (the brokers'): how old a command is.
        self.clock = NetworkClock(self.bus.probe_clock, who="engine", warn=self._say)
        self._central_offset: float | None = None  # Central's clock minus the network's
        if not settings.secret:
            log.warning(
                "no CP secret given (--secret-file): any local connection may act as the monitor"
            )

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        host, port = self.settings.listen
        try:
            server = await serve_framed(
                self._on_monitor, host, port, MONITOR_TO_ENGINE, name="monitor"
            )
        except OSError as exc:
            if self.ledger is not None:
                self.ledger.close()
            raise EngineError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        log.info("listening for the monitor on %s:%d", host, port)
        if self.settings.speed != 1.0:
            log.info("simulated time runs %g times faster than real time", self.settings.speed)
        self._show()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._menu(), name="menu"),
                    group.create_task(self._watchdog(), name="watchdog"),
                    group.create_task(self._ticker(), name="ticker"),
                    group.create_task(self._commands(), name="commands"),
                    group.create_task(self._send_outbox(), name="outbox"),
                    group.create_task(self._measure_clock(), name="clock"),
                ]
                await self.shutdown.wait()
                await self._finish()
                for task in tasks:
                    task.cancel()
        finally:
            if self._monitor is not None:
                await self._monitor.close()  # which ends its handler
            await server.close()
            try:
                await asyncio.wait_for(self.bus.stop(), BUS_STOP_TIMEOUT)
            except TimeoutError:
                log.warning("Kafka client did not close in time")
            if self.ledger is not None:
                self.ledger.close()
            log.info("engine stopped")

    async def _finish(self) -> None:
        """Before quitting: end a supply in progress as unplugged and flush the outbox."""
        self._apply(self.machine.shutdown())
        if not self._outbox:
            return
        if self._bus_ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_drained(), FLUSH_TIMEOUT)
        pending = sum(1 for _, _, reliable in self._outbox if reliable)
        if pending and self.journal is not None:
            log.warning(
                "quitting with %d event(s) Kafka did not take: kept in the journal %s, sent when "
                "the engine starts again",
                pending,
                self.journal.path,
            )
        elif pending:
            log.warning("quitting with %d event(s) Kafka did not take", pending)

    async def _outbox_drained(self) -> None:
        while self._outbox:
            self._outbox_changed.clear()
            await self._outbox_changed.wait()

    # --- screen -------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        print(f"[{self.machine.cp_id or '?'}] {text}", file=self.screen, flush=True)

    def _show(self) -> None:
        line = self.machine.status_line()
        if line != self._last_status:
            self._last_status = line
            print(line, file=self.screen, flush=True)

    def _apply(self, outcome: Outcome, *, from_poll: bool = False) -> None:
        """Publish an outcome's events and show what changed."""
        for note in outcome.notes:
            self._say(note)
        if from_poll:
            if outcome.refused and outcome.refused != self._last_poll_refusal:
                self._say(f"cannot plug in automatically: {outcome.refused}")
            self._last_poll_refusal = outcome.refused
        elif outcome.refused:
            self._say(outcome.refused)
        for event in outcome.events:
            self._record(event)  # first: the ledger is never behind what Central can see
            self._publish(event)
        self._keep()  # on disk before the outbox's sender can run
        self._show()

    def _record(self, event: Message) -> None:
        """Write an event's ledger line: an accepted authorisation, telemetry, a supply's end."""
        ledger = self.ledger
        if ledger is None:
            return
        if isinstance(event, CPAuthorisation):
            auth = self.machine.auth
            if event.accepted and auth is not None and auth.session_id == event.session_id:
                self._metering = auth
                ledger.authorised(
                    cp_id=event.cp_id,
                    session_id=auth.session_id,
                    driver_id=auth.driver_id,
                    price_eur_kwh=auth.price_eur_kwh,
                    max_kwh=auth.max_kwh,
                    ts=event.ts,
                )
        elif isinstance(event, CPTelemetry):
            ledger.tick(event, self._driver_of(event.session_id))
        elif isinstance(event, CPSupplyEnded):
            ledger.ended(event, self._driver_of(event.session_id))
            self._metering = None

    def _driver_of(self, session_id: str) -> str | None:
        for auth in (self._metering, self.machine.auth):
            if auth is not None and auth.session_id == session_id:
                return auth.driver_id
        return None

    # --- journal ------------------------------------------------------------------------------

    def _keep(self) -> None:
        """Write the journal if what it must hold changed: the supply in hand (each tick) or
        the events waiting for Kafka."""
        journal = self.journal
        if journal is None or self._recovered is not None:
            return  # nothing to keep, or the last run's journal not sent yet: leave it be
        auth, supply = self.machine.auth, self.machine.supply
        pending = [message for _, message, reliable in self._outbox if reliable]
        held = None
        if auth is not None:
            held = Held(
                session_id=auth.session_id,
                driver_id=auth.driver_id,
                price_eur_kwh=auth.price_eur_kwh,
                kwh=supply.kwh if supply is not None else 0.0,
                started_at=supply.started_at if supply is not None else None,
            )
        snapshot = (held, tuple(message.id for message in pending))
        if snapshot == self._journaled:
            return
        self._journaled = snapshot
        journal.save(self.machine.cp_id, held, pending)

    def _resume(self, cp_id: str) -> None:
        """The monitor said which CP this is: send again what the last run left unsent."""
        recovered, self._recovered = self._recovered, None
        if recovered is None:
            return
        assert self.journal is not None
        if recovered.cp_id != cp_id:
            log.warning(
                "the journal %s is %s's, this engine is %s: its %d event(s) are not sent",
                self.journal.path,
                recovered.cp_id,
                cp_id,
                len(recovered.events),
            )
            self._say(f"ignored a journal of another CP ({recovered.cp_id})")
        else:
            if recovered.ended is not None:
                session = recovered.ended.session_id
                kwh = recovered.ended.kwh
                self._say(
                    f"session {session} was cut short when this engine stopped: reporting "
                    f"{kwh:.4f} kWh ({recovered.ended.reason.value})"
                )
                if self.ledger is not None:
                    self.ledger.ended(recovered.ended, recovered.driver_id)
            for event in recovered.events:
                self._outbox.append((cp_id, event, True))
            self._outbox_changed.set()
            log.info("sending %d event(s) kept in the journal", len(recovered.events))
        self._keep()

    # --- outbox -------------------------------------------------------------------------------

    def _publish(self, event: Message) -> None:
        key = self.machine.cp_id
        if key is None:  # only possible before the monitor's hello; nothing to publish then
            log.warning("dropping %s: CP id not known yet", type(event).__name__)
            return
        reliable = not isinstance(event, CPTelemetry)
        if not reliable and len(self._outbox) > 1:
            # Keep only the newest telemetry waiting behind the one in flight.
            head = self._outbox.popleft()
            kept = [item for item in self._outbox if item[2]]
            self._outbox.clear()
            self._outbox.append(head)
            self._outbox.extend(kept)
        self._outbox.append((key, event, reliable))
        self._outbox_changed.set()

    async def _send_outbox(self) -> None:
        """Publish the outbox in order; retry reliable events until Kafka takes them."""
        await self._bus_ready.wait()
        backoff = Backoff(maximum=5.0)
        while True:
            while not self._outbox:
                self._outbox_changed.clear()
                await self._outbox_changed.wait()
            key, message, reliable = self._outbox[0]
            channel = self._channel
            if channel is None or not channel.ready:
                if not reliable:
                    self._outbox.popleft()
                    continue
                self._say("waiting for the CP's key (from the monitor) to send events")
                await self._key_ready.wait()
                continue
            try:
                sealed = channel.seal(message)
                await self.bus.send_raw(Topics.CP_EVENTS, key.encode(), sealed)
            except (BusError, KafkaError) as exc:
                if not reliable:
                    log.debug("telemetry dropped: %s", exc)
                    self._outbox.popleft()
                    self._outbox_changed.set()
                    continue
                delay = backoff.next_delay()
                log.warning(
                    "cannot reach Kafka to publish %s (%s); retrying in %.1f s",
                    type(message).__name__,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            if backoff.attempt:
                log.info("Kafka takes events again")
            backoff.reset()
            self._outbox.popleft()
            self._outbox_changed.set()
            if reliable:
                self._keep()

    # --- Kafka --------------------------------------------------------------------------------

    async def _measure_clock(self) -> None:
        await self._bus_ready.wait()
        await self.clock.run()

    async def _start_bus(self) -> None:
        backoff = Backoff(maximum=5.0)
        while True:
            try:
                await self.bus.start(ensure_topics=False)  # retries until the broker answers
                await self.bus.ensure_topics()
                break
            except (BusError, KafkaError, OSError) as exc:
                delay = backoff.next_delay()
                log.warning("cannot set up Kafka topics (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
        log.info("connected to Kafka at %s", self.settings.broker)
        self._say(f"connected to Kafka at {self.settings.broker}")
        self._bus_ready.set()

    async def _commands(self) -> None:
        """Consume Central's commands for this CP (from the end of the topic).

        The subscription starts before the CP id is known, and the engine reports itself
        healthy only once it is in place: an authorisation sent the moment Central sees
        the CP ready can never be missed.
        """
        await self._start_bus()
        backoff = Backoff(maximum=5.0)
        while True:
            try:
                consumer = await self.bus.tail_consumer([Topics.CP_COMMANDS])
                break
            except (BusError, KafkaError) as exc:
                delay = backoff.next_delay()
                log.warning("cannot subscribe to commands (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
        log.info("listening for Central's commands")
        self._say("listening for Central's commands")
        self._commands_ready.set()
        # The consumer belongs to the bus, which stops it with everything else.
        await consume_each(consumer, self._on_record, what="Central's commands")

    def _on_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        cp_id = self.machine.cp_id
        if cp_id is None:
            return  # no monitor has told us who we are yet: nothing is for us
        if record.key is not None and record.key.decode("utf-8", "replace") != cp_id:
            return
        # How old the command is, by the broker's stamp and this PC's measured offset: never
        # by Central's clock against this one (docs/operations.md, "Clocks").
        stamped = broker_time(record)
        age = None
        if stamped is not None and self.clock.offset is not None:
            age = max(0.0, self.clock.now() - stamped)
        try:
            command = self._channel_of(cp_id).open(record.value or b"")
        except KeyNotKnown as exc:
            self._pending.append(record)  # maybe sealed with the key the monitor is bringing
            log.info("command sealed with key %s, not known yet: held", exc.key_id)
            return
        except SealError as exc:
            log.warning("refused a command at offset %d: %s", record.offset, exc)
            self._say(f"refused a command that failed authentication: {exc}")
            return
        except MessageError as exc:
            log.warning(
                "skipping an invalid command at %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            return
        log.info("command %s from Central", command.type)
        written = self._written_age(command)
        if written is not None and (age is None or written > age):
            # Older by when Central wrote it than by when Kafka took it: a command kept, or
            # a copy sent again (whose stamp is new). Central's clock read with its offset.
            age = written
        if age is not None and age > COMMAND_MAX_AGE:
            why = f"command {age:.0f} s old by the network's clock (at most {COMMAND_MAX_AGE:g} s)"
            log.warning("refused a stale %s: %s", command.type, why)
            self._say(f"refused a stale {command.type}: {why}")
            if isinstance(command, AuthorizeSupply):
                self._apply(self.machine.refuse(command, why))
            return
        if isinstance(command, AuthorizeSupply):
            # Its end on this PC's clock: what was left of it when Central sent it, less the
            # time it took to come (Central's clock and this one may disagree).
            left = command.expires_at - command.ts - (age or 0.0)
            local = command.model_copy(update={"expires_at": time.time() + left})
            self._apply(self.machine.authorize(local))
        elif isinstance(command, StartSupply):
            self._apply(self.machine.start_supply(command))
            if self.machine.state is EngineState.SUPPLYING:
                self._supply_started.set()
        elif isinstance(command, EndSupply):
            self._apply(self.machine.end_supply(command))
        elif isinstance(command, SetService):
            self._apply(self.machine.set_service(command))
        elif isinstance(command, CPRequestDenied):
            self._apply(self.machine.request_denied(command))

    def _written_age(self, command: Message) -> float | None:
        """How long ago Central wrote a command, by the network's clock, when both Central's
        offset (from the monitor) and this PC's are known."""
        if self._central_offset is None or self.clock.offset is None:
            return None
        return max(0.0, self.clock.now() - (command.ts - self._central_offset))

    def _channel_of(self, cp_id: str) -> CPChannel:
        """This CP's channel (the CP id, once known, never changes)."""
        if self._channel is None:
            self._channel = CPChannel(cp_id, old_keys=OLD_KEYS)
        return self._channel

    def _take_key(self, message: EngineKey) -> None:
        """The monitor hands over the CP's key (after each authentication) or takes it back."""
        channel = self._channel_of(message.cp_id)
        if message.key_id is None or message.key is None:
            channel.revoke()
            self._key_ready.clear()
            self._say("Central revoked this CP's key: waiting for a new one")
            return
        if not channel.take_key(message.key_id, message.key):
            return
        self._key_ready.set()
        log.info("new key %s from the monitor", message.key_id)
        held, self._pending = list(self._pending), deque(maxlen=PENDING_COMMANDS)
        for record in held:
            self._on_record(record)

    # --- monitor socket -----------------------------------------------------------------------

    async def _on_monitor(self, connection: FramedConnection[MonitorToEngine]) -> None:
        try:
            log.info("connection from %s", connection.peer)
            # Only a connection whose hello is accepted becomes the monitor's link: a stranger
            # on this port cannot cut the real monitor off. The hello must prove the CP's
            # secret over this connection's challenge: a recorded one is worth nothing.
            challenge = new_challenge()
            await connection.send(EngineChallenge(nonce=challenge))
            first = await asyncio.wait_for(connection.receive(), HELLO_TIMEOUT)
            if not isinstance(first, EngineHello) or not self._accept_hello(first, challenge):
                return
            previous, self._monitor = self._monitor, connection
            if previous is not None:
                log.info("a new monitor connection from %s replaces the old one", connection.peer)
                await previous.close()
            await self._serve_monitor(connection)
        except (ConnectionLost, DeliveryFailed, TimeoutError) as exc:
            log.info("monitor connection ended: %s", exc or "no hello in time")
        except asyncio.CancelledError:
            log.debug("monitor connection handler cancelled")  # only our own shutdown does
        except Exception as exc:  # a connection boundary: log it, keep the engine running
            log.error("monitor connection failed: %s: %s", type(exc).__name__, exc)
            log.debug("details", exc_info=True)
        finally:  # the server closes the connection once this returns
            if self._monitor is connection:
                self._monitor = None

    def _accept_hello(self, hello: EngineHello, challenge: str) -> bool:
        """Check a monitor's hello (its CP, its proof of the secret); take the CP id from it."""
        secret = self.settings.secret
        if secret:
            refusal = check_hello_proof(secret, hello.cp_id, hello.id, challenge, hello.proof)
            if refusal is not None:
                log.warning("refused a monitor connection: %s", refusal)
                self._say(f"refused a monitor connection: {refusal}")
                return False
        known = self.machine.cp_id
        if not self.machine.set_cp_id(hello.cp_id):
            log.warning("refusing a monitor for %s: this engine is %s", hello.cp_id, known)
            self._say(f"refused a monitor for another CP ({hello.cp_id})")
            return False
        if known is None:
            log.info("CP id is %s (from the monitor)", hello.cp_id)
            self._say(f"this engine is {hello.cp_id}")
            self._show()
            self._resume(hello.cp_id)
        return True

    async def _serve_monitor(self, connection: FramedConnection[MonitorToEngine]) -> None:
        while True:
            message = await connection.receive()
            if isinstance(message, EngineHello):
                if message.cp_id != self.machine.cp_id:
                    log.warning(
                        "refusing a hello for %s on %s's link", message.cp_id, self.machine.cp_id
                    )
                    self._say(f"refused a monitor for another CP ({message.cp_id})")
                    return
                continue  # already said hello on this connection
            if isinstance(message, EngineKey):
                if message.cp_id == self.machine.cp_id:
                    self._take_key(message)
                continue
            if message.central_offset_s is not None:
                self._central_offset = message.central_offset_s
            self._apply(self.machine.health_check(message.central_ok))
            listening = self._commands_ready.is_set()
            await connection.send(
                HealthReport(
                    seq=message.seq,
                    ok=self.machine.health_ok and listening,
                    engine_state=self.machine.state.value
                    if listening
                    else "STARTING (not listening to Central yet)",
                    starting=not listening,
                    speed=self.settings.speed,
                )
            )

    # --- clock --------------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            self._apply(self.machine.poll(), from_poll=True)

    async def _ticker(self) -> None:
        """Tick every --tick seconds while supplying, in phase with the plug."""
        loop = asyncio.get_running_loop()
        tick = self.settings.tick
        while True:
            await self._supply_started.wait()
            self._supply_started.clear()
            supply = self.machine.supply
            next_at = loop.time() + tick
            while supply is not None and self.machine.supply is supply:
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                next_at += tick
                if self.machine.supply is supply:
                    self._apply(self.machine.tick(tick))

    # --- menu ---------------------------------------------------------------------------------

    async def _menu(self) -> None:
        async for line in stdin_lines():
            if not line:
                continue
            command, _, argument = line.partition(" ")
            command, argument = command.lower(), argument.strip()
            if command == "q":
                self._say("quitting")
                self.shutdown.request()
                return
            if command == "p":
                self._apply(self.machine.plug())
            elif command == "u":
                self._apply(self.machine.unplug())
            elif command == "k":
                self._apply(self.machine.set_ko(True))
            elif command == "o":
                self._apply(self.machine.set_ko(False))
            elif command == "r":
                if not DRIVER_ID.match(argument):
                    self._say("refused: usage r DRIVER_ID (letters, digits, _ . -)")
                else:
                    self._apply(self.machine.request(argument))
            elif command in ("s", "status"):
                self._last_status = ""
                self._show()
            else:
                self._say(HELP)
        log.info("standard input closed: menu off (stop with SIGTERM or SIGINT)")

    @property
    def state(self) -> EngineState:
        return self.machine.state
