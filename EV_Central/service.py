"""Central's core: Kafka handlers, session lifecycle, timers and the outbox relay.

All state changes happen on the event loop. Each handler that changes durable state runs in
one database transaction which records the handled message id and queues the messages to
publish (the outbox); Kafka offsets are committed only after that transaction.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError

from EV_Central.audit import AuditLog
from EV_Central.auth import PeopleAuth
from EV_Central.config import CentralSettings
from EV_Central.db import ACTIVE_STATUSES, Database, Transaction, ticket_from_row
from EV_Central.keys import ChannelKey, KeyStore
from EV_Central.metrics import GcPauses, Histogram
from EV_Central.outbox import OutboxRelay
from EV_Central.passwords import hash_secret, new_secret, verify_secret
from EV_Central.pricing import cap_to_balance, decide_request, max_kwh_for
from EV_Central.registry import ChargingPoint, LiveSession, Registry, SessionPhase
from shared.backoff import Backoff
from shared.bus import KafkaBus, Topics
from shared.errors import MessageError
from shared.messages import (
    CP_EVENTS,
    DRIVER_REQUESTS,
    AuthorizeSupply,
    CentralIdentity,
    CPPlugged,
    CPRequest,
    CPState,
    CPSupplyEnded,
    CPTelemetry,
    DriverHistory,
    DriverNotice,
    DriverStatus,
    EndReason,
    EndSupply,
    HistoryQuery,
    IdentityQuery,
    LoginRequest,
    LoginResult,
    Message,
    RequestAccepted,
    RequestDenied,
    SessionInfo,
    SetService,
    StatusQuery,
    StopRequest,
    SupplyAuthorized,
    SupplyProgress,
    SupplyRequest,
    SupplyStarted,
    Ticket,
    TicketAck,
    decode,
    new_id,
)
from shared.sealing import (
    Channel,
    Sealed,
    SealError,
    b64,
    fingerprint,
    is_sealed,
    login_unwrap,
    parse,
    seal_reply,
)

log = logging.getLogger(__name__)

# Energy differences below this are rounding, not a correction worth a new ticket.
KWH_EPSILON = 1e-4
# Driver updates that travel in clear: the answers a driver gets before it has a key.
CLEAR_DRIVER_UPDATES = (b'"type":"login_result"', b'"type":"central_identity"')
# A monitor that presents a wrong secret waits this long for its answer.
CP_AUTH_FAILURE_DELAY = 0.5
# Rejected sealed messages are audited at most once per principal in this many seconds.
REJECTION_AUDIT_INTERVAL = 10.0
# Driver logins checked at once (each one is a scrypt hash in a worker thread).
LOGIN_CONCURRENCY = 4
# How often the replay guard's progress is written to the database.
REPLAY_SAVE_INTERVAL = 1.0
# Consumer offsets are committed at most this often (and whenever the topics go quiet), not
# after every poll: a commit is a round trip to the broker during which nothing is read. What a
# crash can redeliver is at most this much more, and every handler is idempotent.
COMMIT_INTERVAL = 0.2
# Outbox batches handed to Kafka before the oldest is acknowledged (EV_Central/outbox.py).
OUTBOX_IN_FLIGHT = 4


@dataclass(frozen=True)
class CentralEvent:
    ts: float
    kind: str
    text: str
    cp_id: str | None = None
    driver_id: str | None = None

    def as_api(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "kind": self.kind,
            "text": self.text,
            "cp_id": self.cp_id,
            "driver_id": self.driver_id,
        }


class Central:
    def __init__(self, settings: CentralSettings, bus: KafkaBus, db: Database) -> None:
        self.settings = settings
        self.bus = bus
        self.db = db
        self.audit = AuditLog(db)
        self.people = PeopleAuth(
            db,
            max_failures=settings.lockout_after,
            lock_seconds=settings.lockout_seconds,
            audit=self.audit,
        )
        self.registry = Registry()
        self.events: collections.deque[CentralEvent] = collections.deque(maxlen=200)
        self.counters: collections.Counter[str] = collections.Counter()
        self.broker_ok = False
        # Observability (/metrics): handler latency per message type, lag per partition.
        self.handler_seconds: dict[str, Histogram] = collections.defaultdict(Histogram)
        self.consumer_lag: dict[str, int] = {}
        self.loop_lag = Histogram()  # how late the supervisor's 0.25 s timer fires
        # Where a request's time goes (arrival, outbox, publish): see metrics.render.
        self.stage_seconds: dict[str, Histogram] = collections.defaultdict(Histogram)
        self.gc_pauses = GcPauses()
        # Telemetry of one consumer poll, written in one transaction (latest per session).
        self._telemetry: dict[str, tuple[ChargingPoint, LiveSession, CPTelemetry]] = {}
        self.outbox = OutboxRelay(
            db,
            bus,
            in_flight=OUTBOX_IN_FLIGHT,
            on_broker=self._broker_answers,
            stage_seconds=self.stage_seconds,
        )
        db.on_outbox = self.outbox.wake
        self._dirty: set[str] = set()
        self._dirty_wake = asyncio.Event()
        # Observers (web sockets, console, monitor links) get called with what changed.
        self.cp_listeners: list[Callable[[list[ChargingPoint]], None]] = []
        self.event_listeners: list[Callable[[CentralEvent], None]] = []
        # Called when a session is created or settled (balances may have changed).
        self.session_listeners: list[Callable[[], None]] = []
        # Keys of the sealed channels; every message to an engine or a driver is sealed here.
        self.keys = KeyStore(db)
        bus.outgoing = self._seal_outgoing
        # Set by the monitor server: closes a CP's monitor connection (after a revocation).
        self.disconnect_monitor: Callable[[ChargingPoint], Awaitable[None]] | None = None
        self._rejections_audited: dict[str, float] = {}
        self._replay_saved_at = 0.0
        self._logins: set[asyncio.Task[None]] = set()
        self._login_slots = asyncio.Semaphore(LOGIN_CONCURRENCY)

    # --- start-up ------------------------------------------------------------------------

    async def load(self) -> None:
        """Load every registered CP (DESCONECTADO until its monitor connects) and live sessions."""
        await self.keys.load()
        log.info(
            "identity key %s (fingerprint %s)",
            self.keys.identity_public,
            fingerprint(self.keys.identity_public),
        )
        for row in await self.db.read("SELECT * FROM charging_points ORDER BY id"):
            self.registry.add(
                ChargingPoint(
                    id=row["id"],
                    location=row["location"],
                    price_eur_kwh=row["price_eur_kwh"],
                    max_kw=row["max_kw"],
                    in_service=bool(row["in_service"]),
                )
            )
        now = time.time()
        active = await self.db.read(
            f"SELECT * FROM sessions WHERE status IN ({','.join('?' * len(ACTIVE_STATUSES))})",
            ACTIVE_STATUSES,
        )
        for row in active:
            cp = self.registry.get(row["cp_id"])
            if cp is None:
                continue
            live = LiveSession(
                session_id=row["id"],
                driver_id=row["driver_id"],
                phase=row["status"],
                price_eur_kwh=row["price_eur_kwh"],
                kw=row["kw"],
                kwh=row["kwh"],
                # Restarted: give engines time to report what happened while we were away.
                last_telemetry_at=now,
                last_seq=row["last_telemetry_seq"] or -1,
                expires_at=row["expires_at"],
            )
            if row["status"] == SessionPhase.ENDING:
                live.end_reason = row["reason"]
                live.settle_deadline = now + self.settings.monitor_grace
            cp.session = live
        self.note("start", f"loaded {len(self.registry.cps)} CPs, {len(active)} live sessions")
        # Publish every CP's state once, so that readers of the compacted state topic (the
        # dashboards) know every registered CP, connected or not.
        for cp in self.registry.sorted():
            self.changed(cp)

    # --- notifications -------------------------------------------------------------------

    def note(
        self, kind: str, text: str, cp_id: str | None = None, driver_id: str | None = None
    ) -> None:
        event = CentralEvent(time.time(), kind, text, cp_id, driver_id)
        self.events.append(event)
        log.info("%s", text)
        for listener in self.event_listeners:
            listener(event)

    def sessions_changed(self) -> None:
        for listener in self.session_listeners:
            listener()

    def changed(self, cp: ChargingPoint) -> None:
        """Mark a CP as changed: its state is published and pushed shortly, coalesced."""
        self._dirty.add(cp.id)
        self._dirty_wake.set()

    async def _publish_changes(self) -> None:
        while True:
            await self._dirty_wake.wait()
            await asyncio.sleep(0.05)  # coalesce bursts into one push
            self._dirty_wake.clear()
            ids, self._dirty = self._dirty, set()
            cps = [cp for cp_id in sorted(ids) if (cp := self.registry.get(cp_id))]
            for listener in self.cp_listeners:
                listener(cps)
            for cp in cps:
                await self.bus.post(Topics.CP_STATE, cp.id, cp.state_message())

    # --- the Kafka consumer ---------------------------------------------------------------

    async def _consume(self) -> None:
        consumer = await self.bus.group_consumer(
            [Topics.DRIVER_REQUESTS, Topics.CP_EVENTS], "ev-central"
        )
        backoff = Backoff()
        committed_at = 0.0
        uncommitted = False
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=500)
                self.broker_ok = True
            except KafkaError as exc:
                self.broker_ok = False
                delay = backoff.next_delay()
                log.warning(
                    "cannot read from Kafka (%s); retrying in %.1f s", type(exc).__name__, delay
                )
                await asyncio.sleep(delay)
                continue
            if not batches and not uncommitted:
                continue
            # Driver requests first: they wait for an answer, telemetry does not. Different
            # topics have no order between them, so this reorders nothing that has one.
            for tp, records in sorted(
                batches.items(), key=lambda item: item[0].topic != Topics.DRIVER_REQUESTS
            ):
                for record in records:
                    await self._dispatch(tp.topic, record)
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    lag = highwater - (records[-1].offset + 1)
                    self.consumer_lag[f"{tp.topic}/{tp.partition}"] = max(0, lag)
            try:
                await self._flush_telemetry()
            except Exception:
                self.counters["handler_errors"] += 1
                log.exception("writing a batch of telemetry failed")
            # Everything read so far is durable now: its offsets may be committed.
            uncommitted = True
            now = time.monotonic()
            if batches and now - committed_at < COMMIT_INTERVAL:
                continue
            try:
                await consumer.commit()
                committed_at, uncommitted = now, False
                backoff.reset()
            except KafkaError as exc:
                # Not fatal: handlers are idempotent, a redelivery changes nothing.
                log.warning("cannot commit offsets (%s); will retry", type(exc).__name__)

    async def _dispatch(self, topic: str, record: ConsumerRecord[bytes, bytes]) -> None:
        key = record.key.decode("utf-8", "replace") if record.key else ""
        started = time.perf_counter()
        kind: str
        try:
            if topic == Topics.DRIVER_REQUESTS:
                request = self._open_driver_request(record, key)
                self.counters[request.type] += 1
                if isinstance(request, SupplyRequest):
                    self.stage_seconds["arrival"].observe(max(0.0, time.time() - request.ts))
                await self._flush_telemetry()
                await self._on_driver_request(request)
                kind = request.type
            else:
                event = self._open_cp_event(record, key)
                self.counters[event.type] += 1
                if isinstance(event, CPTelemetry):
                    self._stage_telemetry(event)
                else:
                    # Keep the order of one CP's events: its earlier telemetry is written first.
                    await self._flush_telemetry()
                    await self._on_cp_event(event)
                kind = event.type
            self.handler_seconds[kind].observe(time.perf_counter() - started)
        except SealError as exc:
            self.counters["rejected"] += 1
            log.warning(
                "rejected a message on %s (offset %d, key %r): %s", topic, record.offset, key, exc
            )
            await self._audit_rejection(topic, key, str(exc))
        except MessageError as exc:
            self.counters["invalid"] += 1
            log.warning(
                "skipped an invalid message on %s (offset %d): %s", topic, record.offset, exc
            )
        except Exception:
            # A bug must not stop Central from serving everyone else; the log has the details.
            self.counters["handler_errors"] += 1
            log.exception("handler failed for %s offset %d", topic, record.offset)
        await self.outbox.hand_over_new()  # the reply leaves now, not on the relay's next turn

    # --- sealed channels ----------------------------------------------------------------------

    def _open_driver_request(self, record: ConsumerRecord[bytes, bytes], key: str) -> Any:
        value = record.value or b""
        if not is_sealed(value):
            request = decode(DRIVER_REQUESTS, value)
            if not isinstance(request, LoginRequest | IdentityQuery):
                raise SealError(f"a {request.type} must be sealed with the driver's key")
            if request.driver_id != key:
                raise MessageError(f"key {key!r} does not match driver {request.driver_id!r}")
            return request
        request, envelope = self._open_sealed(value, key, "driver", "driver-request")
        if isinstance(request, LoginRequest | IdentityQuery):
            raise SealError(f"a {request.type} is not sent sealed")
        self.keys.accepted(envelope)
        return request

    def _open_cp_event(self, record: ConsumerRecord[bytes, bytes], key: str) -> Any:
        value = record.value or b""
        if not is_sealed(value):
            raise SealError("CP events must be sealed with the CP's key")
        event, envelope = self._open_sealed(value, key, "cp", "cp-event")
        self.keys.accepted(envelope)
        return event

    def _open_sealed(
        self, value: bytes, key: str, kind: str, channel: Channel
    ) -> tuple[Any, Sealed]:
        """The message in an envelope under record key `key`, authenticated (not yet accepted:
        the caller accepts it once its own checks pass)."""
        envelope = parse(value)
        if envelope.principal != key:
            raise SealError(f"key {key!r} does not match sealed principal {envelope.principal!r}")
        plaintext, channel_key = self.keys.open(envelope, kind, channel)
        message: Any = (
            decode(DRIVER_REQUESTS, plaintext) if kind == "driver" else decode(CP_EVENTS, plaintext)
        )
        self._check_opened(envelope.id, envelope.principal, message, channel_key)
        return message, envelope

    @staticmethod
    def _check_opened(envelope_id: str, principal: str, message: Any, key: ChannelKey) -> None:
        """The sealed message must be the one the envelope names, from the key's owner."""
        if message.id != envelope_id:
            raise SealError("the sealed message id differs from the envelope's")
        owner = getattr(message, "driver_id", None) if key.kind == "driver" else message.cp_id
        if owner != principal:
            raise SealError(f"a message of {owner!r} sealed with {principal!r}'s key")
        refusal = key.refusal(message.ts, time.time())
        if refusal is not None:
            raise SealError(refusal)

    def _seal_outgoing(self, topic: str, key: str, value: bytes) -> list[bytes]:
        """What Central publishes to engines and drivers goes sealed with their keys."""
        if topic == Topics.CP_COMMANDS:
            return self.keys.seal_for_cp(key, json.loads(value)["id"], value)
        if topic == Topics.DRIVER_UPDATES:
            if any(marker in value for marker in CLEAR_DRIVER_UPDATES):
                return [value]
            return self.keys.seal_for_driver(key, json.loads(value)["id"], value)
        return [value]

    async def _audit(
        self, action: str, outcome: str, *, actor: str = "", source: str = "", detail: str = ""
    ) -> None:
        await self.audit.record(action, outcome, actor=actor, source=source, detail=detail)

    async def _audit_rejection(self, topic: str, principal: str, why: str) -> None:
        now = time.monotonic()
        if now - self._rejections_audited.get(principal, -1e9) < REJECTION_AUDIT_INTERVAL:
            return
        if len(self._rejections_audited) > 10_000:
            self._rejections_audited.clear()
        self._rejections_audited[principal] = now
        await self._audit(
            "message_rejected", "refused", actor=principal[:32], source=topic, detail=why
        )

    async def _on_driver_request(self, request: Message) -> None:
        match request:
            case SupplyRequest():
                await self.request_supply(
                    request.id, request.ts, request.driver_id, request.cp_id, request.origin
                )
            case StopRequest():
                await self._on_stop_request(request)
            case StatusQuery():
                await self._on_status_query(request)
            case TicketAck():
                async with self.db.transaction() as tx:
                    await tx.execute(
                        "UPDATE sessions SET ticket_seen = ticket_revision"
                        " WHERE id = ? AND driver_id = ?",
                        (request.session_id, request.driver_id),
                    )
            case LoginRequest():
                # A login costs a slow hash: it runs beside the consumer, not in its way.
                task = asyncio.create_task(self._login_task(request), name="driver-login")
                self._logins.add(task)
                task.add_done_callback(self._logins.discard)
            case IdentityQuery():
                await self.bus.post(
                    Topics.DRIVER_UPDATES,
                    request.driver_id,
                    CentralIdentity(
                        driver_id=request.driver_id,
                        request_id=request.id,
                        public_key=self.keys.identity_public,
                        fingerprint=fingerprint(self.keys.identity_public),
                    ),
                )
            case HistoryQuery():
                await self._on_history(request)

    async def _on_cp_event(self, event: Message) -> None:
        match event:
            case CPRequest():
                await self.request_supply(event.id, event.ts, event.driver_id, event.cp_id, "cp")
            case CPPlugged():
                await self._on_plugged(event)
            case CPTelemetry():
                self._stage_telemetry(event)
                await self._flush_telemetry()
            case CPSupplyEnded():
                await self._on_supply_ended(event)

    # --- supply requests ------------------------------------------------------------------

    async def request_supply(
        self, message_id: str, sent_at: float, driver_id: str, cp_id: str, origin: str
    ) -> None:
        now = time.time()
        cp = self.registry.get(cp_id)
        accepted: LiveSession | None = None
        async with self.db.transaction() as tx:
            if await tx.seen(message_id):
                return
            user = await tx.fetchone(
                "SELECT role, balance_cents FROM users WHERE id = ?", (driver_id,)
            )
            balance = int(user["balance_cents"]) if user else 0
            busy = await tx.fetchone(
                "SELECT 1 FROM sessions WHERE driver_id = ? AND status IN (?, ?, ?)",
                (driver_id, *ACTIVE_STATUSES),
            )
            price = cp.price_eur_kwh if cp else 0.0
            reason = decide_request(
                driver_known=user is not None and user["role"] == "driver",
                cp_known=cp is not None,
                cp_available=cp is not None and cp.available,
                driver_busy=busy is not None,
                balance_cents=balance,
                price_eur_kwh=price,
                age_s=now - sent_at,
                max_age_s=self.settings.request_ttl,
            )
            session_id = new_id()[:16]
            status = "DENIED" if reason else "AUTHORISED"
            expires_at = now + self.settings.authorization_ttl
            await tx.execute(
                "INSERT INTO sessions (id, cp_id, driver_id, request_id, origin, status,"
                " price_eur_kwh, max_kw, requested_at, authorized_at, expires_at, reason)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session_id,
                    cp_id,
                    driver_id,
                    message_id,
                    origin,
                    status,
                    price,
                    cp.max_kw if cp else 0,
                    sent_at,
                    None if reason else now,
                    None if reason else expires_at,
                    reason.value if reason else None,
                ),
            )
            if reason is not None:
                await tx.publish(
                    Topics.DRIVER_UPDATES,
                    driver_id,
                    RequestDenied(
                        driver_id=driver_id,
                        cp_id=cp_id,
                        request_id=message_id,
                        reason=reason,
                        detail=self._denial_detail(reason, cp),
                    ),
                )
            else:
                assert cp is not None
                await tx.publish(
                    Topics.DRIVER_UPDATES,
                    driver_id,
                    RequestAccepted(
                        driver_id=driver_id,
                        cp_id=cp_id,
                        request_id=message_id,
                        session_id=session_id,
                    ),
                )
                await tx.publish(
                    Topics.CP_COMMANDS,
                    cp_id,
                    AuthorizeSupply(
                        cp_id=cp_id,
                        session_id=session_id,
                        driver_id=driver_id,
                        price_eur_kwh=price,
                        max_kw=cp.max_kw,
                        max_kwh=max_kwh_for(balance, price),
                        expires_at=expires_at,
                    ),
                )
                await tx.publish(
                    Topics.DRIVER_UPDATES,
                    driver_id,
                    SupplyAuthorized(
                        driver_id=driver_id,
                        cp_id=cp_id,
                        session_id=session_id,
                        price_eur_kwh=price,
                        expires_at=expires_at,
                    ),
                )
                accepted = LiveSession(
                    session_id=session_id,
                    driver_id=driver_id,
                    phase=SessionPhase.AUTHORISED,
                    price_eur_kwh=price,
                    expires_at=expires_at,
                )
                # Reserve the CP before the commit yields, so no other request can take it.
                cp.session = accepted
            await tx.mark_processed(message_id)
        self.sessions_changed()
        if accepted is not None and cp is not None:
            self.changed(cp)
            self.note(
                "authorised",
                f"{cp_id}: supply authorised for {driver_id} "
                f"({origin} request, session {session_id})",
                cp_id,
                driver_id,
            )
        else:
            self.note(
                "denied", f"{cp_id}: request from {driver_id} denied ({reason})", cp_id, driver_id
            )

    @staticmethod
    def _denial_detail(reason: Any, cp: ChargingPoint | None) -> str:
        if cp is not None and reason.value == "cp_unavailable":
            return f"{cp.id} is {cp.state.value}" + (" and busy" if cp.session else "")
        return ""

    # --- engine events --------------------------------------------------------------------

    async def _on_plugged(self, event: CPPlugged) -> None:
        cp = self.registry.get(event.cp_id)
        started = False
        async with self.db.transaction() as tx:
            if await tx.seen(event.id):
                return
            row = await tx.fetchone("SELECT * FROM sessions WHERE id = ?", (event.session_id,))
            if row is not None and row["status"] == "AUTHORISED" and row["cp_id"] == event.cp_id:
                await tx.execute(
                    "UPDATE sessions SET status = 'SUPPLYING', started_at = ? WHERE id = ?",
                    (event.ts, event.session_id),
                )
                await tx.publish(
                    Topics.DRIVER_UPDATES,
                    row["driver_id"],
                    SupplyStarted(
                        driver_id=row["driver_id"], cp_id=event.cp_id, session_id=event.session_id
                    ),
                )
                started = True
                self.sessions_changed()
            else:
                # Plugged into a session that expired or was never ours: stop the engine.
                await tx.publish(
                    Topics.CP_COMMANDS,
                    event.cp_id,
                    EndSupply(
                        cp_id=event.cp_id,
                        session_id=event.session_id,
                        reason=EndReason.AUTHORIZATION_EXPIRED,
                    ),
                )
            await tx.mark_processed(event.id)
        if (
            started
            and cp is not None
            and cp.session is not None
            and cp.session.session_id == event.session_id
        ):
            cp.session.phase = SessionPhase.SUPPLYING
            cp.session.last_telemetry_at = time.time()
            self.changed(cp)
            self.note(
                "started", f"{cp.id}: supplying {cp.session.driver_id}", cp.id, cp.session.driver_id
            )

    def _stage_telemetry(self, event: CPTelemetry) -> None:
        """Take a telemetry sample into memory; `_flush_telemetry` makes it durable."""
        cp = self.registry.get(event.cp_id)
        live = cp.session if cp is not None else None
        if cp is None or live is None or live.session_id != event.session_id:
            return  # late figures of a settled session: its final event carries the total
        if event.seq <= live.last_seq:
            return  # a redelivery or an older sample
        live.last_seq = event.seq
        live.kw = event.kw
        live.kwh = max(live.kwh, event.kwh)
        live.last_telemetry_at = time.time()
        self._telemetry[live.session_id] = (cp, live, event)

    async def _flush_telemetry(self) -> None:
        """Write the staged telemetry in one transaction, then tell drivers and check balances.

        Runs before any other event is handled and at the end of every consumer poll, before
        the offsets are committed: a sample is durable before its offset is.
        """
        if not self._telemetry:
            return
        staged, self._telemetry = self._telemetry, {}
        started = time.perf_counter()
        rows = [
            (event.kw, live.kwh, live.last_telemetry_at, live.last_seq, live.session_id)
            for _, live, event in staged.values()
        ]
        drivers = sorted({live.driver_id for _, live, _ in staged.values()})
        balances: dict[str, int] = {}
        async with self.db.transaction() as tx:
            # kwh only grows and seq only moves forward, whatever order rows arrive in.
            await tx.executemany(
                "UPDATE sessions SET kw = ?, kwh = MAX(kwh, ?), last_telemetry_at = ?,"
                " last_telemetry_seq = MAX(COALESCE(last_telemetry_seq, -1), ?) WHERE id = ?",
                rows,
            )
            for i in range(0, len(drivers), 500):
                chunk = drivers[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for row in await tx.fetchall(
                    f"SELECT id, balance_cents FROM users WHERE id IN ({marks})", chunk
                ):
                    balances[row["id"]] = int(row["balance_cents"])
        self.handler_seconds["telemetry_batch"].observe(time.perf_counter() - started)
        for cp, live, event in staged.values():
            self.changed(cp)
            await self.bus.post(
                Topics.DRIVER_UPDATES,
                live.driver_id,
                SupplyProgress(
                    driver_id=live.driver_id,
                    cp_id=cp.id,
                    session_id=live.session_id,
                    kw=event.kw,
                    kwh=round(live.kwh, 4),
                    amount_eur=live.amount_eur,
                ),
            )
            balance = balances.get(live.driver_id, 0)
            if (
                cp.session is live
                and live.phase == SessionPhase.SUPPLYING
                and live.amount_eur * 100 >= balance
            ):
                await self.begin_end(
                    cp, EndReason.BALANCE_EXHAUSTED, self.settings.end_grace, tell_engine=True
                )

    async def _on_supply_ended(self, event: CPSupplyEnded) -> None:
        cp = self.registry.get(event.cp_id)
        async with self.db.transaction() as tx:
            if await tx.seen(event.id):
                return
            row = await tx.fetchone("SELECT * FROM sessions WHERE id = ?", (event.session_id,))
            if row is not None and row["cp_id"] == event.cp_id:
                if row["status"] in ACTIVE_STATUSES:
                    # The engine knows why it stopped (it also reports Central's own reasons).
                    reason = event.reason
                    await self._settle(
                        tx, row, max(event.kwh, row["kwh"]), reason, started_at=event.started_at
                    )
                elif (
                    row["status"] in ("COMPLETED", "ABORTED")
                    and event.kwh > row["kwh"] + KWH_EPSILON
                ):
                    await self._correct(tx, row, event.kwh)
            await tx.mark_processed(event.id)
        self._release(cp, event.session_id)

    # --- ending and settling --------------------------------------------------------------

    async def begin_end(
        self, cp: ChargingPoint, reason: EndReason, grace: float, *, tell_engine: bool
    ) -> None:
        """Start ending a CP's session: settle when the engine reports, or after `grace`."""
        live = cp.session
        if live is None or live.phase == SessionPhase.ENDING:
            return
        was_supplying = live.phase == SessionPhase.SUPPLYING
        live.phase = SessionPhase.ENDING
        live.end_reason = reason.value
        live.settle_deadline = time.time() + (grace if was_supplying else 0.0)
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE sessions SET status = 'ENDING', reason = ? WHERE id = ? AND status IN"
                " ('AUTHORISED', 'SUPPLYING')",
                (reason.value, live.session_id),
            )
        if tell_engine:
            await self.bus.post(
                Topics.CP_COMMANDS,
                cp.id,
                EndSupply(cp_id=cp.id, session_id=live.session_id, reason=reason),
            )
        if was_supplying:
            await self.bus.post(
                Topics.DRIVER_UPDATES,
                live.driver_id,
                DriverNotice(
                    driver_id=live.driver_id,
                    level="error" if reason != EndReason.DRIVER_STOP else "info",
                    text=f"supply at {cp.id} is ending: {reason.value}",
                ),
            )
        self.changed(cp)
        self.note(
            "ending",
            f"{cp.id}: ending supply of {live.driver_id} ({reason.value})",
            cp.id,
            live.driver_id,
        )

    async def settle_now(self, cp: ChargingPoint) -> None:
        """Settle an ending session with the energy of its last telemetry."""
        live = cp.session
        if live is None:
            return
        async with self.db.transaction() as tx:
            row = await tx.fetchone("SELECT * FROM sessions WHERE id = ?", (live.session_id,))
            if row is not None and row["status"] in ACTIVE_STATUSES:
                reason = EndReason(live.end_reason or row["reason"] or EndReason.ENGINE_LOST)
                await self._settle(tx, row, max(live.kwh, row["kwh"]), reason)
        self._release(cp, live.session_id)

    async def _settle(
        self,
        tx: Transaction,
        row: Any,
        kwh: float,
        reason: EndReason,
        started_at: float | None = None,
    ) -> None:
        now = time.time()
        user = await tx.fetchone(
            "SELECT balance_cents FROM users WHERE id = ?", (row["driver_id"],)
        )
        balance = int(user["balance_cents"]) if user else 0
        never_plugged = row["status"] == "AUTHORISED" or (
            row["status"] == "ENDING" and row["started_at"] is None and started_at is None
        )
        if never_plugged:
            kwh = 0.0
        kwh, cents = cap_to_balance(kwh, row["price_eur_kwh"], balance)
        if reason == EndReason.AUTHORIZATION_EXPIRED:
            status = "EXPIRED"
        elif reason == EndReason.UNPLUGGED:
            status = "COMPLETED"
        else:
            status = "ABORTED"
        await tx.execute(
            "UPDATE users SET balance_cents = balance_cents - ? WHERE id = ?",
            (cents, row["driver_id"]),
        )
        await tx.execute(
            "UPDATE sessions SET status = ?, kwh = ?, amount_cents = ?, ended_at = ?,"
            " reason = ?, ticket_revision = 1, started_at = COALESCE(started_at, ?)"
            " WHERE id = ?",
            (status, kwh, cents, now, reason.value, started_at, row["id"]),
        )
        settled = await tx.fetchone("SELECT * FROM sessions WHERE id = ?", (row["id"],))
        assert settled is not None
        ticket = ticket_from_row(settled)
        await tx.publish(Topics.DRIVER_UPDATES, row["driver_id"], Ticket(ticket=ticket))
        self.note(
            "ticket",
            f"{row['cp_id']}: ticket for {row['driver_id']}: {ticket.kwh:.4f} kWh"
            f" × {ticket.price_eur_kwh:.2f} €/kWh = {ticket.amount_eur:.2f} €"
            f" ({reason.value})",
            row["cp_id"],
            row["driver_id"],
        )

    async def _correct(self, tx: Transaction, row: Any, kwh: float) -> None:
        """The engine reported more energy than a settled ticket: bill the difference."""
        user = await tx.fetchone(
            "SELECT balance_cents FROM users WHERE id = ?", (row["driver_id"],)
        )
        balance = int(user["balance_cents"]) if user else 0
        new_kwh, new_cents = cap_to_balance(
            kwh, row["price_eur_kwh"], balance + int(row["amount_cents"])
        )
        delta = new_cents - int(row["amount_cents"])
        if new_kwh <= row["kwh"] + KWH_EPSILON:
            return
        await tx.execute(
            "UPDATE users SET balance_cents = balance_cents - ? WHERE id = ?",
            (delta, row["driver_id"]),
        )
        await tx.execute(
            "UPDATE sessions SET kwh = ?, amount_cents = ?, ticket_revision = ticket_revision + 1"
            " WHERE id = ?",
            (new_kwh, new_cents, row["id"]),
        )
        corrected = await tx.fetchone("SELECT * FROM sessions WHERE id = ?", (row["id"],))
        assert corrected is not None
        await tx.publish(
            Topics.DRIVER_UPDATES, row["driver_id"], Ticket(ticket=ticket_from_row(corrected))
        )
        self.note(
            "corrected",
            f"{row['cp_id']}: ticket {row['id']} corrected to "
            f"{new_kwh:.4f} kWh, {new_cents / 100:.2f} €",
            row["cp_id"],
            row["driver_id"],
        )

    def _release(self, cp: ChargingPoint | None, session_id: str) -> None:
        self.sessions_changed()
        if cp is not None and cp.session is not None and cp.session.session_id == session_id:
            cp.session = None
            self.changed(cp)

    # --- monitor-side events (from the TCP server) ---------------------------------------

    async def monitor_connected(self, cp: ChargingPoint, connection: object) -> None:
        cp.connection = connection
        cp.connected = True
        cp.last_heartbeat = time.time()
        self.changed(cp)
        self.note("connected", f"{cp.id}: monitor authenticated", cp.id)
        if not cp.in_service:
            # A restarted engine reads commands from the end: tell it again that it is stopped.
            await self.bus.post(
                Topics.CP_COMMANDS, cp.id, SetService(cp_id=cp.id, in_service=False)
            )

    async def monitor_lost(self, cp: ChargingPoint, why: str) -> None:
        if not cp.connected:
            return
        cp.connected = False
        cp.connection = None
        self.changed(cp)
        self.note("disconnected", f"{cp.id}: DESCONECTADO ({why})", cp.id)
        if cp.session is not None:
            # The engine ends the supply itself when it loses its monitor; wait for its figures.
            await self.begin_end(
                cp,
                EndReason.MONITOR_LOST,
                self.settings.monitor_grace,
                tell_engine=cp.session.phase != SessionPhase.SUPPLYING,
            )

    def heartbeat_fast(self, cp: ChargingPoint, engine_ok: bool, connection: object) -> bool:
        """The common heartbeat, handled without awaiting: True when nothing else changes."""
        if cp.connection is not connection or cp.engine_ok != engine_ok:
            return False  # reconnection, stale link or a health change: the full path
        cp.last_heartbeat = time.time()
        self.counters["heartbeat"] += 1
        return True

    async def heartbeat(self, cp: ChargingPoint, engine_ok: bool, connection: object) -> None:
        if cp.connection is None:
            # Heartbeats resumed on a connection that had gone silent: connected again.
            await self.monitor_connected(cp, connection)
        elif cp.connection is not connection:
            return  # a stale connection that another monitor login replaced
        cp.last_heartbeat = time.time()
        self.counters["heartbeat"] += 1
        if cp.engine_ok != engine_ok:
            await self.engine_health(cp, engine_ok, "")

    async def engine_health(self, cp: ChargingPoint, ok: bool, detail: str) -> None:
        if cp.engine_ok == ok:
            return
        cp.engine_ok = ok
        self.changed(cp)
        if ok:
            self.note("recovered", f"{cp.id}: engine recovered", cp.id)
            return
        self.note("fault", f"{cp.id}: AVERIADO ({detail or 'engine KO'})", cp.id)
        if cp.session is not None:
            await self.begin_end(
                cp, EndReason.ENGINE_FAULT, self.settings.end_grace, tell_engine=True
            )

    # --- admin and driver commands --------------------------------------------------------

    async def set_service(self, target: str, in_service: bool) -> list[str]:
        """Stop (PARADO) or resume one CP or all; returns the CP ids affected."""
        if target.lower() == "all":
            cps = self.registry.sorted()
        else:
            cp = self.registry.get(target)
            if cp is None:
                raise LookupError(f"unknown CP {target!r}")
            cps = [cp]
        async with self.db.transaction() as tx:
            for cp in cps:
                await tx.execute(
                    "UPDATE charging_points SET in_service = ? WHERE id = ?",
                    (int(in_service), cp.id),
                )
        for cp in cps:
            cp.in_service = in_service
            self.changed(cp)
            await self.bus.post(
                Topics.CP_COMMANDS, cp.id, SetService(cp_id=cp.id, in_service=in_service)
            )
            if not in_service and cp.session is not None:
                await self.begin_end(
                    cp, EndReason.STOPPED_BY_ADMIN, self.settings.end_grace, tell_engine=True
                )
        verb = "resumed" if in_service else "stopped"
        self.note(verb, f"{verb} {', '.join(c.id for c in cps) if len(cps) < 4 else 'all CPs'}")
        return [cp.id for cp in cps]

    async def _on_stop_request(self, request: StopRequest) -> None:
        cp = self.registry.session_of_driver(request.driver_id)
        if (
            cp is None
            or cp.session is None
            or (request.session_id and cp.session.session_id != request.session_id)
        ):
            await self.bus.post(
                Topics.DRIVER_UPDATES,
                request.driver_id,
                DriverNotice(
                    driver_id=request.driver_id, level="error", text="no supply in progress to stop"
                ),
            )
            return
        await self.begin_end(cp, EndReason.DRIVER_STOP, self.settings.end_grace, tell_engine=True)

    async def _driver_balance(self, driver_id: str) -> int | None:
        """A driver's balance in cents, or None when no driver has that id."""
        rows = await self.db.read(
            "SELECT balance_cents FROM users WHERE id = ? AND role = 'driver'", (driver_id,)
        )
        return int(rows[0]["balance_cents"]) if rows else None

    async def _on_status_query(self, query: StatusQuery) -> None:
        balance = await self._driver_balance(query.driver_id)
        known = balance is not None
        active = None
        unseen = []
        if known:
            cp = self.registry.session_of_driver(query.driver_id)
            if cp is not None and cp.session is not None:
                s = cp.session
                active = SessionInfo(
                    session_id=s.session_id,
                    cp_id=cp.id,
                    status=s.phase,
                    kw=s.kw,
                    kwh=round(s.kwh, 4),
                    amount_eur=s.amount_eur,
                )
            for row in await self.db.read(
                "SELECT * FROM sessions WHERE driver_id = ? AND ticket_revision > ticket_seen"
                " ORDER BY ended_at DESC LIMIT 20",
                (query.driver_id,),
            ):
                unseen.append(ticket_from_row(row))
        await self.bus.post(
            Topics.DRIVER_UPDATES,
            query.driver_id,
            DriverStatus(
                driver_id=query.driver_id,
                request_id=query.id,
                known=known,
                balance_eur=balance / 100 if balance is not None else None,
                active_session=active,
                unseen_tickets=unseen,
                available_cps=[
                    cp.summary() for cp in self.registry.sorted() if cp.state == CPState.ACTIVADO
                ],
            ),
        )

    async def _on_history(self, query: HistoryQuery) -> None:
        balance = await self._driver_balance(query.driver_id)
        known = balance is not None
        tickets = []
        if known:
            tickets = [
                ticket_from_row(row)
                for row in await self.db.read(
                    "SELECT * FROM sessions WHERE driver_id = ? AND ticket_revision > 0"
                    " ORDER BY ended_at DESC LIMIT ?",
                    (query.driver_id, query.limit),
                )
            ]
        await self.bus.post(
            Topics.DRIVER_UPDATES,
            query.driver_id,
            DriverHistory(
                driver_id=query.driver_id,
                request_id=query.id,
                known=known,
                balance_eur=balance / 100 if balance is not None else None,
                tickets=tickets,
            ),
        )

    async def register_cp(
        self, cp_id: str, location: str, price_eur_kwh: float, max_kw: float
    ) -> tuple[ChargingPoint, str]:
        """Register a new CP and issue its secret (returned once, stored only as a hash).

        The CP shows DESCONECTADO until its monitor authenticates with that secret.
        """
        if self.registry.get(cp_id) is not None:
            raise ValueError(f"CP {cp_id} is already registered")
        secret = new_secret()
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO charging_points"
                " (id, location, price_eur_kwh, max_kw, created_at, secret_hash)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (cp_id, location, price_eur_kwh, max_kw, time.time(), hash_secret(secret)),
            )
        cp = ChargingPoint(id=cp_id, location=location, price_eur_kwh=price_eur_kwh, max_kw=max_kw)
        self.registry.add(cp)
        self.changed(cp)
        self.note("registered", f"{cp_id}: registered at {location}", cp_id)
        return cp, secret

    async def authenticate_cp(self, cp_id: str, secret: str, source: str) -> ChannelKey | str:
        """Check a monitor's credentials; on success issue the CP's fresh key (rotation)."""
        cp = self.registry.get(cp_id)
        rows = await self.db.read("SELECT secret_hash FROM charging_points WHERE id = ?", (cp_id,))
        stored = rows[0]["secret_hash"] if rows else None
        if cp is None or not verify_secret(secret, stored):
            why = "unknown CP or wrong secret" if stored or cp is None else "CP has no secret"
            await self._audit("cp_auth", "failed", actor=cp_id, source=source, detail=why)
            await asyncio.sleep(CP_AUTH_FAILURE_DELAY)
            return why
        async with self.db.transaction() as tx:
            key = await self.keys.issue_cp_key(tx, cp_id)
        await self._audit("cp_auth", "ok", actor=cp_id, source=source)
        await self._audit("key_issued", "ok", actor=cp_id, source=source, detail=key.key_id)
        return key

    async def revoke_key(self, cp_id: str) -> None:
        """Revoke a CP's keys: it is out of service until its monitor authenticates again."""
        cp = self.registry.get(cp_id)
        if cp is None:
            raise LookupError(f"unknown CP {cp_id!r}")
        async with self.db.transaction() as tx:
            revoked = await self.keys.revoke_principal(tx, "cp", cp_id)
        # The admin interface audits the command, with who gave it.
        self.note("revoked", f"{cp_id}: key revoked ({', '.join(revoked) or 'none live'})", cp_id)
        if self.disconnect_monitor is not None and cp.connection is not None:
            await self.disconnect_monitor(cp)

    async def reset_secret(self, cp_id: str) -> str:
        """Issue a CP a new secret (returned once); the old one and its keys stop working."""
        cp = self.registry.get(cp_id)
        if cp is None:
            raise LookupError(f"unknown CP {cp_id!r}")
        secret = new_secret()
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE charging_points SET secret_hash = ? WHERE id = ?",
                (hash_secret(secret), cp_id),
            )
            await self.keys.revoke_principal(tx, "cp", cp_id)
        self.note("secret", f"{cp_id}: new secret issued, keys revoked", cp_id)
        if self.disconnect_monitor is not None and cp.connection is not None:
            await self.disconnect_monitor(cp)
        return secret

    async def _login_task(self, request: LoginRequest) -> None:
        async with self._login_slots:
            try:
                await self._on_login(request)
            except SealError as exc:
                self.counters["rejected"] += 1
                log.warning("rejected a login of %s: %s", request.driver_id, exc)
                await self._audit_rejection(Topics.DRIVER_REQUESTS, request.driver_id, str(exc))
            except Exception:
                self.counters["handler_errors"] += 1
                log.exception("login of %s failed", request.driver_id)

    async def _on_login(self, request: LoginRequest) -> None:
        """A driver logs in: open its password, check it, and hand back a key of its own."""
        driver_id = request.driver_id

        async def answer(**fields: Any) -> None:
            await self.bus.post(
                Topics.DRIVER_UPDATES,
                driver_id,
                LoginResult(driver_id=driver_id, request_id=request.id, **fields),
            )

        assert self.keys.identity is not None
        if time.time() - request.ts > self.settings.request_ttl:
            await answer(ok=False, reason="login request too old")
            return
        try:
            password, reply_key = login_unwrap(
                self.keys.identity,
                driver_id,
                request.id,
                request.client_key,
                request.nonce,
                request.sealed_password,
            )
        except SealError as exc:
            await answer(ok=False, reason=f"the login could not be read: {exc}")
            return
        async with self.db.transaction() as tx:
            replayed = await tx.seen(request.id)
            if not replayed:
                await tx.mark_processed(request.id)
        if replayed:
            raise SealError("replayed login request")
        outcome = await self.people.login(
            driver_id, password, source="kafka", channel="driver", role="driver"
        )
        verdict = "ok" if outcome.ok else "refused"
        self.note("login", f"login of {driver_id}: {verdict}", driver_id=driver_id)
        if not outcome.ok:
            await answer(ok=False, reason=outcome.reason, retry_after=outcome.retry_after)
            return
        ttl = self.settings.session_ttl
        async with self.db.transaction() as tx:
            key = await self.keys.issue_driver_key(tx, driver_id, ttl)
        balance = await self._driver_balance(driver_id)
        secret = json.dumps(
            {"key": b64(key.key), "balance_eur": balance / 100 if balance is not None else None}
        )
        nonce, sealed = seal_reply(reply_key, driver_id, request.id, secret.encode())
        await answer(
            ok=True, key_id=key.key_id, expires_at=key.expires_at, nonce=nonce, sealed=sealed
        )

    # --- timers -----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Heartbeat timeouts, authorisation expiry, settle deadlines, lost engines."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 0.25
            await asyncio.sleep(0.25)
            self.loop_lag.observe(max(0.0, loop.time() - due))
            now = time.time()
            for cp in self.registry.stale(now, self.settings.heartbeat_timeout):
                await self.monitor_lost(
                    cp, f"no heartbeat for {self.settings.heartbeat_timeout:g} s"
                )
            for cp in list(self.registry.cps.values()):
                live = cp.session
                if live is None:
                    continue
                try:
                    if (
                        live.phase == SessionPhase.AUTHORISED
                        and live.expires_at
                        and now > live.expires_at
                    ):
                        await self.begin_end(
                            cp, EndReason.AUTHORIZATION_EXPIRED, 0, tell_engine=True
                        )
                    elif (
                        live.phase == SessionPhase.ENDING
                        and live.settle_deadline
                        and now >= live.settle_deadline
                    ):
                        await self.settle_now(cp)
                    elif (
                        live.phase == SessionPhase.SUPPLYING
                        and live.last_telemetry_at
                        and now - live.last_telemetry_at > self.settings.telemetry_timeout
                    ):
                        await self.begin_end(cp, EndReason.ENGINE_LOST, 0, tell_engine=True)
                except Exception:
                    log.exception("timer handling failed for %s", cp.id)
            await self.outbox.hand_over_new()
            await self._save_replay_guard(now)

    async def _save_replay_guard(self, now: float) -> None:
        """Persist the replay guard's progress (every REPLAY_SAVE_INTERVAL s), drop expired keys.

        What a crash loses is at most that much progress; the messages it covers were handled
        already and are idempotent (state-changing ids are recorded, telemetry carries its own
        sequence), so a replay of them changes nothing.
        """
        if now - self._replay_saved_at < REPLAY_SAVE_INTERVAL:
            return
        self._replay_saved_at = now
        rows = self.keys.dirty_replay_rows()
        self.keys.sweep(now)
        if not rows:
            return
        try:
            async with self.db.transaction() as tx:
                await tx.executemany(
                    "INSERT INTO replay_guard (key_id, stream, last_seq) VALUES (?, ?, ?)"
                    " ON CONFLICT (key_id, stream) DO UPDATE SET last_seq = excluded.last_seq",
                    rows,
                )
        except Exception:
            log.exception("saving the replay guard failed")

    def _broker_answers(self, ok: bool) -> None:
        self.broker_ok = ok

    async def _prune(self) -> None:
        while True:
            await asyncio.sleep(3600)
            await self.db.prune(older_than_s=7 * 24 * 3600)

    async def run(self) -> None:
        """Run the background work until cancelled."""
        with self.gc_pauses:
            await self._run_tasks()

    async def _run_tasks(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._consume(), name="kafka-consumer")
            tasks.create_task(self.outbox.run(), name="outbox-relay")
            tasks.create_task(self._supervise(), name="supervisor")
            tasks.create_task(self._publish_changes(), name="state-publisher")
            tasks.create_task(self._prune(), name="prune")
