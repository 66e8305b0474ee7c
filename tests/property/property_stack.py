"""One real deployment for every property test: random and damaged input against each service.

The package shares a single stack (starting Kafka and the services is the slow part): a broker
of its own (or EV_KAFKA_BOOTSTRAP's), Central, CP001 with its engine and monitor, a spare engine
that the tests themselves act as the monitor of, the driver dashboard and the site dashboard.
Every property checks, after each example, that the services still answer and that nothing
changed: Central's database rows, which CPs are connected and in which state.

Hypothesis runs derandomized (`PROPERTY`): the same examples on every run, so a CI failure
can be reproduced; `database=None` keeps it from writing an example database.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from pydantic import TypeAdapter
from websockets.sync.client import connect

from cluster import kafka_sh
from helpers import free_port, need_tool, scaled, wait_for
from procs import Deployment, ServiceProcess
from shared.errors import MessageError
from shared.framing import (
    ACK_BYTE,
    Ack,
    BadFrame,
    Frame,
    FrameDecoder,
    Garbage,
    Nack,
    Oversized,
    encode_frame,
)
from shared.messages import ENGINE_TO_MONITOR, EngineChallenge, EngineHello, decode, encode
from shared.sealing import hello_proof

PROPERTY = settings(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=40,
    # `central_before` is taken once per test on purpose: every example is compared with it.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

CONNECTED_CP = "CP001"  # engine + monitor: ACTIVADO for the whole run
SPARE_CP = "CP002"  # an engine alone; the tests play its monitor


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    system: Deployment
    driver: ServiceProcess
    driver_port: int
    site: ServiceProcess
    site_port: int
    admin_cookie: str = ""  # "name=value" of an admin's session on Central's web

    @property
    def central(self) -> ServiceProcess:
        assert self.system.central is not None
        return self.system.central

    @property
    def spare_engine_port(self) -> int:
        return int(self.system.engine_ports[SPARE_CP])

    def processes(self) -> list[ServiceProcess]:
        return [
            self.central,
            self.system.engines[CONNECTED_CP],
            self.system.monitors[CONNECTED_CP],
            self.system.engines[SPARE_CP],
            self.driver,
            self.site,
        ]

    def admin_get(self, target: str) -> tuple[int, bytes]:
        """GET on Central's web as the admin."""
        return get(self.system.http_port, target, headers={"Cookie": self.admin_cookie})

    # Central's state as the tests compare it: database rows and the CPs' view.

    def db_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table of Central's database."""
        with contextlib.closing(sqlite3.connect(self.system.db_path, timeout=10)) as db:
            tables = [
                row[0]
                for row in db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite_%' ORDER BY name"
                )
            ]
            return {t: db.execute(f'SELECT * FROM "{t}" ORDER BY 1').fetchall() for t in tables}

    def cps(self) -> dict[str, tuple[Any, ...]]:
        """Each CP as Central shows it: state, connected, in service, session."""
        status, body = self.admin_get("/api/cps")
        assert status == 200, body
        return {
            cp["id"]: (cp["state"], cp["connected"], cp["in_service"], cp.get("session_id"))
            for cp in json.loads(body)
        }

    def state(self, cp_id: str) -> str:
        """The state Central shows for one CP."""
        return str(self.cps()[cp_id][0])

    def stats(self) -> dict[str, int]:
        """Central's message counters (/api/stats)."""
        status, body = self.admin_get("/api/stats")
        assert status == 200, body
        counters: dict[str, int] = json.loads(body)["messages"]
        return counters

    def snapshot(self, may_change: frozenset[str] = frozenset()) -> CentralSnapshot:
        return CentralSnapshot(self.db_rows(), self.cps(), may_change)

    def assert_central_unchanged(self, before: CentralSnapshot) -> None:
        """Central is up and healthy, and neither its database nor its CPs changed.

        The audit log may only have grown (refusals are recorded there, on purpose); the
        snapshot's `may_change` tables are not compared (see `may_change` below).
        """
        assert self.central.running, self.central.output[-3000:]
        status, body = get(self.system.http_port, "/healthz")
        assert status == 200, body
        assert json.loads(body)["status"] == "ok", body
        assert self.cps() == before.cps
        after = self.db_rows()
        assert set(after) == set(before.rows)
        for table, rows in before.rows.items():
            if table in APPEND_ONLY:
                assert after[table][: len(rows)] == rows, f"{table} was rewritten"
            elif table not in before.may_change:
                gone = [row for row in rows if row not in after[table]]
                new = [row for row in after[table] if row not in rows]
                assert after[table] == rows, f"table {table} changed: -{gone} +{new}"

    def assert_all_running(self) -> None:
        for proc in self.processes():
            assert proc.running, f"{proc.name} exited:\n{proc.output[-3000:]}"

    def assert_no_tracebacks(self) -> None:
        for proc in self.processes():
            output = LIBRARY_EOF_ASSERTION.sub("", proc.output)
            assert "Traceback" not in output, f"{proc.name}:\n{output[-5000:]}"


