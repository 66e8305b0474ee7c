"""The fleet: lean monitor connections, one simulated engine and drivers on Kafka, and probes.

Everything runs in one asyncio process. A monitor connection is an asyncio.Protocol (no task
per CP); one ticker spreads the heartbeats of all CPs over each second, another their
telemetry. Latencies are measured from outside Central:

- heartbeat round trip: frame written -> ACK byte read;
- request to authorisation: supply_request produced -> supply_authorized consumed;
- telemetry to dashboard: cp_telemetry produced -> the new kWh seen in a `cps` push on /ws;
- lost CP: connection closed (or heartbeats stopped) -> DESCONECTADO seen on /ws.
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
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from shared.bus import Topics
from shared.framing import ACK_BYTE, Ack, Frame, FrameDecoder, Nack, encode_frame
from shared.messages import CPPlugged, CPSupplyEnded, CPTelemetry, EndReason, SupplyRequest, encode
from tools.fleet import procstat, promtext
from tools.fleet.stats import summarise

log = logging.getLogger("fleet")

TICK_GROUPS = 50  # heartbeats and telemetry are spread over 50 slots a second
DRIVER_BALANCE_CENTS = 10_000_000


@dataclass
class FleetConfig:
    central: str
    broker: str
    admin: str
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


def cp_ids(prefix: str, n: int) -> list[str]:
    width = max(5, len(str(n)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, n + 1)]


def driver_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}D{i:05d}" for i in range(1, n + 1)]


def seed_database(db_path: str, cps: list[str], drivers: list[str]) -> None:
    """Register CPs and driver accounts directly in Central's database (idempotent)."""
    now = time.time()
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db, db:
        db.executemany(
            "INSERT OR IGNORE INTO charging_points (id, location, price_eur_kwh, max_kw,"
            " created_at) VALUES (?, ?, ?, ?, ?)",
            [(cp, f"Fleet site {cp}", 0.35, 22.0, now) for cp in cps],
        )
        db.executemany(
            "INSERT OR IGNORE INTO users (id, role, password_hash, balance_cents, created_at)"
            " VALUES (?, 'driver', 'simulated', ?, ?)",
            [(d, DRIVER_BALANCE_CENTS, now) for d in drivers],
        )
        db.execute(
            "UPDATE users SET balance_cents = ? WHERE id LIKE ?",
            (DRIVER_BALANCE_CENTS, drivers[0][:-5] + "%" if drivers else "none"),
        )


