"""The fleet: lean monitor connections, one simulated engine and drivers on Kafka, and probes.

Everything runs in one asyncio process. A monitor connection is an asyncio.Protocol (no task
per CP); one ticker spreads the heartbeats of all CPs over each second, another their
telemetry. Latencies are measured from outside Central:

- heartbeat round trip: frame written -> ACK byte read;
- request to authorisation: supply_request produced -> supply_authorized consumed. It crosses
  Central twice, as the brief's mechanics ask: the request goes to Central, which asks the CP's
  engine (leg one: request produced -> the engine reads Central's authorize_supply); the engine
  accepts, and Central tells the driver (leg two: acceptance produced -> the driver reads
  supply_authorized);
- telemetry to dashboard: cp_telemetry produced -> the new kWh seen in a `cps` push on /ws;
- lost CP: connection closed (or heartbeats stopped) -> DESCONECTADO seen on /ws.

The fleet authenticates like the real parts do (docs/security.md): each monitor presents its
CP's secret and gets the CP's key; the simulated engines seal their events with it and open
Central's sealed commands; each driver logs in over Kafka (its password encrypted to Central's
identity key) and seals its requests with its session; the dashboard probe and the admin
commands use an admin session cookie. Logins and registrations happen before the warm-up,
outside the measured window.

The fleet rides out faults as the real parts do. A monitor whose link breaks (its Central died,
restarted or failed over) connects and authenticates again, getting a new key; commands sealed
with a key that has not come yet are held until it comes. The engines' events and the drivers'
requests go through an outbox sent in order by one task, so that a broker that is away holds
up the sending, not the metering. A driver's wait for its supply ends with its engine's end of
it or with Central's ticket.

After the window the fleet drains, so that the run ends as an audit needs it: no new supply is
asked for, every supply in progress ends as its driver unplugging, and the fleet waits (`drain`
seconds at most) for those supplies' tickets. With a ledger, the simulated engines write the
lines EV_CP_E's --ledger writes (authorised, tick, ended) and the simulated drivers a line for
each ticket and denial they receive.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import random
import sqlite3
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError, OutOfOrderSequenceNumber
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from EV_Central.admin_api import RegisterCP, ResetSecret
from EV_Central.ctl import LoginRefused as AdminLoginRefused
from EV_Central.ctl import admin_login
from EV_CP_E.ledger import Ledger
from EV_CP_E.machine import amount
from EV_Driver.session import DriverSession, LoginRefused, finish_login, start_login
from shared.backoff import Backoff
from shared.bus import Topics, consume_each
from shared.cp_channel import CPChannel, KeyNotKnown
from shared.errors import MessageError
from shared.framing import ACK_BYTE, Ack, Frame, FrameDecoder, Nack, encode_frame
from shared.kafka_access import KafkaLogin
from shared.messages import (
    DRIVER_UPDATES,
    AuthorizeSupply,
    CentralIdentity,
    CPAuthorisation,
    CPPlugged,
    CPSupplyEnded,
    CPTelemetry,
    EndReason,
    EndSupply,
    IdentityQuery,
    LoginResult,
    Message,
    MonitorAuth,
    RequestDenied,
    StartSupply,
    SupplyAuthorized,
    SupplyRequest,
    Ticket,
    decode,
    encode,
)
from shared.sealing import (
    SealError,
    fingerprint,
    identity_public,
    is_sealed,
    load_identity,
    unb64,
)
from tools.fleet import procstat, promtext
from tools.fleet.accounts import Credentials, seed_database
from tools.fleet.failover import Rotation, parse_addresses
from tools.fleet.stats import summarise

log = logging.getLogger("fleet")
Opened = TypeVar("Opened")

TICK_SECONDS = 1.0  # an engine's telemetry period
TICK_GROUPS = 50  # heartbeats and telemetry are spread over 50 slots a second
ADMIN_BATCH = 100  # admin commands in flight on the admin WebSocket
LOGIN_CONCURRENCY = 50  # driver logins in flight (Central answers them one at a time)
ANSWER_TIMEOUT = 30.0  # seconds to wait for Central's answer to a login or a request
RECONNECT_AUTH_WAIT = 5.0  # a reconnecting monitor waits this long for AUTH's answer (as EV_CP_M)
CP_TURNAROUND_S = 1.0  # after a supply ends, its CP and its driver wait this long to go again
DRAIN_POLL_S = 0.05  # how often the drain looks whether every ticket and answer has come
HELD_COMMANDS = 16  # commands held per CP until its new key comes (as EV_CP_E)
KAFKA_STALL_S = 5.0  # the outbox making no progress this long is said in the log
STOP_TIMEOUT_S = 2.0  # each Kafka client gets this long to stop (as the engine's BUS_STOP_TIMEOUT)


class FleetError(Exception):
    """The fleet cannot run (no credentials, Central refused the admin, ...)."""


@dataclass
class FleetConfig:
    central: str  # HOST:PORT, or a comma-separated list of the Centrals of an HA pair
    broker: str
    admin: str | None  # None: no admin web (no provisioning, dashboard, /metrics, lost CPs)
    cps: int
    supplying: float = 0.2
    duration: float = 60.0
    warmup: float = 10.0
    prefix: str = "SIM"
    supply_seconds: tuple[float, float] = (60.0, 120.0)
    request_rate: float = 100.0  # supply requests a second at most
    kw: float = 22.0
    lose: int = 10  # CPs whose monitor is cut off near the end (half closed, half silent)
    connect_concurrency: int = 200
    central_pid: int | None = None
    db: str | None = None
    admin_user: str = "admin"
    admin_password: str = ""
    credentials: Credentials = field(default_factory=Credentials)
    credentials_path: Path | None = None  # where new secrets are kept for the next run
    central_key: str | None = None  # Central's identity key (base64), pinned
    # Failover runs: the measured window ends early once this file exists (the bench's signal).
    stop_file: Path | None = None
    # Called with each fleet-wide connection event ({"event": "all_connected", ...}).
    on_event: Callable[[dict[str, Any]], None] | None = None
    # The simulated engines' and drivers' ledger (EV_CP_E's --ledger lines, and the drivers'
    # tickets and denials), for an audit that does not take Central's word for it.
    ledger: Path | None = None
    # At the end: seconds to wait for the tickets of the supplies ended then (and the answers
    # to the requests in flight).
    drain: float = 20.0
    kafka: KafkaLogin | None = None  # a secured broker's login (shared/kafka_access.py)


def cp_ids(prefix: str, n: int) -> list[str]:
    width = max(5, len(str(n)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, n + 1)]


def driver_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}D{i:05d}" for i in range(1, n + 1)]


def central_key_from_db(db_path: str) -> str | None:
    """Central's identity public key (base64) from its database; None when it has none yet."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'identity_key'").fetchone()
    return identity_public(load_identity(bytes.fromhex(row[0]))) if row else None


async def stop_tasks(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel TASKS until every one has ended.

    Once is not always enough on Python 3.11: `asyncio.wait_for` can swallow a cancellation that
    comes as its awaitable completes, and a driver task then went on to wait for a supply that
    would never end, holding the whole run open.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)