# The `websockets` library (17.x) logs this when a plain HTTP request is followed by more bytes
# (a body, a second request) before it closes the connection: its own assertion, not ours; the
# connection is closed and the server goes on. Only that exact traceback is tolerated.
LIBRARY_EOF_ASSERTION = re.compile(
    r"ERROR +websockets\.server: unexpected internal error\n"
    r"Traceback \(most recent call last\):\n"
    r"(?:  .*\n)*?"
    r"  File \S+websockets/protocol\.py\S*, line \d+, in send_eof\n"
    r"(?:    .*\n)+"
    r"AssertionError\n"
)


APPEND_ONLY = frozenset({"audit_log"})
# What a refused login changes on purpose: (for a login that came over Kafka) the id of the
# message Central has handled. Its failure counters are in Central's memory only.
LOGIN_TABLES = ("processed_messages",)

T = TypeVar("T", bound=Callable[..., Any])


def may_change(*tables: str) -> Callable[[T], T]:
    """Mark a test whose input changes these tables of Central's on purpose: `central_before`
    then leaves them out of its comparisons."""

    def mark(test: T) -> T:
        test.may_change = frozenset(tables)  # type: ignore[attr-defined]
        return test

    return mark


@dataclass(frozen=True)
class CentralSnapshot:
    rows: dict[str, list[tuple[Any, ...]]]
    cps: dict[str, tuple[Any, ...]]
    may_change: frozenset[str] = frozenset()


def get(
    port: int, target: str, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """A plain GET on 127.0.0.1:port (status and body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=scaled(timeout))
    try:
        conn.request("GET", target, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def web_login(port: int, user: str, password: str) -> str:
    """Log in as a browser does (/login, then /session), on the driver dashboard or Central's
    admin web, which share that exchange; the session's Cookie header value ("name=token")."""
    with connect(f"ws://127.0.0.1:{port}/login", open_timeout=scaled(5)) as ws:
        ws.send(json.dumps({"type": "login", "user": user, "password": password}))
        result = json.loads(ws.recv(timeout=scaled(15)))
    assert result.get("ok"), result
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=scaled(5))
    try:
        conn.request("GET", f"/session?grant={result['grant']}")
        resp = conn.getresponse()
        resp.read()
        cookie = resp.getheader("Set-Cookie") or ""
    finally:
        conn.close()
    assert resp.status == 204 and cookie, (resp.status, cookie)
    return cookie.split(";", 1)[0]


def _kafka(action: str, port: int, run_dir: Path) -> None:
    if action == "start":
        # Without Java the stack cannot run: skipped with the reason (failed in CI).
        need_tool(os.environ.get("JAVA", "java"), "Kafka tests", "openjdk-17-jre-headless")
    kafka_sh([action, str(port)], {**os.environ, "EV_KAFKA_RUN_DIR": str(run_dir)}, scaled(300))


