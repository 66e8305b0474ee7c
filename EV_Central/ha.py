"""High availability: two or more Centrals, exactly one active, decided and fenced by Kafka.

docs/high-availability.md explains the design; in short:

- **Election.** Every Central started with `--ha` joins the consumer group `ev-central-lease`
  on the one-partition topic `ev.central.lease` (`Lease`). The member that is assigned the
  partition is the active Central; Kafka's group coordinator decides, and reassigns it when
  the holder stops heartbeating for `--lease-timeout`. `LeaseAssignor` gives it to the member
  claiming the newest term, so it stays where it is when a standby joins or a deposed Central
  comes back.
- **Fencing.** The active Central sends everything in transactions of fixed transactional ids
  (`TRANSACTIONAL_ID`-0 to -7). Starting those producers aborts whatever the previous holder
  had open and makes all it tries later fail: a deposed Central that has not noticed yet
  reaches nobody.
- **Replication.** What the active Central changes in SQLite goes to `ev.central.changelog`
  in the same Kafka transactions as the messages that acknowledge it (EV_Central/changelog.py).
  A standby applies it to its own database as it comes (`Replica`).
- **Take-over.** Given the lease, a standby fences, reads the changelog to its end, and starts
  as an ordinary Central on the database it has (`_term`). A Central that loses the lease, or
  finds itself fenced, stops serving, and starts again as a standby from an empty database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import KafkaError

from EV_Central import changelog, schema
from EV_Central.changelog import Replica
from EV_Central.config import CentralSettings
from EV_Central.db import Database
from EV_Central.outbox import Fenced
from EV_Central.schema import ACTIVE_KEY, ROLE_KEY, TERM_KEY
from EV_Central.store import Store
from shared.backoff import Backoff
from shared.bus import HA_TOPICS, KafkaBus, Topics
from shared.framed import FramedConnection, FramedServer, serve_framed
from shared.framing import DEFAULT_MAX_FRAME
from shared.lifecycle import Shutdown
from shared.messages import MONITOR_TO_CENTRAL, AuthResult, MonitorToCentral
from shared.tls import HANDSHAKE_TIMEOUT, optional_server_context
from shared.web import bound_port, json_response, response, split_path

log = logging.getLogger(__name__)

LEASE_GROUP = "ev-central-lease"
LEASE = TopicPartition(Topics.CENTRAL_LEASE, 0)
# The active Central's transactional producers (ids ev-central-0 ...), used in turn (see
# EV_Central/outbox.py); a Central taking over starts every one of them, fencing them all.
TRANSACTIONAL_ID = "ev-central"
TRANSACTIONAL_PRODUCERS = 8
PREVIOUS_SUFFIX = ".previous"
AUTH_TIMEOUT = 5.0
# Central's event loop proves it runs this often; without a sign for WATCHDOG_SECONDS the lease
# thread gives the lease up (a hung Central must not keep it).
ALIVE_INTERVAL = 0.5
WATCHDOG_SECONDS = 15.0


class _TermOver(Exception):
    """Shutdown, or the lease went elsewhere: this term ends."""


class Lease:
    """Membership of the lease group: `held` while this Central is assigned the partition.

    `term` is what this Central claims when the group is formed again (a member joins, leaves
    or comes back): 0 before it is active, then the number of its take-over, one more than the
    last active Central's (kept in the changelog as `meta.term`). `LeaseAssignor` gives the
    lease to the highest claim, so a Central that comes back after being cut off (still
    claiming its old term) does not take the lease from the one that took over from it.
    """

    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        timeout: float,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.timeout = timeout
        # A secured broker's login (shared/kafka_access.py); none for a plain one.
        self.client_options = client_options or {}
        self.held = asyncio.Event()
        self.lost = asyncio.Event()  # set when the lease, once held, went to another Central
        self.term = 0
        self._alive_at = time.monotonic()  # when Central's event loop last showed it runs

    async def run(self) -> None:
        """Stay in the group until cancelled (leaving it hands the lease on at once).

        The group's heartbeats run in a thread with an event loop of its own: a busy or
        briefly stalled Central (a burst of work, a swapped-out page, a machine short of CPU)
        keeps its lease. What this loop does is prove that Central itself is alive: when it
        has not done so for `WATCHDOG_SECONDS`, the thread leaves the group, as Kafka's own
        consumers do after max.poll.interval.ms, and a standby takes over.
        """
        loop = asyncio.get_running_loop()
        self._alive_at = time.monotonic()
        stop = threading.Event()
        thread = threading.Thread(
            target=lambda: asyncio.run(self._membership(loop, stop)), name="lease", daemon=True
        )
        thread.start()
        try:
            while thread.is_alive():
                self._alive_at = time.monotonic()
                await asyncio.sleep(ALIVE_INTERVAL)
            # The thread gave the lease up (the watchdog) or failed: this term ends, and the
            # next one joins the group again.
            self._left()
            raise _TermOver
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 15.0)

    def _on_main(self, loop: asyncio.AbstractEventLoop, call: Callable[[], None]) -> None:
        """Run `call` on Central's event loop (from the lease thread)."""
        with contextlib.suppress(RuntimeError):  # that loop has closed: nothing to tell
            loop.call_soon_threadsafe(call)

    def _left(self) -> None:
        if self.held.is_set():
            self.held.clear()
            self.lost.set()

    async def _membership(self, main: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        """In the lease thread: join, keep the membership, leave on stop or a stalled Central."""
        timeout_ms = int(self.timeout * 1000)
        backoff = Backoff(maximum=5.0)
        while not stop.is_set():
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                group_id=LEASE_GROUP,
                enable_auto_commit=False,
                session_timeout_ms=timeout_ms,
                heartbeat_interval_ms=max(100, timeout_ms // 6),
                max_poll_interval_ms=max(10_000, timeout_ms * 3),
                partition_assignment_strategy=(LeaseAssignor(self),),
                # A lease topic created a moment ago may have no partitions in the first
                # metadata; the group is joined again when a later one has them.
                metadata_max_age_ms=5_000,
                **self.client_options,
            )
            try:
                await consumer.start()
            except KafkaError as exc:
                await consumer.stop()
                delay = backoff.next_delay()
                log.warning("cannot join the lease group (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            break
        else:
            return
        listener = _LeaseListener(lambda tps: self._on_main(main, lambda: self.assigned(tps)))
        consumer.subscribe([Topics.CENTRAL_LEASE], listener=listener)
        try:
            while not stop.is_set():
                await consumer.getmany(timeout_ms=250)  # nothing is written: keeps membership
                stalled = time.monotonic() - self._alive_at
                if stalled > WATCHDOG_SECONDS:
                    log.error(
                        "Central has not run for %.0f s: leaving the lease group so that a "
                        "standby takes over",
                        stalled,
                    )
                    return
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    def assigned(self, partitions: set[TopicPartition]) -> None:
        if LEASE in partitions:
            if not self.held.is_set():
                log.info("this Central holds the lease: it becomes the active Central")
            self.held.set()
        elif self.held.is_set():
            log.warning("the lease went to another Central")
            self.held.clear()
            self.lost.set()


class LeaseAssignor:
    """The group's assignment: the lease partition to the member claiming the highest term.

    A partition assignor of Kafka's consumer protocol (aiokafka calls `metadata` when joining,
    `assign` on the member the coordinator makes leader). With no claims (no Central active
    yet) the lease goes to the first member by id.
    """

    name = "ev-central-lease"
    version = 0

    def __init__(self, lease: Lease) -> None:
        self._lease = lease

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        claim = json.dumps({"term": self._lease.term}).encode()
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), claim)

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        holder = max(sorted(members), key=lambda member: claimed_term(members[member].user_data))
        return {
            member: ConsumerProtocolMemberAssignment(
                self.version, [(Topics.CENTRAL_LEASE, [0])] if member == holder else [], b""
            )
            for member in members
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        """Nothing to remember: the claim is the Lease's term."""


def claimed_term(user_data: bytes | None) -> int:
    """The term a member claims in its join metadata (0: none, or unreadable)."""
    try:
        term = json.loads(user_data or b"{}").get("term", 0)
    except (ValueError, AttributeError):
        return 0
    return term if isinstance(term, int) and term >= 0 else 0


class _LeaseListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, assigned: Callable[[set[TopicPartition]], None]) -> None:
        self._assigned = assigned

    async def on_partitions_revoked(self, revoked: Any) -> None:
        """Nothing yet: the assignor gives the lease straight back to its holder."""

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._assigned(set(assigned))