class MonitorClient(asyncio.Protocol):
    """One CP's monitor: AUTH with its secret, then heartbeats written by the fleet's ticker."""

    __slots__ = (
        "cp_id",
        "secret",
        "fleet",
        "transport",
        "decoder",
        "pending",
        "authed",
        "seq",
        "silent",
        "active_central",
        "accepted",
        "refusal",
    )

    def __init__(self, cp_id: str, secret: str, fleet: Fleet) -> None:
        self.cp_id = cp_id
        self.secret = secret
        self.fleet = fleet
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.pending: collections.deque[float] = collections.deque()
        self.authed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.seq = 0
        self.silent = False
        self.active_central: str | None = None  # named by a standby that refused us
        self.accepted = False
        self.refusal: str | None = None  # Central's reason when it refused this AUTH

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        data = encode(MonitorAuth(cp_id=self.cp_id, secret=self.secret))
        self.pending.append(-1.0)  # the AUTH frame's ACK is not a heartbeat
        self.transport.write(encode_frame(data))

    def data_received(self, data: bytes) -> None:
        fleet = self.fleet
        for event in self.decoder.feed(data):
            if isinstance(event, Ack):
                sent = self.pending.popleft() if self.pending else -1.0
                if sent >= 0 and fleet.measuring:  # only the window's: a long run stays small
                    fleet.heartbeat_rtt.append(time.perf_counter() - sent)
            elif isinstance(event, Nack):
                fleet.nacks += 1
                if self.pending:
                    self.pending.popleft()
            elif isinstance(event, Frame):
                assert self.transport is not None
                self.transport.write(ACK_BYTE)
                message = json.loads(event.data)
                if message.get("type") == "auth_result" and not self.authed.done():
                    accepted = bool(message.get("accepted"))
                    if accepted:
                        fleet.take_key(self.cp_id, str(message["key_id"]), str(message["key"]))
                        self.accepted = True
                    elif message.get("active_central"):
                        # A standby: not a refusal of the CP, a pointer to the active Central.
                        self.active_central = str(message["active_central"])
                        fleet.standby_refusals += 1
                    else:
                        self.refusal = str(message.get("reason"))
                        if not fleet.failover and self.cp_id not in fleet.monitors:
                            # At its first connection (a refusal when it connects again,
                            # as Central starts, is passing: see `attach`).
                            fleet.auth_refusals[self.cp_id] = self.refusal
                    self.authed.set_result(accepted)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        fleet = self.fleet
        if not self.authed.done():
            self.authed.set_result(False)
        elif (
            self.accepted
            and fleet.monitors.get(self.cp_id) is self
            and self.cp_id not in fleet.cut
            and not fleet.stopping
        ):
            # Only the link in use, once authenticated, can be lost (a refusal is counted
            # apart, a link given up while connecting is not in use).
            if not fleet.failover:
                fleet.unexpected_closes += 1
            # As EV_CP_M: connect and authenticate again (to the next Central of the list).
            fleet.monitor_lost(self.cp_id)

    def heartbeat(self) -> None:
        if self.transport is None or self.silent:
            return
        self.seq += 1
        data = (
            b'{"id":"%s","ts":%.6f,"v":1,"type":"heartbeat","cp_id":"%s",'
            b'"engine_ok":true,"seq":%d}'
            % (uuid.uuid4().hex.encode(), time.time(), self.cp_id.encode(), self.seq)
        )
        self.pending.append(time.perf_counter())
        self.transport.write(encode_frame(data))
        self.fleet.heartbeats_sent += 1


@dataclass
class Supply:
    cp_id: str
    session_id: str
    driver_id: str = ""
    price_eur_kwh: float = 0.35
    max_kwh: float | None = None  # what the driver's balance buys: the supply stops there
    seq: int = 0
    kwh: float = 0.0
    started: float = field(default_factory=time.monotonic)
    ends_at: float = 0.0
    length: float = 0.0  # how long the car stays once Central starts the supply
    going: bool = False  # Central said start_supply: energy flows (an engine's SUPPLYING)


@dataclass(slots=True)
class Outgoing:
    """A CP event or a driver's request in the fleet's outbox."""

    topic: str
    key: str  # the CP's or the driver's id: the message is sealed with its key when sent
    message: Message
    withdrawn: bool = False  # a request given up on before it could be sent

    @property
    def reliable(self) -> bool:
        """Sent again until Kafka takes it (telemetry is not: a newer sample follows)."""
        return not isinstance(self.message, CPTelemetry)


@dataclass
class Asking:
    """A driver's supply request, waiting for Central's answer to it."""

    request_id: str
    cp_id: str
    answer: asyncio.Future[Message]
    # perf_counter() when the engine read Central's authorize_supply for it and accepted
    engine_accepted: float | None = None

    def answered_by(self, update: SupplyAuthorized | RequestDenied) -> bool:
        """Whether `update` answers this request (not an earlier one that was given up on)."""
        if isinstance(update, RequestDenied):
            return update.request_id == self.request_id
        return update.cp_id == self.cp_id  # an authorisation names no request: its CP


@dataclass
class Window:
    """What the run measured over its window, for its figures."""

    seconds: float
    before: dict[promtext.Key, float]
    after: dict[promtext.Key, float]
    cpu_before: procstat.ProcSample | None
    cpu_after: procstat.ProcSample | None
    own_cpu: float
    heartbeats_sent: int
    supplying_at_end: int
    provision_s: float
    connect_s: float
    login_s: float