class MonitorClient(asyncio.Protocol):
    """One CP's monitor: AUTH, then heartbeats written by the fleet's ticker."""

    __slots__ = ("cp_id", "fleet", "transport", "decoder", "pending", "authed", "seq", "silent")

    def __init__(self, cp_id: str, fleet: Fleet) -> None:
        self.cp_id = cp_id
        self.fleet = fleet
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.pending: collections.deque[float] = collections.deque()
        self.authed = asyncio.get_running_loop().create_future()
        self.seq = 0
        self.silent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        data = json.dumps(
            {"id": uuid.uuid4().hex, "ts": time.time(), "v": 1, "type": "auth", "cp_id": self.cp_id}
        ).encode()
        self.pending.append(-1.0)  # the AUTH frame's ACK is not a heartbeat
        transport.write(encode_frame(data))

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
                    self.authed.set_result(bool(message.get("accepted")))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.authed.done():
            self.authed.set_result(False)
        if self.cp_id not in self.fleet.cut and not self.fleet.stopping:
            self.fleet.unexpected_closes += 1

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
        self.cut: set[str] = set()
        self.busy: set[str] = set()  # CPs with a request or supply of ours
        self.supplies: dict[str, Supply] = {}  # cp id -> supply in progress
        self.released: dict[str, asyncio.Event] = {}  # cp id -> set when its supply ends
        self.driver_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # Measurements (seconds).
        self.heartbeat_rtt: list[float] = []
        self.auth_latency: list[float] = []
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
        host, port = self.config.central.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(self.config.connect_concurrency)
        failures = 0

        async def connect(cp_id: str) -> None:
            nonlocal failures
            async with limit:
                for attempt in range(5):
                    try:
                        _, client = await loop.create_connection(
                            lambda: MonitorClient(cp_id, self), host, int(port)
                        )
                        if await asyncio.wait_for(client.authed, 30):
                            self.monitors[cp_id] = client
                            return
                    except (OSError, TimeoutError):
                        await asyncio.sleep(0.5 * (attempt + 1))
                failures += 1

        await asyncio.gather(*(connect(cp) for cp in self.cp_ids))
        if failures:
            log.warning("%d monitors could not authenticate", failures)

    async def heartbeats(self) -> None:
        """Every CP sends one heartbeat a second, spread evenly over the second."""
        ids = list(self.monitors)
        groups = [ids[i::TICK_GROUPS] for i in range(TICK_GROUPS)]
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        while not self.stopping:
            for cp_id in groups[tick % TICK_GROUPS]:
                self.monitors[cp_id].heartbeat()
            tick += 1
            delay = start + tick / TICK_GROUPS - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    # --- engine and drivers on Kafka ------------------------------------------------------

    async def send(self, topic: str, key: str, value: bytes) -> None:
        assert self.producer is not None
        await self.producer.send(topic, value, key=key.encode())

    async def read_commands(self, consumer: AIOKafkaConsumer) -> None:
        """The simulated engines: answer authorisations with a plug, end supplies on request."""
        async for record in consumer:
            if record.value is None:
                continue
            command = json.loads(record.value)
            cp_id = command.get("cp_id")
            if cp_id not in self.busy:
                continue
            if command.get("type") == "authorize_supply" and cp_id not in self.supplies:
                low, high = self.config.supply_seconds
                supply = Supply(cp_id, command["session_id"])
                supply.ends_at = time.monotonic() + random.uniform(low, high)
                self.supplies[cp_id] = supply
                await self.send(
                    Topics.CP_EVENTS,
                    cp_id,
                    encode(CPPlugged(cp_id=cp_id, session_id=supply.session_id)),
                )
            elif command.get("type") == "end_supply":
                ending = self.supplies.get(cp_id)
                if ending is not None and ending.session_id == command.get("session_id"):
                    await self.end_supply(ending, EndReason(command.get("reason", "unplugged")))

    async def end_supply(self, supply: Supply, reason: EndReason) -> None:
        self.supplies.pop(supply.cp_id, None)
        await self.send(
            Topics.CP_EVENTS,
            supply.cp_id,
            encode(
                CPSupplyEnded(
                    cp_id=supply.cp_id,
                    session_id=supply.session_id,
                    kwh=round(supply.kwh, 4),
                    amount_eur=round(supply.kwh * 0.35, 2),
                    reason=reason,
                    started_at=time.time() - (time.monotonic() - supply.started),
                )
            ),
        )
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
                await self.send(
                    Topics.CP_EVENTS,
                    cp_id,
                    encode(
                        CPTelemetry(
                            cp_id=cp_id,
                            session_id=supply.session_id,
                            seq=supply.seq,
                            kw=self.config.kw,
                            kwh=kwh,
                            amount_eur=round(kwh * 0.35, 2),
                        )
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
        async for record in consumer:
            if record.value is None or record.key is None:
                continue
            waiter = self.driver_waiters.get(record.key.decode())
            if waiter is None or waiter.done():
                continue
            update = json.loads(record.value)
            if update.get("type") in ("supply_authorized", "request_denied"):
                waiter.set_result(update)

    async def driver(self, index: int, driver_id: str) -> None:
        """A driver that keeps one supply going: request at an idle CP, wait, repeat."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(index / self.config.request_rate)
        while not self.stopping:
            candidates = [
                cp
                for cp in random.sample(self.cp_ids, min(20, len(self.cp_ids)))
                if cp not in self.busy and cp in self.monitors and cp not in self.cut
            ]
            if not candidates:
                await asyncio.sleep(0.5)
                continue
            cp_id = candidates[0]
            self.busy.add(cp_id)
            waiter: asyncio.Future[dict[str, Any]] = loop.create_future()
            self.driver_waiters[driver_id] = waiter
            sent = time.perf_counter()
            await self.send(
                Topics.DRIVER_REQUESTS,
                driver_id,
                encode(SupplyRequest(driver_id=driver_id, cp_id=cp_id)),
            )
            try:
                update = await asyncio.wait_for(waiter, 30)
            except TimeoutError:
                self.request_timeouts += 1
                self.busy.discard(cp_id)
                continue
            finally:
                self.driver_waiters.pop(driver_id, None)
            if update["type"] != "supply_authorized":
                self.denied += 1
                self.busy.discard(cp_id)
                await asyncio.sleep(1)
                continue
            # Every request counts, the first wave during the warm-up included.
            self.auth_latency.append(time.perf_counter() - sent)
            # Wait until the supply is over (the engine side ends it), then ask again.
            released = self.released.setdefault(cp_id, asyncio.Event())
            if cp_id in self.busy:
                await released.wait()
            released.clear()

    # --- dashboard probe ------------------------------------------------------------------

    async def watch_dashboard(self) -> None:
        url = f"ws://{self.config.admin}/ws"
        while not self.stopping:
            try:
                async with ws_connect(url, max_size=None, open_timeout=30) as ws:
                    async for raw in ws:
                        self.on_push(json.loads(raw))
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

    def metrics(self) -> dict[promtext.Key, float]:
        try:
            with urllib.request.urlopen(f"http://{self.config.admin}/metrics", timeout=10) as r:
                return promtext.parse(r.read().decode())
        except OSError as exc:
            log.warning("cannot read /metrics: %s", exc)
            return {}

    async def register_missing(self) -> int:
        """Register, over the admin WebSocket, the fleet's CPs that Central does not know."""
        url = f"http://{self.config.admin}/api/cps"
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: ASYNC210 (once, at start)
            known = {cp["id"] for cp in json.loads(resp.read())}
        missing = [cp for cp in self.cp_ids if cp not in known]
        if not missing:
            return 0
        async with ws_connect(f"ws://{self.config.admin}/ws", max_size=None) as ws:
            for cp_id in missing:
                await ws.send(
                    json.dumps(
                        {
                            "type": "register_cp",
                            "id": cp_id,
                            "location": f"Fleet site {cp_id}",
                            "price_eur_kwh": 0.35,
                            "max_kw": 22.0,
                            "ref": cp_id,
                        }
                    )
                )
                async for raw in ws:
                    reply = json.loads(raw)
                    if reply.get("type") == "result" and reply.get("ref") == cp_id:
                        if not reply.get("ok"):
                            raise RuntimeError(f"cannot register {cp_id}: {reply.get('detail')}")
                        break
        log.info("registered %d CPs over the admin WebSocket", len(missing))
        return len(missing)

    # --- the run --------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        config = self.config
        if config.db:
            seed_database(config.db, self.cp_ids, self.drivers)
        self.producer = AIOKafkaProducer(bootstrap_servers=config.broker, linger_ms=2, acks=1)
        await self.producer.start()
        commands = AIOKafkaConsumer(
            Topics.CP_COMMANDS, bootstrap_servers=config.broker, auto_offset_reset="latest"
        )
        updates = AIOKafkaConsumer(
            Topics.DRIVER_UPDATES, bootstrap_servers=config.broker, auto_offset_reset="latest"
        )
        await commands.start()
        await updates.start()
        for consumer in (commands, updates):
            await consumer.seek_to_end()
        await self.register_missing()
        t0 = time.monotonic()
        await self.connect_all()
        connect_s = time.monotonic() - t0
        log.info("%d monitors authenticated in %.1f s", len(self.monitors), connect_s)
        async with asyncio.TaskGroup() as tasks:
            background = [
                tasks.create_task(self.heartbeats()),
                tasks.create_task(self.read_commands(commands)),
                tasks.create_task(self.read_updates(updates)),
                tasks.create_task(self.telemetry()),
                tasks.create_task(self.watch_dashboard()),
                tasks.create_task(self.sample_central()),
                tasks.create_task(self.probe_loop()),
            ]
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
            for task in background + drivers:
                task.cancel()
        for client in self.monitors.values():
            if client.transport is not None:
                client.transport.close()
        await commands.stop()
        await updates.stop()
        await self.producer.stop()

        def delta(name: str, **labels: str) -> float:
            return promtext.value(after, name, **labels) - promtext.value(before, name, **labels)

        heartbeats_handled = delta("ev_central_messages_total", type="heartbeat")
        result: dict[str, Any] = {
            "cps": config.cps,
            "supplying_target": self.slots,
            "supplying_at_end": supplying_now,
            "duration_s": round(window, 1),
            "connect_s": round(connect_s, 1),
            "monitors_authenticated": len(self.monitors),
            "heartbeats_sent": hb_sent,
            "heartbeat_rtt_ms": summarise(self.heartbeat_rtt),
            "request_to_authorisation_ms": summarise(self.auth_latency),
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
        lag_name = "ev_central_event_loop_lag_seconds"
        lag_count = delta(f"{lag_name}_count")
        if lag_count:
            result["central_loop_lag_mean_ms"] = round(
                1000 * delta(f"{lag_name}_sum") / lag_count, 2
            )
            late = lag_count - delta(f"{lag_name}_bucket", le="0.1")
            result["central_loop_lag_over_100ms_share"] = round(late / lag_count, 4)
        lag = promtext.family(after, "ev_central_consumer_lag")
        result["central_consumer_lag_max"] = max(lag.values()) if lag else None
        return result