@contextlib.contextmanager
def own_broker(run_dir: Path) -> Iterator[str]:
    """EV_KAFKA_BOOTSTRAP when set, else a broker of the package's own (no other test's
    records on it: Central reads its topics from the start)."""
    external = os.environ.get("EV_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    port = free_port()
    _kafka("start", port, run_dir)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _kafka("stop", port, run_dir)


def site_dashboard(system: Deployment, port: int) -> ServiceProcess:
    """The site dashboard (Deployment starts every other service)."""
    args = ["-m", "EV_CP_M", "dashboard", "--broker", system.broker]
    args += ["--http-port", str(port), "--listen-host", "127.0.0.1"]
    # The demo CPs' secrets: their monitors' sealed health samples are shown.
    demo_cps = [f"CP{n:03d}" for n in range(1, 11)]
    args += ["--cp-secrets", ",".join(f"{cp}={system.secret(cp)}" for cp in demo_cps)]
    proc = ServiceProcess("site-dashboard", args, system.workdir).start()
    system.processes.append(proc)
    return proc


async def healthy(proc: ServiceProcess, port: int) -> None:
    async def ok() -> bool:
        if not proc.running:
            raise AssertionError(f"{proc.name} exited:\n{proc.output[-3000:]}")
        try:
            status, _ = await asyncio.to_thread(get, port, "/healthz", 2)
        except OSError:
            return False
        return status == 200

    await wait_for(ok, 60, interval=0.3, message=f"{proc.name} not healthy:\n{proc.output}")


# --- speaking the frame protocol by hand ----------------------------------------------------


@dataclass
class Answer:
    """Everything a peer got back on one connection."""

    acks: int = 0
    nacks: int = 0
    messages: list[Any] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # frames from the server that failed
    stray: int = 0  # bytes from the server outside any frame
    closed: bool = False
    reset: bool = False  # closed with unread input: what was in flight may be lost
    challenge: str | None = None  # an engine's first frame (not counted as a message)


class RawPeer:
    """A blocking TCP client that writes whatever bytes it is given and decodes every byte of
    the answer with the project's codec; it ACKs each valid frame, as a monitor would."""

    def __init__(self, port: int, inbound: TypeAdapter[Any], timeout: float = 3.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=scaled(timeout))
        self.inbound = inbound
        self.decoder = FrameDecoder()
        self.answer = Answer()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """Write everything; False when the server has already closed (or reset)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.answer.closed = self.answer.reset = True
            return False
        return True

    def finish(self) -> None:
        """Half-close: the server sees the end of our input."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def read(self, until: Callable[[Answer], bool] | None = None, timeout: float = 3.0) -> Answer:
        """Read until `until(answer)` holds, the server closes, or `timeout` passes."""
        deadline = time.monotonic() + scaled(timeout)
        while not self.answer.closed and not (until and until(self.answer)):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                self.answer.reset = True
                chunk = b""
            if not chunk:
                self.answer.closed = True
                break
            self._take(chunk)
        return self.answer

    def _take(self, chunk: bytes) -> None:
        for event in self.decoder.feed(chunk):
            if isinstance(event, Ack):
                self.answer.acks += 1
            elif isinstance(event, Nack):
                self.answer.nacks += 1
            elif isinstance(event, Frame):
                try:
                    message = decode(self.inbound, event.data)
                    if isinstance(message, EngineChallenge):
                        self.answer.challenge = message.nonce
                    else:
                        self.answer.messages.append(message)
                except MessageError as exc:
                    self.answer.invalid.append(str(exc))
                with contextlib.suppress(OSError):
                    self.sock.sendall(ACK_BYTE)
            elif isinstance(event, BadFrame | Oversized):
                self.answer.invalid.append(str(event))
            elif isinstance(event, Garbage):
                self.answer.stray += event.count


def proven_hello(peer: RawPeer, cp_id: str, secret: str | None = None) -> EngineHello:
    """A hello as the CP's monitor sends it on `peer`'s connection to an engine: with the
    proof that it knows the CP's secret, over the engine's challenge (read first)."""
    answer = peer.read(lambda a: a.challenge is not None)
    assert answer.challenge is not None, answer
    hello = EngineHello(cp_id=cp_id)
    proof = hello_proof(secret or f"demo-secret-{cp_id}", cp_id, hello.id, answer.challenge)
    return hello.model_copy(update={"proof": proof})


def name_spare_engine(stack: Stack) -> None:
    """Tell the spare engine which CP it is, as its monitor would (its id is then fixed)."""
    with RawPeer(stack.spare_engine_port, ENGINE_TO_MONITOR) as peer:
        peer.send(encode_frame(encode(proven_hello(peer, SPARE_CP))))
        answer = peer.read(lambda a: a.acks >= 1)
        assert answer.acks == 1, answer