class Fleet:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.kafka_options = config.kafka.client_options() if config.kafka else {}
        self.cp_ids = cp_ids(config.prefix, config.cps)
        slots = max(1, round(config.cps * config.supplying)) if config.supplying > 0 else 0
        self.slots = slots
        self.drivers = driver_ids(config.prefix, max(1, slots))
        self.monitors: dict[str, MonitorClient] = {}
        self.tick_groups: list[list[MonitorClient]] = [[] for _ in range(TICK_GROUPS)]
        self.cut: set[str] = set()
        # cp id -> the driver whose car is there: a request of it, or its supply, in progress
        self.busy: dict[str, str] = {}
        self.free_at: dict[str, float] = {}  # cp id -> when a new request may go to it
        self.supplies: dict[str, Supply] = {}  # cp id -> supply in progress
        # session id -> set when it is over: its engine ended it, or Central sent its ticket
        self.supply_over: dict[str, asyncio.Event] = {}
        self.asking: dict[str, Asking] = {}  # driver id -> its request waiting for an answer
        self.following: set[str] = set()  # drivers waiting for the end of their supply
        # Security: each CP's keys (from its monitor's AUTH) and each driver's login.
        self.credentials = config.credentials
        self.cookie = ""
        self.channels: dict[str, CPChannel] = {}  # cp id -> its keys, as its engine holds them
        self.sessions: dict[str, DriverSession] = {}
        self.answers: dict[str, asyncio.Future[Message]] = {}  # request id -> clear answer
        self.auth_refusals: dict[str, str] = {}  # cp id -> Central's reason
        self.login_refusals: dict[str, str] = {}  # driver id -> Central's reason
        self.unopened = 0  # sealed commands or updates the fleet could not open
        # Commands sealed with a key the CP's monitor has not brought yet (as EV_CP_E holds
        # them): cp id -> the records, opened again once a new key comes.
        self.held: dict[str, collections.deque[ConsumerRecord[bytes, bytes]]] = {}
        self.rekeyed: asyncio.Queue[str] = asyncio.Queue()
        # A CP's events that could not be sealed (its key revoked): sent when a new one comes.
        self.unsealed: dict[str, list[Outgoing]] = {}
        # What the engines and drivers send, in order: a broker that is away holds up the
        # sending, not the simulation.
        self.outbox: collections.deque[Outgoing] = collections.deque()
        self.outbox_changed = asyncio.Event()
        self.queued_telemetry: dict[str, Outgoing] = {}  # cp id -> its sample in the outbox
        self.undelivered: list[Outgoing] = []  # handed to the producer, refused by Kafka
        self.producer_broken = False
        self.send_failures = 0
        self.handed = 0  # items handed to the producer
        self.answered = 0  # items Kafka took or refused
        # Failover: the monitors know several Centrals and follow the active one.
        self.addresses = parse_addresses(config.central)
        self.failover = len(self.addresses) > 1
        self.standby_refusals = 0  # AUTHs a standby refused, naming the active Central
        self.refusals_retried: collections.Counter[str] = collections.Counter()  # by reason
        self.auth_timeouts = 0  # AUTHs of a (re)connecting monitor with no answer in time
        self.down: dict[str, float] = {}  # cp id -> when (wall clock) its link was lost
        self.outages: list[tuple[float, float | None]] = []  # (lost at, back at), wall clock
        self.lost_queue: asyncio.Queue[str] = asyncio.Queue()
        self.reconnects = 0  # monitors authenticated again after their link was lost
        # (sent at, wall clock; latency s or None; "authorised", "denied" or "timeout")
        self.requests_log: list[tuple[float, float | None, str]] = []
        # Measurements (seconds).
        self.heartbeat_rtt: list[float] = []
        self.auth_latency: list[float] = []
        self.auth_latency_warmup: list[float] = []
        # The two legs of request -> authorisation (measured window only; see the docstring).
        self.to_engine_latency: list[float] = []
        self.from_engine_latency: list[float] = []
        self.telemetry_latency: list[float] = []
        self.lost_closed: list[float] = []
        self.lost_silent: list[float] = []
        self.telemetry_pending: dict[str, tuple[float, float]] = {}  # cp -> (kwh, sent)
        self.lost_pending: dict[str, tuple[str, float]] = {}  # cp -> (how, cut at)
        self.heartbeats_sent = 0
        self.telemetry_sent = 0
        self.nacks = 0
        self.unexpected_closes = 0
        self.unexpected_disconnects: set[str] = set()
        self.denied = 0
        self.request_timeouts = 0
        self.supplies_completed = 0
        self.ws_pushes = 0
        self.own_lag: list[float] = []
        self.cpu_samples: list[tuple[float, float, int]] = []  # (t, cpu s, rss)
        self.producer: AIOKafkaProducer | None = None
        self.measuring = False
        self.stopping = False
        # The end of a run: no new supplies, the ones in progress ended, their tickets awaited.
        self.draining = False
        self.ledger: Ledger | None = None
        # Supplies ended (while the tickets are followed: with a ledger, or in the drain) whose
        # ticket has not come yet: session id -> driver id; and the sessions whose ticket came.
        self.unticketed: dict[str, str] = {}
        self.ticketed: set[str] = set()

    # --- monitors -------------------------------------------------------------------------

    async def connect_all(self) -> None:
        if self.failover:
            await self.connect_all_failover()
            return
        host, port = self.config.central.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(self.config.connect_concurrency)
        failures = 0

        async def connect(cp_id: str) -> None:
            nonlocal failures
            secret = self.credentials.cps[cp_id]
            async with limit:
                for attempt in range(5):
                    try:
                        _, client = await loop.create_connection(
                            lambda: MonitorClient(cp_id, secret, self), host, int(port)
                        )
                        if await asyncio.wait_for(client.authed, 30):
                            self.install(cp_id, client)
                            return
                        if cp_id in self.auth_refusals:
                            break  # a wrong secret stays wrong: no retry
                    except (OSError, TimeoutError):
                        await asyncio.sleep(0.5 * (attempt + 1))
                failures += 1

        await asyncio.gather(*(connect(cp) for cp in self.cp_ids))
        if failures:
            log.warning("%d monitors could not authenticate", failures)
        for cp_id, reason in list(self.auth_refusals.items())[:5]:
            log.warning("Central refused the monitor of %s: %s", cp_id, reason)

    async def connect_all_failover(self) -> None:
        """Every monitor on the first Central of its list that accepts it."""
        limit = asyncio.Semaphore(self.config.connect_concurrency)

        async def connect(cp_id: str) -> None:
            async with limit:
                client = await self.attach(
                    cp_id, Rotation(self.addresses), 10, refusal_is_final=True, auth_wait=30
                )
            if client is not None:
                self.install(cp_id, client)

        await asyncio.gather(*(connect(cp) for cp in self.cp_ids))
        failures = len(self.cp_ids) - len(self.monitors)
        if failures:
            log.warning("%d monitors could not authenticate", failures)
        for cp_id, reason in list(self.auth_refusals.items())[:5]:
            log.warning("Central refused the monitor of %s: %s", cp_id, reason)

    async def attach(
        self,
        cp_id: str,
        rotation: Rotation,
        attempts: int | None = None,
        refusal_is_final: bool = False,
        auth_wait: float = RECONNECT_AUTH_WAIT,
    ) -> MonitorClient | None:
        """A monitor authenticated at one of the Centrals, tried as `Rotation` says.

        None after `attempts` failed tries (None: until the fleet stops), or, when
        `refusal_is_final`, as soon as a Central refuses the CP without naming an active
        Central (its secret, at the first connection). A CP that was accepted before has a
        good secret: a refusal then ("no Central is active yet", "cannot reach Kafka") is
        passing, counted and retried like a failed connection.
        """
        loop = asyncio.get_running_loop()
        secret = self.credentials.cps[cp_id]
        tries = 0
        while not self.stopping:
            host, port = rotation.current
            client: MonitorClient | None = None
            try:
                _, client = await loop.create_connection(
                    lambda: MonitorClient(cp_id, secret, self), host, port
                )
                # Shielded: a timeout must not cancel the future connection_lost reads.
                if await asyncio.wait_for(asyncio.shield(client.authed), auth_wait):
                    rotation.served()
                    return client
                if client.refusal is not None:
                    if refusal_is_final:
                        self.auth_refusals[cp_id] = client.refusal
                        return None  # a wrong secret stays wrong: no retry
                    self.refusals_retried[client.refusal] += 1
            except TimeoutError:
                self.auth_timeouts += 1
            except OSError:
                pass
            if client is not None and client.transport is not None:
                client.transport.close()
            pause = rotation.fail(client.active_central if client is not None else None)
            tries += 1
            if attempts is not None and tries >= attempts:
                return None
            if pause:
                await asyncio.sleep(pause)
        return None

    def install(self, cp_id: str, client: MonitorClient) -> None:
        """Make an authenticated monitor the CP's link: its heartbeats go out from now on."""
        old = self.monitors.get(cp_id)
        group = self.tick_groups[len(self.monitors) % TICK_GROUPS]
        if old is not None:
            group = next(g for g in self.tick_groups if old in g)
            group.remove(old)
        group.append(client)
        self.monitors[cp_id] = client
        self.monitor_up(cp_id)

    def monitor_up(self, cp_id: str) -> None:
        """A monitor was authenticated: the end of its outage, if it had one."""
        lost_at = self.down.pop(cp_id, None)
        if lost_at is None:
            return
        now = time.time()
        self.outages.append((lost_at, now))
        if not self.down:
            log.info("every lost monitor link is up again (%d reconnections)", self.reconnects)
            if self.config.on_event is not None:
                self.config.on_event({"event": "all_connected", "t": now})

    def monitor_lost(self, cp_id: str) -> None:
        """An authenticated monitor's link broke (its Central died or restarted): reconnect
        it. Until it is back, no driver asks for a supply there."""
        if cp_id in self.down:
            return
        if not self.down:
            log.warning("the monitor link of %s was lost: reconnecting every lost link", cp_id)
            if self.config.on_event is not None:
                self.config.on_event({"event": "first_lost", "t": time.time()})
        self.down[cp_id] = time.time()
        self.lost_queue.put_nowait(cp_id)

    async def reconnect_lost(self) -> None:
        """Reconnect every monitor whose link broke, each through its list of Centrals."""
        limit = asyncio.Semaphore(self.config.connect_concurrency)
        rotations: dict[str, Rotation] = {}

        async def reconnect(cp_id: str) -> None:
            # The Central that served it is gone: start from the next address of the list
            # (with one Central: the same one, after a pause, until it is back).
            rotation = rotations.setdefault(cp_id, Rotation(self.addresses))
            rotation.fail()
            while not self.stopping:
                async with limit:
                    client = await self.attach(cp_id, rotation)
                if client is None:
                    return
                if client.transport is None:
                    continue  # lost again before it could be used
                self.reconnects += 1
                self.install(cp_id, client)
                client.heartbeat()  # as EV_CP_M, at once: Central sees the CP ready again
                return

        async with asyncio.TaskGroup() as tasks:
            while not self.stopping:
                cp_id = await self.lost_queue.get()
                tasks.create_task(reconnect(cp_id))

    def take_key(self, cp_id: str, key_id: str, key_b64: str) -> None:
        """The key Central issued at the monitor's AUTH: the CP's events are sealed with it."""
        channel = self.channels.get(cp_id)
        if channel is None:
            channel = self.channels[cp_id] = CPChannel(cp_id)
        if channel.take_key(key_id, key_b64):
            waiting = self.unsealed.pop(cp_id, [])
            if waiting:  # first, and in their order
                self.outbox.extendleft(reversed(waiting))
                self.outbox_changed.set()
            if cp_id in self.held:
                self.rekeyed.put_nowait(cp_id)

    async def heartbeats(self) -> None:
        """Every CP sends one heartbeat a second, spread evenly over the second."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        while not self.stopping:
            for client in self.tick_groups[tick % TICK_GROUPS]:
                client.heartbeat()
            tick += 1
            delay = start + tick / TICK_GROUPS - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    # --- engine and drivers on Kafka ------------------------------------------------------

    def new_producer(self) -> AIOKafkaProducer:
        # As the real engines and driver apps publish: every in-sync copy, no duplicates.
        return AIOKafkaProducer(
            bootstrap_servers=self.config.broker,
            linger_ms=0,
            acks="all",
            enable_idempotence=True,
            **self.kafka_options,
        )

    async def send(self, topic: str, key: str, value: bytes) -> None:
        """Send a clear request at once (a login or an identity query, before the run)."""
        assert self.producer is not None
        await self.producer.send(topic, value, key=key.encode())

    def post(self, topic: str, key: str, message: Message) -> Outgoing:
        """Put a CP event or a driver's request in the outbox, sealed when it is sent."""
        if isinstance(message, CPTelemetry):
            waiting = self.queued_telemetry.get(key)
            if waiting is not None:
                waiting.message = message  # only the newest sample waits (as EV_CP_E)
                return waiting
        item = Outgoing(topic, key, message)
        if isinstance(message, CPTelemetry):
            self.queued_telemetry[key] = item
        self.outbox.append(item)
        self.outbox_changed.set()
        return item

    def send_event(self, cp_id: str, event: Message) -> None:
        """A CP event, to be sealed with the CP's key of then (as its engine does)."""
        self.post(Topics.CP_EVENTS, cp_id, event)

    def seal(self, item: Outgoing) -> bytes:
        if item.topic == Topics.CP_EVENTS:
            return self.channels[item.key].seal(item.message)
        return self.sessions[item.key].seal(item.message)

    async def send_outbox(self) -> None:
        """Send the outbox in order, as EV_CP_E sends its own: while Kafka is away, the
        engines go on metering and the drivers on waiting; telemetry that cannot go is
        dropped (a newer sample follows), the rest is sent again until Kafka takes it."""
        backoff = Backoff(maximum=5.0)
        while True:
            if self.undelivered:
                # Again, first and in their order (sealed anew: a new place in the stream).
                log.info(
                    "Kafka did not take %d events or requests: sending them again",
                    len(self.undelivered),
                )
                self.outbox.extendleft(reversed(self.undelivered))
                self.undelivered.clear()
            if not self.outbox:
                self.outbox_changed.clear()
                await self.outbox_changed.wait()
                continue
            item = self.outbox[0]
            if item.withdrawn:
                self.outbox.popleft()
                continue
            if self.producer_broken:
                await self.renew_producer(backoff)
                continue
            assert self.producer is not None
            if self.queued_telemetry.get(item.key) is item:
                del self.queued_telemetry[item.key]  # on its way: a newer sample waits apart
            try:
                value = self.seal(item)
            except SealError as exc:  # no key to seal with: telemetry dropped, the rest waits
                log.warning("cannot seal %s for %s: %s", type(item.message).__name__, item.key, exc)
                self.outbox.popleft()
                if item.reliable and item.topic == Topics.CP_EVENTS:
                    self.unsealed.setdefault(item.key, []).append(item)
                continue
            try:
                delivery = await self.producer.send(item.topic, value, key=item.key.encode())
            except OutOfOrderSequenceNumber:
                self.producer_broken = True
                continue
            except KafkaError as exc:
                if not item.reliable:
                    self.outbox.popleft()  # dropped: a newer sample follows
                    continue
                delay = backoff.next_delay()
                log.warning(
                    "cannot hand %s to Kafka (%s); retrying in %.1f s",
                    type(item.message).__name__,
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self.outbox.popleft()
            self.handed += 1
            delivery.add_done_callback(functools.partial(self.delivered, item))

    def delivered(self, item: Outgoing, delivery: asyncio.Future[Any]) -> None:
        """Kafka's word on an item handed to the producer: a failed one goes again."""
        self.answered += 1
        if delivery.cancelled() or delivery.exception() is None:
            return
        exc = delivery.exception()
        self.send_failures += 1
        if isinstance(exc, OutOfOrderSequenceNumber):
            self.producer_broken = True
        if item.reliable and not self.stopping:
            self.undelivered.append(item)
            self.outbox_changed.set()

    async def watch_outbox(self) -> None:
        """Say once when Kafka keeps the fleet's events and requests waiting, and when it
        takes them again."""
        stalled = False
        answered = self.answered
        while not self.stopping:
            await asyncio.sleep(KAFKA_STALL_S)
            moved, answered = self.answered != answered, self.answered
            waiting = len(self.outbox) + self.handed - self.answered
            if not moved and waiting and not stalled:
                stalled = True
                log.warning(
                    "Kafka has taken nothing from the fleet for %g s (%d events and requests"
                    " waiting; the engines go on metering): waiting for it",
                    KAFKA_STALL_S,
                    waiting,
                )
            elif moved and stalled:
                stalled = False
                log.info("Kafka takes the fleet's events and requests again")

    async def renew_producer(self, backoff: Backoff) -> None:
        """Replace a producer that lost its numbering with the broker (aiokafka then fails
        every later send): a new one gets a new producer id."""
        log.warning("the Kafka producer lost its numbering with the broker; starting a new one")
        old, self.producer = self.producer, None
        if old is not None:
            with contextlib.suppress(KafkaError):
                await old.stop()
        while True:
            producer = self.new_producer()
            try:
                await producer.start()
            except KafkaError as exc:
                with contextlib.suppress(KafkaError):
                    await producer.stop()
                delay = backoff.next_delay()
                log.warning("cannot start a Kafka producer (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            self.producer = producer
            self.producer_broken = False
            return

    async def read_commands(self, consumer: AIOKafkaConsumer) -> None:
        """The simulated engines: accept authorisations and plug in, start supplying on
        Central's start_supply, end supplies on request."""
        await consume_each(consumer, self.on_command, what="Central's commands")

    async def replay_held(self) -> None:
        """Open the commands held for a CP again when its monitor brings a new key."""
        while not self.stopping:
            cp_id = await self.rekeyed.get()
            for record in self.held.pop(cp_id, ()):
                await self.on_command(record)

    async def on_command(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value is None or record.key is None:
            return
        cp_id = record.key.decode("utf-8", "replace")
        channel = self.channels.get(cp_id)
        if cp_id not in self.busy or channel is None:
            return  # not ours to open: a CP with no request of the fleet
        try:
            command = channel.open(record.value)
        except KeyNotKnown as exc:
            # Sealed with the key of an AUTH whose answer has not come yet (a monitor that
            # reconnected after a restart of Central): opened when it comes.
            held = self.held.setdefault(cp_id, collections.deque(maxlen=HELD_COMMANDS))
            held.append(record)
            log.info("a command for %s sealed with key %s, not known yet: held", cp_id, exc.key_id)
            return
        except (SealError, MessageError) as exc:
            self.unopened += 1
            log.warning("cannot open a command for %s: %s", cp_id, exc)
            return
        if (
            isinstance(command, AuthorizeSupply)
            and cp_id not in self.supplies
            and self.busy.get(cp_id) == command.driver_id  # not a stale one for another car
        ):
            if self.draining:
                # The run is ending: the car went away (Central denies the request).
                refused = CPAuthorisation(
                    cp_id=cp_id,
                    session_id=command.session_id,
                    accepted=False,
                    reason="the fleet simulator is stopping",
                )
                self.send_event(cp_id, refused)
                return
            low, high = self.config.supply_seconds
            supply = Supply(
                cp_id,
                command.session_id,
                driver_id=command.driver_id,
                price_eur_kwh=command.price_eur_kwh,
                max_kwh=command.max_kwh,
            )
            supply.length = random.uniform(low, high)
            # A car that Central never starts (its authorisation withdrawn) leaves when the
            # authorisation would have lapsed, unless Central ends it first.
            supply.ends_at = time.monotonic() + command.expires_at - command.ts
            self.supplies[cp_id] = supply
            self.supply_over[supply.session_id] = asyncio.Event()
            accepted = CPAuthorisation(cp_id=cp_id, session_id=supply.session_id, accepted=True)
            asking = self.asking.get(command.driver_id)
            if asking is not None and asking.cp_id == cp_id:
                asking.engine_accepted = time.perf_counter()
            if self.ledger is not None:
                self.ledger.authorised(
                    cp_id=cp_id,
                    session_id=command.session_id,
                    driver_id=command.driver_id,
                    price_eur_kwh=command.price_eur_kwh,
                    max_kwh=command.max_kwh,
                    ts=accepted.ts,
                )
            self.send_event(cp_id, accepted)
            self.send_event(cp_id, CPPlugged(cp_id=cp_id, session_id=supply.session_id))
        elif isinstance(command, StartSupply):
            going = self.supplies.get(cp_id)
            if going is not None and going.session_id == command.session_id and not going.going:
                going.going = True
                going.started = time.monotonic()
                going.ends_at = going.started + going.length
        elif isinstance(command, EndSupply):
            ending = self.supplies.get(cp_id)
            if ending is not None and ending.session_id == command.session_id:
                self.end_supply(ending, command.reason)

    def opened(self, open_: Callable[[bytes], Opened], value: bytes, what: str) -> Opened | None:
        """A sealed value opened, or None (counted and logged) when it cannot be."""
        try:
            return open_(value)
        except (SealError, MessageError) as exc:
            self.unopened += 1
            log.warning("cannot open %s: %s", what, exc)
            return None

    def end_supply(self, supply: Supply, reason: EndReason) -> None:
        """End a supply in progress (once: a second call for it does nothing)."""
        if self.supplies.get(supply.cp_id) is not supply:
            return
        del self.supplies[supply.cp_id]
        kwh = round(supply.kwh, 4)
        ended = CPSupplyEnded(
            cp_id=supply.cp_id,
            session_id=supply.session_id,
            kwh=kwh,
            amount_eur=amount(kwh, supply.price_eur_kwh),
            reason=reason,
            started_at=time.time() - (time.monotonic() - supply.started) if supply.going else None,
        )
        if self.ledger is not None:
            self.ledger.ended(ended, supply.driver_id)
        # A supply Central started is billed, even at 0 kWh; one it never started may have
        # been denied (no ticket at all).
        expected = supply.going and (self.ledger is not None or self.draining)
        if expected and supply.session_id not in self.ticketed:
            self.unticketed[supply.session_id] = supply.driver_id
        self.send_event(supply.cp_id, ended)
        # The next car comes a moment later: Central has the end before the next request.
        self.free_at[supply.cp_id] = time.monotonic() + CP_TURNAROUND_S
        if self.busy.get(supply.cp_id) == supply.driver_id:
            del self.busy[supply.cp_id]
        over = self.supply_over.pop(supply.session_id, None)
        if over is not None:
            over.set()  # its driver goes on
        self.supplies_completed += 1

    async def telemetry(self) -> None:
        """Every supplying CP sends telemetry once a second, spread over the second."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        step = self.config.kw / 3600
        while not self.stopping:
            slot = tick % TICK_GROUPS
            now = time.monotonic()
            for cp_id, supply in list(self.supplies.items()):
                if hash(cp_id) % TICK_GROUPS != slot:
                    continue
                if now >= supply.ends_at:
                    # The car leaves; one Central never started leaves as an engine's lapsed
                    # authorisation does.
                    lapsed = EndReason.AUTHORIZATION_EXPIRED
                    self.end_supply(supply, EndReason.UNPLUGGED if supply.going else lapsed)
                    continue
                if not supply.going or now - supply.started < TICK_SECONDS:
                    # As an engine: no energy before Central's start_supply, and the first
                    # sample a second after it.
                    continue
                supply.seq += 1
                supply.kwh += step
                # As the engine does: the supply stops at the energy the balance buys.
                capped = False
                if supply.max_kwh is not None and supply.kwh >= supply.max_kwh:
                    supply.kwh, capped = supply.max_kwh, True
                kwh = round(supply.kwh, 4)
                sent = time.perf_counter()
                telemetry = CPTelemetry(
                    cp_id=cp_id,
                    session_id=supply.session_id,
                    seq=supply.seq,
                    kw=self.config.kw,
                    kwh=kwh,
                    amount_eur=amount(kwh, supply.price_eur_kwh),
                )
                if self.ledger is not None:
                    self.ledger.tick(telemetry, supply.driver_id)
                self.send_event(cp_id, telemetry)
                self.telemetry_sent += 1
                if self.measuring:
                    self.telemetry_pending[cp_id] = (kwh, sent)
                if capped:
                    self.end_supply(supply, EndReason.BALANCE_EXHAUSTED)
            tick += 1
            delay = start + tick / TICK_GROUPS - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def read_updates(self, consumer: AIOKafkaConsumer) -> None:
        """Central's answers to the drivers: clear ones (identity, logins), then sealed ones."""
        await consume_each(consumer, self.on_update, what="driver updates")

    def on_update(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value is None or record.key is None:
            return
        if not is_sealed(record.value):
            if self.answers:
                self.on_clear_update(record.value)
            return
        driver_id = record.key.decode("utf-8", "replace")
        session = self.sessions.get(driver_id)
        if session is None:
            return  # not one of ours
        asking = self.asking.get(driver_id)
        waiting = asking is not None and not asking.answer.done()
        following = driver_id in self.following  # its ticket ends its wait
        if not waiting and not following and self.ledger is None and not self.draining:
            return  # nobody waits, nothing to record: not worth decrypting
        update = self.opened(session.open, record.value, f"an update for {driver_id}")
        if isinstance(update, Ticket):
            self.on_ticket(update)
        elif isinstance(update, RequestDenied) and self.ledger is not None:
            self.ledger.write(
                "denied",
                driver_id=update.driver_id,
                cp_id=update.cp_id,
                request_id=update.request_id,
                reason=update.reason.value,
                ts=time.time(),  # when the driver received it
            )
        if (
            asking is not None
            and waiting
            and isinstance(update, SupplyAuthorized | RequestDenied)
            and asking.answered_by(update)
        ):
            asking.answer.set_result(update)

    def on_ticket(self, update: Ticket) -> None:
        """A driver's ticket (or a correction of it, or the same again): on the ledger."""
        ticket = update.ticket
        if self.ledger is not None:
            self.ledger.write(
                "ticket",
                driver_id=ticket.driver_id,
                cp_id=ticket.cp_id,
                session_id=ticket.session_id,
                kwh=ticket.kwh,
                amount_eur=ticket.amount_eur,
                price_eur_kwh=ticket.price_eur_kwh,
                reason=ticket.reason.value,
                revision=ticket.revision,
                ts=time.time(),  # when the driver received it
            )
        if self.ledger is not None or self.draining:
            self.ticketed.add(ticket.session_id)
            self.unticketed.pop(ticket.session_id, None)
        # Central settled the supply: its driver goes on, as EV_Driver does with its ticket
        # (even when Central ended it without its engine, e.g. after its monitor was lost).
        over = self.supply_over.get(ticket.session_id)
        if over is not None:
            over.set()

    def on_clear_update(self, value: bytes) -> None:
        try:
            update = decode(DRIVER_UPDATES, value)
        except MessageError:
            return
        if isinstance(update, LoginResult | CentralIdentity):
            waiter = self.answers.get(update.request_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(update)

    async def ask(self, driver_id: str, request: Message) -> Message:
        """Send a clear request (identity query, login) and wait for Central's answer to it."""
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.answers[request.id] = waiter
        try:
            await self.send(Topics.DRIVER_REQUESTS, driver_id, encode(request))
            return await asyncio.wait_for(waiter, ANSWER_TIMEOUT)
        finally:
            del self.answers[request.id]

    async def central_identity(self) -> str:
        """Central's identity key: pinned, else from its database, else asked on Kafka."""
        if self.config.central_key:
            try:
                X25519PublicKey.from_public_bytes(unb64(self.config.central_key, "Central's key"))
            except (SealError, ValueError) as exc:
                raise FleetError(f"the pinned Central key is not an X25519 key: {exc}") from None
            return self.config.central_key
        if self.config.db:
            key = await asyncio.to_thread(central_key_from_db, self.config.db)
            if key:
                return key
        answer = await self.ask(self.drivers[0], IdentityQuery(driver_id=self.drivers[0]))
        assert isinstance(answer, CentralIdentity)
        log.info("Central's identity key (not pinned): fingerprint %s", answer.fingerprint)
        return answer.public_key

    async def log_in_drivers(self) -> None:
        """Every driver logs in over Kafka, as the driver app does."""
        try:
            central_key = await self.central_identity()
        except TimeoutError:
            raise FleetError("Central did not answer the identity query") from None
        log.info("logging %d drivers in (Central %s)", len(self.drivers), fingerprint(central_key))
        limit = asyncio.Semaphore(LOGIN_CONCURRENCY)

        async def log_in(driver_id: str) -> None:
            async with limit:
                for _ in range(3):
                    pending = start_login(
                        central_key, driver_id, self.credentials.drivers[driver_id]
                    )
                    try:
                        answer = await self.ask(driver_id, pending.request)
                    except TimeoutError:
                        continue
                    assert isinstance(answer, LoginResult)
                    try:
                        self.sessions[driver_id] = finish_login(pending, answer)
                    except LoginRefused as exc:
                        self.login_refusals[driver_id] = exc.reason
                    return
                self.login_refusals[driver_id] = "no answer from Central"

        await asyncio.gather(*(log_in(d) for d in self.drivers))
        for driver_id, reason in list(self.login_refusals.items())[:5]:
            log.warning("login of %s failed: %s", driver_id, reason)

    async def driver(self, index: int, driver_id: str) -> None:
        """A driver that keeps one supply going: request at an idle CP, wait, repeat."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(index / self.config.request_rate)
        if driver_id not in self.sessions:
            return  # its login failed (counted)
        while not self.draining:
            now = time.monotonic()
            candidates = [
                cp
                for cp in random.sample(self.cp_ids, min(20, len(self.cp_ids)))
                if cp not in self.busy
                and cp not in self.supplies
                and cp in self.monitors
                and cp not in self.cut
                and cp not in self.down
                and self.free_at.get(cp, 0.0) <= now
            ]
            if not candidates:
                await asyncio.sleep(0.5)
                continue
            cp_id = candidates[0]
            self.busy[cp_id] = driver_id
            request = SupplyRequest(driver_id=driver_id, cp_id=cp_id)
            asking = Asking(request.id, cp_id, loop.create_future())
            self.asking[driver_id] = asking
            sent = time.perf_counter()
            sent_at = time.time()
            in_window = self.measuring
            outgoing = self.post(Topics.DRIVER_REQUESTS, driver_id, request)
            try:
                update = await asyncio.wait_for(asking.answer, ANSWER_TIMEOUT)
            except TimeoutError:
                outgoing.withdrawn = True  # if it is still waiting to be sent
                if self.draining:
                    return  # the run is over
                self.request_timeouts += 1
                if self.failover:  # the failover report's timeline; nobody else reads it
                    self.requests_log.append((sent_at, None, "timeout"))
                self.leave(cp_id, driver_id)
                continue
            finally:
                self.asking.pop(driver_id, None)
            if self.draining:
                return  # the run is over: no more supplies
            outcome = "authorised" if isinstance(update, SupplyAuthorized) else "denied"
            if self.failover:
                self.requests_log.append((sent_at, time.perf_counter() - sent, outcome))
            if not isinstance(update, SupplyAuthorized):
                self.denied += 1
                self.leave(cp_id, driver_id)
                await asyncio.sleep(1)
                continue
            # Requests sent in the measured window count; those of the warm-up (the first wave:
            # every driver at once, while the fleet is still logging in) are reported apart.
            answered = time.perf_counter()
            latency = answered - sent
            (self.auth_latency if in_window else self.auth_latency_warmup).append(latency)
            if in_window and asking.engine_accepted is not None:
                self.to_engine_latency.append(asking.engine_accepted - sent)
                self.from_engine_latency.append(answered - asking.engine_accepted)
            await self.until_over(driver_id, update.session_id)
            # Ask again a moment later: by then Central has settled it (else: driver_busy).
            await asyncio.sleep(CP_TURNAROUND_S)

    def leave(self, cp_id: str, driver_id: str) -> None:
        """The driver's car leaves a CP it asked for in vain (unless a supply is on there)."""
        if self.busy.get(cp_id) == driver_id and cp_id not in self.supplies:
            del self.busy[cp_id]

    async def until_over(self, driver_id: str, session_id: str) -> None:
        """Wait until a supply that was authorised is over: its engine ended it, or Central
        settled it and sent the ticket."""
        over = self.supply_over.get(session_id)
        if over is None:
            return  # over already (the engine ended it before the driver heard it began)
        self.following.add(driver_id)
        try:
            await over.wait()
        finally:
            self.following.discard(driver_id)

    # --- dashboard probe ------------------------------------------------------------------

    async def watch_dashboard(self) -> None:
        while not self.stopping:
            try:
                async with self.admin_ws() as ws:
                    async for raw in ws:
                        self.on_push(json.loads(raw))
            except InvalidStatus as exc:
                log.info("dashboard refused (%s); logging in again", exc)
                await asyncio.sleep(0.5)
                # Central may be going down again meanwhile: the next turn tries once more.
                with contextlib.suppress(
                    OSError, TimeoutError, ConnectionClosed, InvalidHandshake, AdminLoginRefused
                ):
                    await self.log_in_admin()
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
                log.info("dashboard connection ended (%s); reconnecting", exc)
                await asyncio.sleep(0.5)

    def on_push(self, message: dict[str, Any]) -> None:
        if message.get("type") != "cps":
            return
        self.ws_pushes += 1
        now = time.perf_counter()
        for cp in message["cps"]:
            cp_id = cp["id"]
            pending = self.telemetry_pending.get(cp_id)
            if pending is not None and cp.get("kwh") is not None and cp["kwh"] >= pending[0]:
                self.telemetry_latency.append(now - pending[1])
                del self.telemetry_pending[cp_id]
            if cp["state"] == "DESCONECTADO":
                lost = self.lost_pending.pop(cp_id, None)
                if lost is not None:
                    (self.lost_closed if lost[0] == "closed" else self.lost_silent).append(
                        now - lost[1]
                    )
                elif cp_id not in self.cut and self.measuring:
                    self.unexpected_disconnects.add(cp_id)

    async def cut_monitors(self) -> None:
        """Lose some CPs: half close their connection, half just stop their heartbeats."""
        idle = [cp for cp in self.monitors if cp not in self.busy and cp not in self.supplies]
        victims = random.sample(idle, min(self.config.lose, len(idle)))
        for i, cp_id in enumerate(victims):
            client = self.monitors[cp_id]
            self.cut.add(cp_id)
            now = time.perf_counter()
            if i % 2 == 0:
                self.lost_pending[cp_id] = ("closed", now)
                if client.transport is not None:
                    client.transport.abort()
            else:
                self.lost_pending[cp_id] = ("silent", now)
                client.silent = True
            await asyncio.sleep(0.05)

    # --- Central's process ----------------------------------------------------------------

    async def sample_central(self) -> None:
        pid = self.config.central_pid
        if pid is None:
            return
        while not self.stopping:
            with contextlib.suppress(OSError):
                s = procstat.sample(pid)
                self.cpu_samples.append((time.monotonic(), s.cpu_seconds, s.rss_bytes))
            await asyncio.sleep(1.0)

    async def probe_loop(self) -> None:
        """The simulator's own event loop lag: if it is late, its latencies are inflated."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            due = loop.time() + 0.1
            await asyncio.sleep(0.1)
            if self.measuring:
                self.own_lag.append(max(0.0, loop.time() - due))

    async def until_stop_file(self, longest: float) -> None:
        """Wait until the stop file exists, `longest` seconds at most."""
        assert self.config.stop_file is not None
        # A file, not an event: the bench is another process. Polled five times a second.
        for _ in range(max(1, round(longest / 0.2))):
            if self.config.stop_file.exists():
                return
            await asyncio.sleep(0.2)

    def metrics(self) -> dict[promtext.Key, float]:
        if self.config.admin is None:
            return {}
        try:
            with urllib.request.urlopen(f"http://{self.config.admin}/metrics", timeout=10) as r:
                return promtext.parse(r.read().decode())
        except OSError as exc:
            log.warning("cannot read /metrics: %s", exc)
            return {}

    # --- the admin web: a session, and the CPs' secrets ------------------------------------

    async def log_in_admin(self) -> None:
        assert self.config.admin is not None
        host, port = self.config.admin.rsplit(":", 1)
        self.cookie = await admin_login(
            host, int(port), self.config.admin_user, self.config.admin_password, ANSWER_TIMEOUT
        )

    def admin_ws(self) -> ws_connect:
        """The admin WebSocket (/ws) with the fleet's session cookie."""
        return ws_connect(
            f"ws://{self.config.admin}/ws",
            max_size=None,
            open_timeout=30,
            additional_headers={"Cookie": self.cookie},
        )

    def get_json(self, path: str) -> Any:
        """GET one of the admin API's routes with the session cookie (blocking)."""
        request = urllib.request.Request(
            f"http://{self.config.admin}{path}", headers={"Cookie": self.cookie}
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    async def admin_commands(self, commands: list[RegisterCP | ResetSecret]) -> list[Any]:
        """Send admin commands (ADMIN_BATCH at a time); Central's results, in the same order."""
        results: dict[str, Any] = {}
        async with asyncio.timeout(ANSWER_TIMEOUT + len(commands) * 0.1), self.admin_ws() as ws:
            for start in range(0, len(commands), ADMIN_BATCH):
                batch = commands[start : start + ADMIN_BATCH]
                for command in batch:
                    await ws.send(command.model_dump_json())
                waiting = {command.ref for command in batch}
                while waiting:
                    reply = json.loads(await ws.recv())
                    if reply.get("type") == "result" and reply.get("ref") in waiting:
                        waiting.discard(reply["ref"])
                        results[reply["ref"]] = reply
        return [results[command.ref] for command in commands]

    async def provision_cps(self) -> tuple[int, int]:
        """Make sure every CP of the fleet is known to Central and has a secret we hold.

        Unknown CPs are registered over the admin WebSocket (the result carries the secret);
        known ones without a secret in the credentials get a new one (reset_secret).
        Returns (registered, reset).
        """
        known = {cp["id"] for cp in await asyncio.to_thread(self.get_json, "/api/cps")}
        commands: list[RegisterCP | ResetSecret] = []
        for cp_id in self.cp_ids:
            if cp_id not in known:
                commands.append(
                    RegisterCP(
                        id=cp_id,
                        location=f"Fleet site {cp_id}",
                        price_eur_kwh=0.35,
                        max_kw=22.0,
                        ref=cp_id,
                    )
                )
            elif cp_id not in self.credentials.cps:
                commands.append(ResetSecret(target=cp_id, ref=cp_id))
        for command, reply in zip(commands, await self.admin_commands(commands), strict=True):
            if not reply.get("ok") or not reply.get("secret"):
                raise FleetError(f"Central refused {command.type} {command.ref}: {reply}")
            self.credentials.cps[command.ref] = str(reply["secret"])
        registered = sum(isinstance(c, RegisterCP) for c in commands)
        if commands:
            log.info(
                "over the admin WebSocket: %d CPs registered, %d given a new secret",
                registered,
                len(commands) - registered,
            )
        return registered, len(commands) - registered

    # --- the run --------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Provision, connect, log in, measure over the window, drain; the run's figures."""
        if self.config.ledger is not None:
            try:
                self.ledger = Ledger(self.config.ledger)
            except OSError as exc:
                raise FleetError(
                    f"cannot append to the ledger {self.config.ledger}: {exc.strerror or exc}"
                ) from None
        try:
            return await self.measure()
        finally:
            if self.ledger is not None:
                self.ledger.close()

    async def measure(self) -> dict[str, Any]:
        config = self.config
        if config.db:
            # Driver accounts only: Central reads passwords at each login, CPs only at start.
            await asyncio.to_thread(seed_database, config.db, [], self.drivers, self.credentials)
        missing = [d for d in self.drivers if d not in self.credentials.drivers]
        if missing:
            raise FleetError(
                f"no password for {len(missing)} simulated drivers (e.g. {missing[0]}): seed"
                " them with --db, or with `python -m tools.fleet seed ... --credentials FILE`"
            )
        t0 = time.monotonic()
        if config.admin is not None:
            await self.log_in_admin()
            await self.provision_cps()
            if config.credentials_path is not None:
                self.credentials.save(config.credentials_path)
        else:
            unknown = [cp for cp in self.cp_ids if cp not in self.credentials.cps]
            if unknown:
                raise FleetError(
                    f"no secret for {len(unknown)} CPs (e.g. {unknown[0]}) and no --admin to"
                    " register them: seed them with `python -m tools.fleet seed`"
                )
        provision_s = time.monotonic() - t0
        self.producer = self.new_producer()
        # As the real engines and driver apps read: only what a Central's transaction committed
        # (an HA pair publishes in transactions; one Central alone does not, so there it is
        # the same as reading everything).
        commands = AIOKafkaConsumer(
            Topics.CP_COMMANDS,
            bootstrap_servers=config.broker,
            auto_offset_reset="latest",
            isolation_level="read_committed",
            **self.kafka_options,
        )
        updates = AIOKafkaConsumer(
            Topics.DRIVER_UPDATES,
            bootstrap_servers=config.broker,
            auto_offset_reset="latest",
            isolation_level="read_committed",
            **self.kafka_options,
        )
        try:
            await self.producer.start()
            await commands.start()
            await updates.start()
            for consumer in (commands, updates):
                await consumer.seek_to_end()
            async with asyncio.TaskGroup() as tasks:
                # Heartbeats start with the first monitor: the others connect meanwhile.
                background = [
                    tasks.create_task(self.heartbeats()),
                    tasks.create_task(self.read_commands(commands)),
                    tasks.create_task(self.read_updates(updates)),
                    tasks.create_task(self.sample_central()),
                    tasks.create_task(self.probe_loop()),
                    # Lost monitor links, whether Central died, restarted or failed over.
                    tasks.create_task(self.reconnect_lost()),
                    tasks.create_task(self.replay_held()),
                    tasks.create_task(self.send_outbox()),
                    tasks.create_task(self.watch_outbox()),
                ]
                t0 = time.monotonic()
                await self.connect_all()
                connect_s = time.monotonic() - t0
                log.info("%d monitors authenticated in %.1f s", len(self.monitors), connect_s)
                t0 = time.monotonic()
                await self.log_in_drivers()
                login_s = time.monotonic() - t0
                log.info("%d drivers logged in in %.1f s", len(self.sessions), login_s)
                background.append(tasks.create_task(self.telemetry()))
                if config.admin is not None:
                    background.append(tasks.create_task(self.watch_dashboard()))
                drivers = [
                    tasks.create_task(self.driver(i, d))
                    for i, d in enumerate(self.drivers[: self.slots])
                ]
                await asyncio.sleep(config.warmup)
                self.heartbeat_rtt.clear()
                self.measuring = True
                before = await asyncio.to_thread(self.metrics)
                cpu_before = _cpu_of(config.central_pid)
                m0 = time.monotonic()
                own0 = time.process_time()
                hb_sent0 = self.heartbeats_sent
                if config.on_event is not None:
                    config.on_event({"event": "measuring", "t": time.time()})
                if config.stop_file is not None:
                    await self.until_stop_file(config.duration)
                else:
                    await asyncio.sleep(max(0.0, config.duration - 8))
                    await self.cut_monitors()
                    await asyncio.sleep(min(8.0, config.duration))
                window = time.monotonic() - m0
                after = await asyncio.to_thread(self.metrics)
                # None when Central is gone or was restarted (its figures are then not measured).
                cpu_after = _cpu_of(config.central_pid)
                own_cpu = time.process_time() - own0
                hb_sent = self.heartbeats_sent - hb_sent0
                result = self.figures(
                    Window(
                        seconds=window,
                        before=before,
                        after=after,
                        cpu_before=cpu_before,
                        cpu_after=cpu_after,
                        own_cpu=own_cpu,
                        heartbeats_sent=hb_sent,
                        supplying_at_end=len(self.supplies),
                        provision_s=provision_s,
                        connect_s=connect_s,
                        login_s=login_s,
                    )
                )
                # The figures are the window's; what the drain does is reported apart.
                result.update(await self.drain())
                self.stopping = True
                await stop_tasks(background + drivers)
        finally:
            self.stopping = True
            for client in self.monitors.values():
                if client.transport is not None:
                    client.transport.close()
            # Bounded, as an engine's: with Kafka away a flush could wait a long time.
            clients: list[Any] = [commands, updates]
            if self.producer is not None:  # None only while a broken one was being replaced
                clients.append(self.producer)
            for client in clients:
                try:
                    async with asyncio.timeout(STOP_TIMEOUT_S):
                        await client.stop()
                except (TimeoutError, KafkaError) as exc:
                    log.warning("a Kafka client did not stop cleanly: %s", exc or "timed out")
        return result

    async def drain(self) -> dict[str, Any]:
        """End the run as an audit needs it: no new supplies, every one in progress ended as
        its driver unplugging (the engine's usual end, its ended event sent), then up to
        `drain` seconds for the drivers' tickets and the answers to the requests in flight."""
        self.draining = True
        self.measuring = False
        loop = asyncio.get_running_loop()
        started = loop.time()
        ending = list(self.supplies.values())
        for supply in ending:
            self.end_supply(supply, EndReason.UNPLUGGED)
        deadline = started + self.config.drain
        while (
            self.unticketed or self.outbox or any(not a.answer.done() for a in self.asking.values())
        ):
            if loop.time() >= deadline:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        took = loop.time() - started
        if self.unticketed:
            session_id, driver_id = next(iter(self.unticketed.items()))
            log.warning(
                "%d ticket(s) did not come within %g s of the stop (e.g. session %s of %s)",
                len(self.unticketed),
                self.config.drain,
                session_id,
                driver_id,
            )
        else:
            log.info("%d supplies ended at the stop; drained in %.1f s", len(ending), took)
        return {
            "supplies_ended_at_stop": len(ending),
            "drain_s": round(took, 1),
            "tickets_missing": len(self.unticketed),
        }

    def figures(self, w: Window) -> dict[str, Any]:
        """The run's figures, from what it measured over its window."""
        config = self.config
        before, after, window = w.before, w.after, w.seconds

        def delta(name: str, **labels: str) -> float:
            return promtext.value(after, name, **labels) - promtext.value(before, name, **labels)

        def mean_ms(histogram: str, digits: int = 2, **labels: str) -> float | None:
            """A histogram's mean over the window, in ms (None when nothing was observed)."""
            count = delta(f"{histogram}_count", **labels)
            if not count:
                return None
            return round(1000 * delta(f"{histogram}_sum", **labels) / count, digits)

        heartbeats_handled = delta("ev_central_messages_total", type="heartbeat")
        result: dict[str, Any] = {
            "cps": config.cps,
            "supplying_target": self.slots,
            "supplying_at_end": w.supplying_at_end,
            "duration_s": round(window, 1),
            "provision_s": round(w.provision_s, 1),
            "connect_s": round(w.connect_s, 1),
            "monitors_authenticated": len(self.monitors),
            "monitors_refused": len(self.auth_refusals),
            "standby_refusals": self.standby_refusals,
            "login_s": round(w.login_s, 1),
            "drivers_logged_in": len(self.sessions),
            "driver_logins_failed": len(self.login_refusals),
            "unopened_sealed": self.unopened,
            "heartbeats_sent": w.heartbeats_sent,
            "heartbeat_rtt_ms": summarise(self.heartbeat_rtt),
            "request_to_authorisation_ms": summarise(self.auth_latency),
            "request_to_authorisation_warmup_ms": summarise(self.auth_latency_warmup),
            "request_to_engine_ms": summarise(self.to_engine_latency),
            "engine_to_authorisation_ms": summarise(self.from_engine_latency),
            "telemetry_to_dashboard_ms": summarise(self.telemetry_latency),
            "lost_cp_closed_ms": summarise(self.lost_closed),
            "lost_cp_silent_ms": summarise(self.lost_silent),
            "lost_cp_undetected": len(self.lost_pending),
            "unexpected_disconnects": len(self.unexpected_disconnects),
            "unexpected_closes": self.unexpected_closes,
            "monitors_reconnected": self.reconnects,
            "kafka_send_failures": self.send_failures,
            "nacks": self.nacks,
            "denied": self.denied,
            "request_timeouts": self.request_timeouts,
            "supplies_completed": self.supplies_completed,
            "telemetry_sent": self.telemetry_sent,
            "dashboard_pushes": self.ws_pushes,
            "simulator_cpu_s": round(w.own_cpu, 2),
            "central_heartbeats_handled": heartbeats_handled,
            "central_telemetry_handled": delta("ev_central_messages_total", type="cp_telemetry"),
            # Since Central started (logins included): all three must stay 0.
            "central_rejected": promtext.value(after, "ev_central_messages_total", type="rejected"),
            "central_invalid": promtext.value(after, "ev_central_messages_total", type="invalid"),
            "central_handler_errors": promtext.value(
                after, "ev_central_messages_total", type="handler_errors"
            ),
        }
        if w.cpu_before is not None and w.cpu_after is not None:
            cpu = w.cpu_after.cpu_seconds - w.cpu_before.cpu_seconds
            rss = [s[2] for s in self.cpu_samples]
            result["central_cpu_s"] = round(cpu, 2)
            result["central_cpu_percent"] = round(100 * cpu / window, 1)
            result["central_rss_mib"] = round(w.cpu_after.rss_bytes / 2**20, 1)
            result["central_rss_max_mib"] = round(max(rss) / 2**20, 1) if rss else None
            result["central_heartbeats_per_cpu_s"] = (
                round(heartbeats_handled / cpu, 1) if cpu > 0 else None
            )
        result["simulator_loop_lag_ms"] = summarise(self.own_lag)
        if self.failover:
            # Raw timelines (wall clock) for the bench to cut into failover windows.
            result["centrals"] = [f"{host}:{port}" for host, port in self.addresses]
            result["monitors_down_at_end"] = len(self.down)
            result["refusals_retried"] = dict(self.refusals_retried)
            result["auth_timeouts"] = self.auth_timeouts
            result["outages"] = [[round(a, 4), b and round(b, 4)] for a, b in self.outages]
            result["outages"] += [[round(a, 4), None] for a in self.down.values()]
            result["requests"] = [
                [round(sent, 4), latency and round(latency, 5), outcome]
                for sent, latency, outcome in self.requests_log
            ]
        lag_name = "ev_central_event_loop_lag_seconds"
        lag_count = delta(f"{lag_name}_count")
        if lag_count:
            result["central_loop_lag_mean_ms"] = mean_ms(lag_name)
            late = lag_count - delta(f"{lag_name}_bucket", le="0.1")
            result["central_loop_lag_over_100ms_share"] = round(late / lag_count, 4)
        lag = promtext.family(after, "ev_central_consumer_lag")
        result["central_consumer_lag_max"] = max(lag.values()) if lag else None
        # Where a supply request's time goes inside Central, mean ms over the window.
        stage = "ev_central_stage_seconds"
        result["central_stage_mean_ms"] = {
            "arrival": mean_ms(stage, stage="arrival"),
            "handler": mean_ms("ev_central_handler_seconds", type="supply_request"),
            "outbox": mean_ms(stage, stage="outbox"),
            "publish": mean_ms(stage, stage="publish"),
        }
        # In high-availability mode `publish` is one Kafka transaction: its records appended
        # (and copied to the followers), then the commit.
        for part in ("append", "commit"):
            if delta(f"{stage}_count", stage=part):
                result["central_stage_mean_ms"][part] = mean_ms(stage, stage=part)
        # Full garbage collections in the window (they stop Central: see the tail latencies).
        pauses = "ev_central_gc_pause_seconds"
        result["central_full_gc"] = {
            "count": int(delta(f"{pauses}_count", generation="2")),
            "mean_ms": mean_ms(pauses, 1, generation="2"),
        }
        return result


def _cpu_of(pid: int | None) -> procstat.ProcSample | None:
    """Central's CPU and memory now, None without a pid or when that process is gone."""
    if not pid:
        return None
    try:
        return procstat.sample(pid)
    except OSError:
        return None
