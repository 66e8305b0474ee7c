"""Shared pytest fixtures."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from cluster import Cluster, consecutive_free_ports, kafka_sh
from helpers import free_port, need_tool, scaled
from procs import Deployment


def _kafka_sh(action: str, port: int, env: dict[str, str], timeout: float) -> None:
    if action == "start":
        # The broker runs on the machine's Java: without it the test is skipped, not failed.
        need_tool(env.get("JAVA", "java"), "Kafka tests", "openjdk-17-jre-headless")
    kafka_sh([action, str(port)], env, timeout)


class Broker:
    """A broker started with scripts/kafka.sh that a test may stop and start again."""

    def __init__(self, port: int, run_dir: Path) -> None:
        self.port = port
        self.env = {**os.environ, "EV_KAFKA_RUN_DIR": str(run_dir)}
        self.bootstrap = f"127.0.0.1:{port}"

    def start(self) -> None:
        _kafka_sh("start", self.port, self.env, timeout=scaled(300))

    def stop(self) -> None:
        _kafka_sh("stop", self.port, self.env, timeout=scaled(60))

    def restart_later(self) -> None:
        """Stop, keeping the data: the next start() finds every topic and offset again."""
        _kafka_sh("stop", self.port, {**self.env, "EV_KAFKA_KEEP_DATA": "1"}, scaled(60))
        self.env = {**self.env, "EV_KAFKA_KEEP_DATA": "1"}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own: nothing left on it by other tests, free to be restarted."""
    b = Broker(free_port(), tmp_path / "kafka")
    b.start()
    try:
        yield b
    finally:
        b.stop()


async def _empty_broker(bootstrap: str) -> None:
    """Delete every topic (and with them the consumer groups' offsets) on a shared broker, so
    that a test finds it as new: nothing left by the tests before it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-reset")
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if not t.startswith("__")]
        if not names:
            return
        await admin.delete_topics(names)
        deadline = asyncio.get_running_loop().time() + scaled(30)
        while set(names) & set(await admin.list_topics()):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the shared broker still has topics {names}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


@pytest.fixture
async def system(
    request: pytest.FixtureRequest, tmp_path: Path, kafka_bootstrap: str
) -> AsyncIterator[Deployment]:
    """Real service processes (procs.Deployment) on an empty broker.

    The session's broker, emptied first; or, when the test also asks for `broker` (to stop
    and restart it), a broker of the test's own.
    """
    if "broker" in request.fixturenames:
        bootstrap = request.getfixturevalue("broker").bootstrap
    else:
        await _empty_broker(kafka_bootstrap)
        bootstrap = kafka_bootstrap
    deployment = Deployment(bootstrap, tmp_path)
    try:
        yield deployment
    finally:
        deployment.stop_all()


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The engines the tests start keep their journals (EV_CP_E --journal's default, under
    XDG_STATE_HOME) in the session's own directory: never the user's, never a journal that an
    earlier run left on a port this one reuses."""
    path = tmp_path_factory.mktemp("state")
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(path)
    yield path
    if before is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address ("host:port") of a Kafka broker for the whole session.

    Uses EV_KAFKA_BOOTSTRAP when set (an externally managed broker); otherwise starts
    a throwaway single-node broker with scripts/kafka.sh and stops it afterwards.
    """
    external = os.environ.get("EV_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return

    port = free_port()
    env = {**os.environ, "EV_KAFKA_RUN_DIR": str(tmp_path_factory.mktemp("kafka"))}
    # Generous: the first run may also resolve the broker jars through Maven.
    _kafka_sh("start", port, env, timeout=scaled(300))
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _kafka_sh("stop", port, env, timeout=scaled(60))


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-node Kafka cluster (replication factor 3, two in sync) for one test module."""
    cluster = Cluster(consecutive_free_ports(3), tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Collect the garbage the tests left before the plugins' own teardown imports modules.

    Python 3.11.7 fails an `ast.parse` (pytest compiles each module it imports) with
    "SystemError: AST constructor recursion depth mismatch" when the garbage collector runs
    finalizers in the middle of it: Kafka clients and asyncio tasks of the fencing tests are
    such garbage. Collected here, they are gone before the terminal summary imports anything.
    """
    gc.collect()