class ClusterView:
    """What the active Central's panel shows of Kafka: brokers up, partitions with a copy
    missing, Centrals in the lease group. Asked at most every `CACHE_SECONDS`."""

    CACHE_SECONDS = 5.0

    def __init__(self, bootstrap: str, client_options: dict[str, Any]) -> None:
        self.bootstrap = bootstrap
        self.client_options = client_options
        self._admin: AIOKafkaAdminClient | None = None
        self._asked_at = -1e9
        self._last: dict[str, Any] = {}

    async def status(self) -> dict[str, Any]:
        if time.monotonic() - self._asked_at < self.CACHE_SECONDS:
            return self._last
        self._asked_at = time.monotonic()
        try:
            async with asyncio.timeout(3.0):
                self._last = await self._ask()
        except (KafkaError, TimeoutError, OSError, LookupError) as exc:
            log.debug("cannot describe the Kafka cluster: %s", exc)
            self._last = {"reachable": False}
        return self._last

    async def _ask(self) -> dict[str, Any]:
        if self._admin is None:
            admin = AIOKafkaAdminClient(
                bootstrap_servers=self.bootstrap,
                client_id="ev-central-cluster-view",
                **self.client_options,
            )
            await admin.start()
            self._admin = admin
        admin = self._admin
        brokers = (await admin.describe_cluster())["brokers"]
        described = await admin.describe_topics(await admin.list_topics())
        partitions = [p for topic in described for p in topic["partitions"]]
        under = sum(1 for p in partitions if len(p["isr"]) < len(p["replicas"]))
        [answer] = await admin.describe_consumer_groups([LEASE_GROUP])
        _, _, state, _, _, members = answer.groups[0]
        return {
            "reachable": True,
            "brokers": len(brokers),
            "partitions": len(partitions),
            "under_replicated": under,
            "centrals": len(members),
            "lease_group": state,
        }

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()


