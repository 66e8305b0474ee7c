"""The fleet: lean monitor connections, one simulated engine and drivers on Kafka, and probes.

Everything runs in one asyncio process. A monitor connection is an asyncio.Protocol (no task
per CP); one ticker spreads the heartbeats of all CPs over each second, another their
telemetry. Latencies are measured from outside Central:

- heartbeat round trip: frame written -> ACK byte read;
- request to authorisation: supply_request produced -> supply_authorized consumed;
- telemetry to dashboard: cp_telemetry produced -> the new kWh seen in a `cps` push on /ws;
- lost CP: connection closed (or heartbeats stopped) -> DESCONECTADO seen on /ws.

The fleet authenticates like the real parts do (docs/security.md): each monitor presents its
CP's secret and gets the CP's key; the simulated engines seal their events with it and open
Central's sealed commands; each driver logs in over Kafka (its password encrypted to Central's
identity key) and seals its requests with its session; the dashboard probe and the admin
commands use an admin session cookie. Logins and registrations happen before the warm-up,
outside the measured window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
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
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from EV_Central.admin_api import RegisterCP, ResetSecret
from EV_Central.ctl import admin_login
from EV_Driver.session import DriverSession, LoginRefused, finish_login, start_login
from shared.bus import Topics, consume_each
from shared.cp_channel import CPChannel
from shared.errors import MessageError
from shared.framing import ACK_BYTE, Ack, Frame, FrameDecoder, Nack, encode_frame
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
    SupplyAuthorized,
    SupplyRequest,
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

TICK_GROUPS = 50  # heartbeats and telemetry are spread over 50 slots a second
ADMIN_BATCH = 100  # admin commands in flight on the admin WebSocket
LOGIN_CONCURRENCY = 50  # driver logins in flight (Central answers them one at a time)
ANSWER_TIMEOUT = 30.0  # seconds to wait for Central's answer to a login or a request
RECONNECT_AUTH_WAIT = 5.0  # a reconnecting monitor waits this long for AUTH's answer (as EV_CP_M)
CP_TURNAROUND_S = 1.0  # after a supply ends, its CP and its driver wait this long to go again


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
                if sent >= 0:
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
                        fleet.monitor_up(self.cp_id)
                    elif message.get("active_central"):
                        # A standby: not a refusal of the CP, a pointer to the active Central.
                        self.active_central = str(message["active_central"])
                        fleet.standby_refusals += 1
                    else:
                        self.refusal = str(message.get("reason"))
                        if not fleet.failover:
                            fleet.auth_refusals[self.cp_id] = self.refusal
                    self.authed.set_result(accepted)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        fleet = self.fleet
        if not self.authed.done():
            self.authed.set_result(False)
        elif self.accepted and self.cp_id not in fleet.cut and not fleet.stopping:
            # Only a connection that was authenticated can be lost (a refusal is counted apart).
            if fleet.failover:
                fleet.monitor_lost(self.cp_id)  # it goes to the next Central of its list
            else:
                fleet.unexpected_closes += 1

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
    seq: int = 0
    kwh: float = 0.0
    started: float = field(default_factory=time.monotonic)
    ends_at: float = 0.0


class Fleet:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.cp_ids = cp_ids(config.prefix, config.cps)
        slots = max(1, round(config.cps * config.supplying)) if config.supplying > 0 else 0
        self.slots = slots
        self.drivers = driver_ids(config.prefix, max(1, slots))
        self.monitors: dict[str, MonitorClient] = {}
        self.tick_groups: list[list[MonitorClient]] = [[] for _ in range(TICK_GROUPS)]
        self.cut: set[str] = set()
        self.busy: set[str] = set()  # CPs with a request or supply of ours
        self.free_at: dict[str, float] = {}  # cp id -> when a new request may go to it
        self.supplies: dict[str, Supply] = {}  # cp id -> supply in progress
        self.released: dict[str, asyncio.Event] = {}  # cp id -> set when its supply ends
        self.driver_waiters: dict[str, asyncio.Future[Message]] = {}
        # Security: each CP's keys (from its monitor's AUTH) and each driver's login.
        self.credentials = config.credentials
        self.cookie = ""
        self.channels: dict[str, CPChannel] = {}  # cp id -> its keys, as its engine holds them
        self.sessions: dict[str, DriverSession] = {}
        self.answers: dict[str, asyncio.Future[Message]] = {}  # request id -> clear answer
        self.auth_refusals: dict[str, str] = {}  # cp id -> Central's reason
        self.login_refusals: dict[str, str] = {}  # driver id -> Central's reason
        self.unopened = 0  # sealed commands or updates the fleet could not open
        # Failover: the monitors know several Centrals and follow the active one.
        self.addresses = parse_addresses(config.central)
        self.failover = len(self.addresses) > 1
        self.standby_refusals = 0  # AUTHs a standby refused, naming the active Central
        self.refusals_retried: collections.Counter[str] = collections.Counter()  # by reason
        self.auth_timeouts = 0  # AUTHs of a (re)connecting monitor with no answer in time
        self.down: dict[str, float] = {}  # cp id -> when (wall clock) its link was lost
        self.outages: list[tuple[float, float | None]] = []  # (lost at, back at), wall clock
        self.lost_queue: asyncio.Queue[str] = asyncio.Queue()
        # (sent at, wall clock; latency s or None; "authorised", "denied" or "timeout")
        self.requests_log: list[tuple[float, float | None, str]] = []
        # Measurements (seconds).
        self.heartbeat_rtt: list[float] = []
        self.auth_latency: list[float] = []
        self.auth_latency_warmup: list[float] = []
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
                            self.tick_groups[len(self.monitors) % TICK_GROUPS].append(client)
                            self.monitors[cp_id] = client
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
                self.tick_groups[len(self.monitors) % TICK_GROUPS].append(client)
                self.monitors[cp_id] = client

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

    def monitor_up(self, cp_id: str) -> None:
        """A monitor was authenticated: the end of its outage, if it had one."""
        lost_at = self.down.pop(cp_id, None)
        if lost_at is None:
            return
        now = time.time()
        self.outages.append((lost_at, now))
        if not self.down and self.config.on_event is not None:
            self.config.on_event({"event": "all_connected", "t": now})

    def monitor_lost(self, cp_id: str) -> None:
        """An authenticated monitor's link broke (its Central died): reconnect it."""
        if cp_id in self.down:
            return
        if not self.down and self.config.on_event is not None:
            self.config.on_event({"event": "first_lost", "t": time.time()})
        self.down[cp_id] = time.time()
        self.lost_queue.put_nowait(cp_id)

    async def reconnect_lost(self) -> None:
        """Reconnect every monitor whose link broke, each through its list of Centrals."""
        limit = asyncio.Semaphore(self.config.connect_concurrency)
        rotations: dict[str, Rotation] = {}

        async def reconnect(cp_id: str) -> None:
            # The Central that served it is gone: start from the next address of the list.
            rotation = rotations.setdefault(cp_id, Rotation(self.addresses))
            rotation.fail()
            async with limit:
                client = await self.attach(cp_id, rotation)
            old = self.monitors.get(cp_id)
            if client is None or old is None:
                return
            for group in self.tick_groups:
                if old in group:
                    group[group.index(old)] = client
                    break
            self.monitors[cp_id] = client

        async with asyncio.TaskGroup() as tasks:
            while not self.stopping:
                cp_id = await self.lost_queue.get()
                tasks.create_task(reconnect(cp_id))

    def take_key(self, cp_id: str, key_id: str, key_b64: str) -> None:
        """The key Central issued at the monitor's AUTH: the CP's events are sealed with it."""
        channel = self.channels.get(cp_id)
        if channel is None:
            channel = self.channels[cp_id] = CPChannel(cp_id)
        channel.take_key(key_id, key_b64)

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

    async def send(self, topic: str, key: str, value: bytes) -> None:
        assert self.producer is not None
        await self.producer.send(topic, value, key=key.encode())

    async def send_event(self, cp_id: str, event: Message) -> None:
        """A CP event, sealed with the CP's current key (as its engine does)."""
        await self.send(Topics.CP_EVENTS, cp_id, self.channels[cp_id].seal(event))

    async def read_commands(self, consumer: AIOKafkaConsumer) -> None:
        """The simulated engines: accept authorisations and plug in, end supplies on request."""
        await consume_each(consumer, self.on_command, what="Central's commands")

    async def on_command(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value is None or record.key is None:
            return
        cp_id = record.key.decode("utf-8", "replace")
        channel = self.channels.get(cp_id)
        if cp_id not in self.busy or channel is None:
            return  # not ours to open: a CP with no request of the fleet
        command = self.opened(channel.open, record.value, f"a command for {cp_id}")
        if isinstance(command, AuthorizeSupply) and cp_id not in self.supplies:
            low, high = self.config.supply_seconds
            supply = Supply(cp_id, command.session_id)
            supply.ends_at = time.monotonic() + random.uniform(low, high)
            self.supplies[cp_id] = supply
            accepted = CPAuthorisation(cp_id=cp_id, session_id=supply.session_id, accepted=True)
            await self.send_event(cp_id, accepted)
            await self.send_event(cp_id, CPPlugged(cp_id=cp_id, session_id=supply.session_id))
        elif isinstance(command, EndSupply):
            ending = self.supplies.get(cp_id)
            if ending is not None and ending.session_id == command.session_id:
                await self.end_supply(ending, command.reason)

    def opened(self, open_: Callable[[bytes], Opened], value: bytes, what: str) -> Opened | None:
        """A sealed value opened, or None (counted and logged) when it cannot be."""
        try:
            return open_(value)
        except (SealError, MessageError) as exc:
            self.unopened += 1
            log.warning("cannot open %s: %s", what, exc)
            return None

    async def end_supply(self, supply: Supply, reason: EndReason) -> None:
        self.supplies.pop(supply.cp_id, None)
        await self.send_event(
            supply.cp_id,
            CPSupplyEnded(
                cp_id=supply.cp_id,
                session_id=supply.session_id,
                kwh=round(supply.kwh, 4),
                amount_eur=round(supply.kwh * 0.35, 2),
                reason=reason,
                started_at=time.time() - (time.monotonic() - supply.started),
            ),
        )
        # The next car comes a moment later: Central has the end before the next request.
        self.free_at[supply.cp_id] = time.monotonic() + CP_TURNAROUND_S
        self.busy.discard(supply.cp_id)
        self.released.setdefault(supply.cp_id, asyncio.Event()).set()
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
                    await self.end_supply(supply, EndReason.UNPLUGGED)
                    continue
                supply.seq += 1
                supply.kwh += step
                kwh = round(supply.kwh, 4)
                sent = time.perf_counter()
                await self.send_event(
                    cp_id,
                    CPTelemetry(
                        cp_id=cp_id,
                        session_id=supply.session_id,
                        seq=supply.seq,
                        kw=self.config.kw,
                        kwh=kwh,
                        amount_eur=round(kwh * 0.35, 2),
                    ),
                )
                self.telemetry_sent += 1
                if self.measuring:
                    self.telemetry_pending[cp_id] = (kwh, sent)
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
        waiter = self.driver_waiters.get(driver_id)
        session = self.sessions.get(driver_id)
        if waiter is None or waiter.done() or session is None:
            return  # nobody waits: not worth decrypting
        update = self.opened(session.open, record.value, f"an update for {driver_id}")
        if isinstance(update, SupplyAuthorized | RequestDenied):
            waiter.set_result(update)

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
        session = self.sessions.get(driver_id)
        if session is None:
            return  # its login failed (counted)
        while not self.stopping:
            now = time.monotonic()
            candidates = [
                cp
                for cp in random.sample(self.cp_ids, min(20, len(self.cp_ids)))
                if cp not in self.busy
                and cp in self.monitors
                and cp not in self.cut
                and cp not in self.down
                and self.free_at.get(cp, 0.0) <= now
            ]
            if not candidates:
                await asyncio.sleep(0.5)
                continue
            cp_id = candidates[0]
            self.busy.add(cp_id)
            waiter: asyncio.Future[Message] = loop.create_future()
            self.driver_waiters[driver_id] = waiter
            sent = time.perf_counter()
            sent_at = time.time()
            in_window = self.measuring
            await self.send(
                Topics.DRIVER_REQUESTS,
                driver_id,
                session.seal(SupplyRequest(driver_id=driver_id, cp_id=cp_id)),
            )
            try:
                update = await asyncio.wait_for(waiter, ANSWER_TIMEOUT)
            except TimeoutError:
                self.request_timeouts += 1
                self.requests_log.append((sent_at, None, "timeout"))
                self.busy.discard(cp_id)
                continue
            finally:
                self.driver_waiters.pop(driver_id, None)
            outcome = "authorised" if isinstance(update, SupplyAuthorized) else "denied"
            self.requests_log.append((sent_at, time.perf_counter() - sent, outcome))
            if not isinstance(update, SupplyAuthorized):
                self.denied += 1
                self.busy.discard(cp_id)
                await asyncio.sleep(1)
                continue
            # Requests sent in the measured window count; those of the warm-up (the first wave:
            # every driver at once, while the fleet is still logging in) are reported apart.
            latency = time.perf_counter() - sent
            (self.auth_latency if in_window else self.auth_latency_warmup).append(latency)
            # Wait until the supply is over (the engine side ends it), then ask again a moment
            # later: by then Central has settled it (else: denied, driver_busy).
            released = self.released.setdefault(cp_id, asyncio.Event())
            if cp_id in self.busy:
                await released.wait()
            released.clear()
            await asyncio.sleep(CP_TURNAROUND_S)

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
                with contextlib.suppress(OSError, TimeoutError, ConnectionError, InvalidHandshake):
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
        idle = [cp for cp in self.monitors if cp not in self.busy]
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
        # As the real engines and driver apps publish: every in-sync copy, no duplicates.
        self.producer = AIOKafkaProducer(
            bootstrap_servers=config.broker, linger_ms=0, acks="all", enable_idempotence=True
        )
        # As the real engines and driver apps read: only what a Central's transaction committed
        # (an HA pair publishes in transactions; one Central alone does not, so there it is
        # the same as reading everything).
        commands = AIOKafkaConsumer(
            Topics.CP_COMMANDS,
            bootstrap_servers=config.broker,
            auto_offset_reset="latest",
            isolation_level="read_committed",
        )
        updates = AIOKafkaConsumer(
            Topics.DRIVER_UPDATES,
            bootstrap_servers=config.broker,
            auto_offset_reset="latest",
            isolation_level="read_committed",
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
                ]
                if self.failover:
                    background.append(tasks.create_task(self.reconnect_lost()))
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
                before = self.metrics()
                cpu_before = procstat.sample(config.central_pid) if config.central_pid else None
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
                after = self.metrics()
                cpu_after = procstat.sample(config.central_pid) if config.central_pid else None
                own_cpu = time.process_time() - own0
                hb_sent = self.heartbeats_sent - hb_sent0
                supplying_now = len(self.supplies)
                self.stopping = True
                await stop_tasks(background + drivers)
        finally:
            self.stopping = True
            for client in self.monitors.values():
                if client.transport is not None:
                    client.transport.close()
            await commands.stop()
            await updates.stop()
            await self.producer.stop()

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
            "supplying_at_end": supplying_now,
            "duration_s": round(window, 1),
            "provision_s": round(provision_s, 1),
            "connect_s": round(connect_s, 1),
            "monitors_authenticated": len(self.monitors),
            "monitors_refused": len(self.auth_refusals),
            "standby_refusals": self.standby_refusals,
            "login_s": round(login_s, 1),
            "drivers_logged_in": len(self.sessions),
            "driver_logins_failed": len(self.login_refusals),
            "unopened_sealed": self.unopened,
            "heartbeats_sent": hb_sent,
            "heartbeat_rtt_ms": summarise(self.heartbeat_rtt),
            "request_to_authorisation_ms": summarise(self.auth_latency),
            "request_to_authorisation_warmup_ms": summarise(self.auth_latency_warmup),
            "telemetry_to_dashboard_ms": summarise(self.telemetry_latency),
            "lost_cp_closed_ms": summarise(self.lost_closed),
            "lost_cp_silent_ms": summarise(self.lost_silent),
            "lost_cp_undetected": len(self.lost_pending),
            "unexpected_disconnects": len(self.unexpected_disconnects),
            "unexpected_closes": self.unexpected_closes,
            "nacks": self.nacks,
            "denied": self.denied,
            "request_timeouts": self.request_timeouts,
            "supplies_completed": self.supplies_completed,
            "telemetry_sent": self.telemetry_sent,
            "dashboard_pushes": self.ws_pushes,
            "simulator_cpu_s": round(own_cpu, 2),
            "central_heartbeats_handled": heartbeats_handled,
            "central_telemetry_handled": delta("ev_central_messages_total", type="cp_telemetry"),
            # Since Central started (logins included): all three must stay 0.
            "central_rejected": promtext.value(after, "ev_central_messages_total", type="rejected"),
            "central_invalid": promtext.value(after, "ev_central_messages_total", type="invalid"),
            "central_handler_errors": promtext.value(
                after, "ev_central_messages_total", type="handler_errors"
            ),
        }
        if cpu_before is not None and cpu_after is not None:
            cpu = cpu_after.cpu_seconds - cpu_before.cpu_seconds
            rss = [s[2] for s in self.cpu_samples]
            result["central_cpu_s"] = round(cpu, 2)
            result["central_cpu_percent"] = round(100 * cpu / window, 1)
            result["central_rss_mib"] = round(cpu_after.rss_bytes / 2**20, 1)
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
        # Full garbage collections in the window (they stop Central: see the tail latencies).
        pauses = "ev_central_gc_pause_seconds"
        result["central_full_gc"] = {
            "count": int(delta(f"{pauses}_count", generation="2")),
            "mean_ms": mean_ms(pauses, 1, generation="2"),
        }
        return result