def advertised(settings: CentralSettings) -> dict[str, Any]:
    """Where this Central is reached, as a standby names it to monitors and browsers."""
    host = settings.advertise or socket.gethostname()
    return {
        "name": f"{host}:{settings.port}",
        "monitors": f"{host}:{settings.port}",
        "admin": f"{host}:{settings.http_port}",
    }


def previous_path(path: str) -> Path:
    return Path(path + PREVIOUS_SUFFIX)


def fresh_database(path: str) -> tuple[Database, Path | None]:
    """Keep a copy of this Central's database (`<db>.previous`) and start an empty one.

    A standby rebuilds its database from the changelog; the copy is what an operator looks at
    afterwards, and what a first active Central adopts when the changelog is empty (a network
    that ran with one Central moving to two). Returns the new database and the copy, if any.
    """
    previous: Path | None = None
    if Path(path).exists():
        previous = previous_path(path)
        partial = Path(f"{previous}.partial")
        with contextlib.closing(sqlite3.connect(path)) as source:
            with contextlib.closing(sqlite3.connect(partial)) as copy:
                source.backup(copy)  # with what is still in the write-ahead log
        partial.chmod(0o600)
        partial.replace(previous)
    elif previous_path(path).exists():
        previous = previous_path(path)  # kept from an earlier start
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)
    schema.initialise(path, seed=False)
    return Database(path, demo=False), previous


async def adopt(db: Database, previous: Path | None) -> int:
    """Copy the replicated tables of an earlier database in (the triggers queue every row).

    Returns how many rows were copied. Only the first active Central of a changelog does this.
    """
    if previous is None:
        return 0
    conn = db.conn
    conn.execute("ATTACH DATABASE ? AS previous", (str(previous),))
    try:
        copied = 0
        async with db.transaction() as tx:
            for table in changelog.REPLICATED:
                old = {row[1] for row in conn.execute(f"PRAGMA previous.table_info({table})")}
                new = [row[1] for row in conn.execute(f"PRAGMA main.table_info({table})")]
                columns = ", ".join(name for name in new if name in old)
                if not columns:
                    continue  # a table the earlier database did not have
                only = f" WHERE key NOT LIKE '{changelog.LOCAL_META}'" if table == "meta" else ""
                cursor = await tx.execute(
                    f"INSERT OR REPLACE INTO main.{table} ({columns})"
                    f" SELECT {columns} FROM previous.{table}{only}"
                )
                copied += max(0, cursor.rowcount)
    finally:
        conn.execute("DETACH DATABASE previous")
    return copied


class Standby:
    """What a standby serves: refusals on the monitor port, its status on the admin port."""

    def __init__(self, settings: CentralSettings, db: Database, replica: Replica) -> None:
        self.settings = settings
        self.db = db
        self.replica = replica
        self.tls = optional_server_context(settings.tls_cert, settings.tls_key)
        self._monitors: FramedServer[MonitorToCentral] | None = None
        self._web: Any = None
        self.since = time.time()

    async def active(self) -> dict[str, Any] | None:
        """The active Central as the changelog last said (None before the first one)."""
        stored = await Store(self.db).meta(ACTIVE_KEY)
        if stored is None:
            return None
        with contextlib.suppress(ValueError):
            found: dict[str, Any] = json.loads(stored)
            return found
        return None

    async def start(self) -> None:
        self._monitors = await serve_framed(
            self._refuse,
            self.settings.listen_host,
            self.settings.port,
            MONITOR_TO_CENTRAL,
            name="monitor",
            max_frame=DEFAULT_MAX_FRAME,
            ssl_context=self.tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        from websockets.asyncio.server import serve

        self._web = await serve(
            self._ws_refused,
            self.settings.listen_host,
            self.settings.http_port,
            process_request=self._http,
            ssl=self.tls,
        )
        web_port = bound_port(self._web.sockets, self.settings.http_port)
        log.info(
            "standby Central: monitors refused on :%d, status on :%d",
            bound_port(self._monitors.sockets, self.settings.port),
            web_port,
        )

    async def stop(self) -> None:
        if self._monitors is not None:
            await self._monitors.close()
            self._monitors = None
        if self._web is not None:
            self._web.close()
            with contextlib.suppress(Exception):
                await self._web.wait_closed()
            self._web = None

    async def status(self) -> dict[str, Any]:
        active = await self.active()
        return {
            "status": "ok",
            "role": "standby",
            "active_central": active,
            "changelog_applied": self.replica.applied,
            "changelog_position": self.replica.position,
            "changelog_lag": await self.replica.lag(),
            "standby_since": self.since,
        }

    async def _refuse(self, conn: FramedConnection[MonitorToCentral]) -> None:
        """Any monitor gets one refusal naming the active Central, then the link closes."""
        try:
            first = await asyncio.wait_for(conn.receive(), AUTH_TIMEOUT)
            active = await self.active()
            where = active["monitors"] if active else None
            reason = "this Central is the standby; " + (
                f"the active Central is at {where}" if where else "no Central is active yet"
            )
            await conn.send(
                AuthResult(
                    cp_id=getattr(first, "cp_id", "unknown"),
                    accepted=False,
                    reason=reason,
                    active_central=where,
                )
            )
        except Exception as exc:  # a bad or silent peer ends its own connection only
            log.debug("standby: monitor connection ended: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _ws_refused(self, connection: Any) -> None:
        await connection.close(1013, "standby Central: use the active one")

    async def _http(self, connection: Any, request: Any) -> Any:
        path, _ = split_path(request.path)
        status = await self.status()
        if path == "/healthz":
            return json_response(status)
        if path == "/metrics":
            body = (
                "# HELP ev_central_role This Central's role (1 for the one it has).\n"
                "# TYPE ev_central_role gauge\n"
                'ev_central_role{role="standby"} 1\n'
                'ev_central_role{role="active"} 0\n'
                "# HELP ev_central_changelog_lag Changelog records not applied yet.\n"
                "# TYPE ev_central_changelog_lag gauge\n"
                f"ev_central_changelog_lag {status['changelog_lag']}\n"
            ).encode()
            return response(200, body, "text/plain; version=0.0.4; charset=utf-8")
        if path.startswith("/api/"):
            return json_response({"error": "standby Central: read-only", **status}, 503)
        active = status["active_central"]
        where = (
            f'the active Central\'s panel is at <a href="//{active["admin"]}/">'
            f"{active['admin']}</a>"
            if active
            else "no Central is active yet"
        )
        page = (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<title>EV Central (standby)</title></head><body>"
            "<h1>EV Central: standby</h1>"
            f"<p id='role'>This Central is the hot standby; {where}.</p>"
            f"<p>Changelog records applied: {status['changelog_applied']} "
            f"(behind by {status['changelog_lag']}).</p></body></html>"
        ).encode()
        return response(200, page, "text/html; charset=utf-8")


async def run_ha(settings: CentralSettings, shutdown: Shutdown) -> None:
    """Standby until the lease comes, active until it goes; again, until shut down."""
    stopping = asyncio.ensure_future(shutdown.wait())
    try:
        while not shutdown.requested:
            await _term(settings, stopping)
    finally:
        stopping.cancel()


async def _term(settings: CentralSettings, stopping: asyncio.Future[None]) -> None:
    """One term: standby on an empty database, then (given the lease) active."""
    from EV_Central.app import Central, serve

    db, previous = fresh_database(settings.db)
    await db.start()
    store = Store(db)
    changelog.stop_capture(db.conn)
    await _put_meta(store, ROLE_KEY, "standby")
    identity = advertised(settings)
    bus = KafkaBus(settings.broker, f"ev-central-{identity['name']}", login=settings.kafka)
    replica = Replica(bus, db)
    lease = Lease(
        settings.broker,
        f"ev-central-lease-{identity['name']}",
        settings.lease_timeout,
        bus.client_options,
    )
    standby = Standby(settings, db, replica)
    central: Central | None = None
    producers: list[AIOKafkaProducer] = []
    try:
        await standby.start()
        await bus.start(ensure_topics=False)
        await bus.ensure_topics()
        await bus.ensure_topics(HA_TOPICS)
        await bus.partitions_of(spec.name for spec in HA_TOPICS)  # known to the cluster
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(lease.run(), name="lease")
            applying = tasks.create_task(replica.run(), name="changelog-replica")
            granted = asyncio.ensure_future(lease.held.wait())
            first: set[asyncio.Future[Any]] = {granted, stopping}
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                granted.cancel()
                raise _TermOver  # leaves the task group, cancelling its tasks
            # Active from here: claim the next term, fence the previous holder, then read what
            # it committed.
            started = time.monotonic()
            lease.term = await _term_number(store) + 1
            producers.extend(
                await asyncio.gather(
                    *(
                        bus.transactional_producer(f"{TRANSACTIONAL_ID}-{index}")
                        for index in range(TRANSACTIONAL_PRODUCERS)
                    )
                )
            )
            end = await replica.catch_up()
            applying.cancel()
            await standby.stop()
            await _become_active(store, settings, lease, identity, previous, first_ever=end == 0)
            central = Central(settings, db, transactions=producers)
            await central.load()
            log.info(
                "active Central after %.2f s (changelog read to offset %d, %d records applied)",
                time.monotonic() - started,
                end,
                replica.applied,
            )
            deposed = asyncio.ensure_future(lease.lost.wait())
            ends: set[asyncio.Future[Any]] = {deposed, stopping}
            until = asyncio.ensure_future(asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED))
            await serve(central, settings, until)
            if deposed.done():
                log.warning("another Central holds the lease now: this one becomes standby")
            raise _TermOver
    except* Fenced as fenced:
        log.warning("%s: this Central becomes standby", _first(fenced))
    except* _TermOver:
        pass
    finally:
        if central is not None:
            with contextlib.suppress(Exception):
                await central.bus.stop()
        for producer in producers:
            with contextlib.suppress(Exception):
                await producer.stop()
        with contextlib.suppress(Exception):
            await standby.stop()
        with contextlib.suppress(Exception):
            await bus.stop()
        await db.stop()


def _first(group: BaseExceptionGroup[Fenced]) -> BaseException:
    """The first exception of a group, inside the groups of nested task groups."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


async def _become_active(
    store: Store,
    settings: CentralSettings,
    lease: Lease,
    identity: dict[str, Any],
    previous: Path | None,
    *,
    first_ever: bool,
) -> None:
    """With the changelog read to its end: capture changes, and say who is active from now."""
    db = store.db
    changelog.start_capture(db.conn)
    db.capturing = True
    if first_ever:
        # The first active Central of this Kafka cluster: its earlier database (one Central
        # before), or the demo data, is where the changelog starts.
        adopted = await adopt(db, previous)
        if adopted:
            log.info("adopted %d rows of the earlier database: the changelog was empty", adopted)
        elif settings.demo:
            await _seed_demo(db)
    await _put_meta(store, ROLE_KEY, "active")
    lease.term = max(lease.term, await _term_number(store) + 1)
    active = dict(identity, since=time.time(), term=lease.term)
    async with store.transaction() as tx:
        await tx.put_meta(TERM_KEY, str(lease.term))
        await tx.put_meta(ACTIVE_KEY, json.dumps(active))


async def _term_number(store: Store) -> int:
    """The last active Central's term, as this database has it (0 before any)."""
    stored = await store.meta(TERM_KEY)
    return int(stored) if stored is not None and stored.isdigit() else 0


async def _put_meta(store: Store, key: str, value: str) -> None:
    async with store.transaction() as tx:
        await tx.put_meta(key, value)


async def _seed_demo(db: Database) -> None:
    """The first active Central of a new network seeds the demo CPs and accounts."""
    async with db.transaction() as tx:
        cps, users = schema.seed_demo(tx.conn)
    log.info("seeded the demo data (%d CPs, %d accounts): the changelog was empty", cps, users)
