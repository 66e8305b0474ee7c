"""A secured Kafka (docs/security.md, "Kafka"): TLS, SCRAM logins and ACLs, enforced by the
broker itself, with a supply end to end through it.

One secured broker for the module (scripts/kafka.sh with EV_KAFKA_SECURE_DIR), its logins
made by `python -m EV_Central kafka-access setup`, as an operator would.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAuthorizationFailedError

from bench.security import make_keys
from cluster import REPO_ROOT, kafka_sh
from EV_Central.admin_api import DeregisterCP
from EV_Central.ctl import send_command
from helpers import free_port, need_tool, scaled, wait_for
from procs import Deployment
from shared.bus import Topics
from shared.kafka_access import KafkaAccess, KafkaLogin

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]


@dataclass
class SecuredBroker:
    bootstrap: str
    ca: Path
    creds: Path  # the roles' password files (kafka-ROLE.password)
    admin_password_file: Path

    def login(self, name: str) -> KafkaLogin:
        return KafkaLogin.from_files(name, str(self.password_file(name)), str(self.ca))

    def password_file(self, name: str) -> Path:
        if name == "admin":
            return self.admin_password_file
        return self.creds / f"kafka-{name}.password"

    def flags(self, name: str) -> tuple[str, ...]:
        """A service's command-line flags to log in as `name`."""
        return (
            "--kafka-user",
            name,
            "--kafka-password-file",
            str(self.password_file(name)),
            "--kafka-ca",
            str(self.ca),
        )

    def access(self, *args: str) -> str:
        """`python -m EV_Central kafka-access ARGS` as the admin principal."""
        done = subprocess.run(
            [sys.executable, "-m", "EV_Central", "kafka-access", "--broker", self.bootstrap]
            + list(self.flags("admin")[2:])
            + list(args),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=scaled(60),
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    need_tool("java", "Kafka tests", "openjdk-17-jre-headless")
    root = tmp_path_factory.mktemp("secured-kafka")
    keys = make_keys(root, REPO_ROOT).keys  # as the secured-Kafka benchmark makes them
    port = free_port()
    env = {**os.environ, "EV_KAFKA_RUN_DIR": str(root / "run"), "EV_KAFKA_SECURE_DIR": str(keys)}
    kafka_sh(["start", str(port)], env, scaled(300))
    broker = SecuredBroker(
        f"127.0.0.1:{port}", keys / "ca.crt", root / "creds", keys / "kafka-admin.password"
    )
    try:
        said = broker.access("setup", str(broker.creds))
        assert "central:" in said and "driver:" in said, said
        broker.access("cp", "CP001", str(broker.creds))
        yield broker
    finally:
        kafka_sh(["stop", str(port)], env, scaled(60))


async def _refused(what: str, attempt: Awaitable[object]) -> KafkaError:
    """The error Kafka answers `attempt` with (the test fails if it is let through)."""
    try:
        await asyncio.wait_for(attempt, scaled(20))
    except KafkaError as exc:
        return exc
    raise AssertionError(f"the broker let {what} through")


@pytest.fixture
async def cp_producer(secured: SecuredBroker) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(
        bootstrap_servers=secured.bootstrap, **secured.login("cp-CP001").client_options()
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def test_a_client_without_a_login_or_with_a_wrong_password_is_refused(
    secured: SecuredBroker,
) -> None:
    plain = AIOKafkaProducer(bootstrap_servers=secured.bootstrap, request_timeout_ms=5000)
    await _refused("a client without TLS and a login", plain.start())
    await plain.stop()
    wrong = KafkaLogin("cp-CP001", "not-its-password", str(secured.ca))
    guesser = AIOKafkaProducer(bootstrap_servers=secured.bootstrap, **wrong.client_options())
    refused = await _refused("a wrong password", guesser.start())
    await guesser.stop()
    assert isinstance(refused, KafkaConnectionError)
    await _sockets_closed()


async def _sockets_closed() -> None:
    """Wait until every socket of this test's event loop is closed. aiokafka closes a refused
    TLS login's connection asynchronously (the TLS shutdown); a loop that ends first leaves the
    socket to the garbage collector, whose "unclosed transport" warning then fails whichever
    test it happens to run in (filterwarnings = error). asyncio gives a TLS shutdown 30 s."""
    transports = asyncio.get_running_loop()._transports  # type: ignore[attr-defined]

    def closed() -> bool:  # what the transport's __del__ checks before it warns
        return all(t._sock is None for t in list(transports.values()))

    await wait_for(closed, 40, message="a refused login's socket was never closed")


async def test_a_cps_login_writes_its_events_and_nothing_else(
    secured: SecuredBroker, cp_producer: AIOKafkaProducer
) -> None:
    sent = await cp_producer.send_and_wait(Topics.CP_EVENTS, b"{}", key=b"CP001")
    assert sent.offset >= 0
    refused = await _refused(
        "a CP writing a command", cp_producer.send_and_wait(Topics.CP_COMMANDS, b"{}")
    )
    assert isinstance(refused, TopicAuthorizationFailedError)
    reader = AIOKafkaConsumer(
        Topics.DRIVER_UPDATES,
        bootstrap_servers=secured.bootstrap,
        **secured.login("cp-CP001").client_options(),
    )
    try:
        refused = await _refused("a CP reading the drivers' updates", reader.start())
    finally:
        await reader.stop()
    assert isinstance(refused, TopicAuthorizationFailedError)


async def test_only_the_admin_principal_deletes_a_topic(secured: SecuredBroker) -> None:
    for name in ("central", "cp-CP001", "driver"):
        admin = AIOKafkaAdminClient(
            bootstrap_servers=secured.bootstrap, **secured.login(name).client_options()
        )
        await admin.start()
        try:
            response = await admin.delete_topics([Topics.CP_HEALTH])
        finally:
            await admin.close()
        errors = [code for _topic, code, *_ in response.topic_error_codes]
        assert errors and all(code != 0 for code in errors), (name, response)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=secured.bootstrap, **secured.login("central").client_options()
    )
    await admin.start()
    try:
        assert Topics.CP_HEALTH in await admin.list_topics()
    finally:
        await admin.close()


async def test_a_withdrawn_cp_login_is_refused_by_the_broker(secured: SecuredBroker) -> None:
    secured.access("cp", "CP009", str(secured.creds))
    login = secured.login("cp-CP009")
    producer = AIOKafkaProducer(bootstrap_servers=secured.bootstrap, **login.client_options())
    await producer.start()
    try:
        await producer.send_and_wait(Topics.CP_EVENTS, b"{}", key=b"CP009")
        secured.access("withdraw", "cp-CP009")
        # Its open connection may no longer do anything: its ACLs are gone.
        refused = await _refused(
            "a withdrawn CP", producer.send_and_wait(Topics.CP_EVENTS, b"{}", key=b"CP009")
        )
        assert isinstance(refused, TopicAuthorizationFailedError)
    finally:
        await producer.stop()
    again = AIOKafkaProducer(bootstrap_servers=secured.bootstrap, **login.client_options())
    refused = await _refused("a withdrawn CP's new connection", again.start())
    await again.stop()
    assert isinstance(refused, KafkaConnectionError)
    async with KafkaAccess(secured.bootstrap, secured.login("admin")) as access:
        assert await access.revoke_all("cp-CP009") == 0  # nothing left to remove


async def test_a_rotated_password_logs_in_and_the_old_one_is_refused(
    secured: SecuredBroker,
) -> None:
    secured.access("cp", "CP010", str(secured.creds))
    old = secured.login("cp-CP010")
    said = secured.access("password", "cp-CP010", str(secured.creds))
    assert "cp-CP010: a new password in" in said, said
    new = secured.login("cp-CP010")
    assert new.password != old.password
    assert secured.password_file("cp-CP010").stat().st_mode & 0o777 == 0o600
    stale = AIOKafkaProducer(bootstrap_servers=secured.bootstrap, **old.client_options())
    refused = await _refused("a rotated-away password", stale.start())
    await stale.stop()
    assert isinstance(refused, KafkaConnectionError)
    fresh = AIOKafkaProducer(bootstrap_servers=secured.bootstrap, **new.client_options())
    await fresh.start()
    try:  # the login keeps its ACLs: its events still go in
        await fresh.send_and_wait(Topics.CP_EVENTS, b"{}", key=b"CP010")
    finally:
        await fresh.stop()


def test_preflight_logs_in_to_a_secured_broker_and_says_when_it_cannot(
    secured: SecuredBroker, tmp_path: Path
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"KAFKA_BROKERS={secured.bootstrap}\nPC1_IP=127.0.0.1\nPC2_IP=127.0.0.1\n"
        "PC3_IP=127.0.0.1\nSECURE=1\n"
    )

    def kafka_lines(password_file: Path) -> dict[str, str]:
        done = subprocess.run(
            [sys.executable, "scripts/preflight.py", "--env-file", str(env_file)]
            + ["--tls-ca", str(secured.ca), "--kafka-password-file", str(password_file)]
            + ["--timeout", str(scaled(5))],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=scaled(120),
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if "] kafka " in line]
        return {line.split("]")[1].split()[1]: line for line in lines}

    good = kafka_lines(secured.password_file("kafka-ui"))
    for check in ("bootstrap", "advertised", "quorum"):
        assert good[check].startswith("[OK"), good
    # One broker, one copy of everything: the topics kafka-access made, described to this login.
    assert good["replication"].startswith("[OK"), good
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    bad = kafka_lines(wrong)
    assert bad["advertised"].startswith("[FAIL"), bad
    assert "refused the login" in bad["advertised"], bad
    assert "secrets/kafka-kafka-ui.password" in bad["advertised"], bad


async def test_a_supply_end_to_end_with_every_service_logged_in(
    secured: SecuredBroker, tmp_path: Path
) -> None:
    system = Deployment(secured.bootstrap, tmp_path, **_flags(secured.flags("central")))
    try:
        await system.start_central()
        system.start_engine(
            "CP001", "--auto-plug", "1", "--auto-unplug", "4", *secured.flags("cp-CP001")
        )
        system.start_monitor("CP001", "--broker", secured.bootstrap, *secured.flags("monitor"))
        await system.wait_state("CP001", "ACTIVADO", timeout=scaled(30))
        driver = system.start_driver("user1", "--cp", "CP001", *secured.flags("driver"))
        assert await driver.wait_exit(scaled(60)) == 0, driver.output
        ticket = next(e for e in driver.json_events() if e["event"] == "ticket")
        assert ticket["cp_id"] == "CP001" and ticket["kwh"] > 0
    finally:
        system.stop_all()


def _flags(flags: tuple[str, ...]) -> dict[str, str]:
    """("--kafka-user", "central", ...) as Deployment's keyword flags."""
    return {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}


async def test_central_issues_a_cps_kafka_login_with_its_registration_and_withdraws_it(
    secured: SecuredBroker, tmp_path: Path
) -> None:
    system = Deployment(secured.bootstrap, tmp_path, **_flags(secured.flags("central")))
    try:
        await system.start_central()
        said = await system.ctl(
            "register", "CP777", "--location", "Lab", "--price", "0.3", "--max-kw", "11"
        )
        line = next(x for x in said.splitlines() if x.startswith("Kafka login of its engine:"))
        user, password = line.split(":", 1)[1].split()
        assert user == "cp-CP777"
        login = KafkaLogin(user, password, str(secured.ca))
        producer = AIOKafkaProducer(bootstrap_servers=secured.bootstrap, **login.client_options())
        await producer.start()
        try:
            await producer.send_and_wait(Topics.CP_EVENTS, b"{}", key=b"CP777")
        finally:
            await producer.stop()

        cookie = await system.admin_cookie()
        answer = await send_command(
            "127.0.0.1", system.http_port, DeregisterCP(target="CP777"), scaled(20), cookie
        )
        assert answer["ok"], answer
        again = AIOKafkaProducer(bootstrap_servers=secured.bootstrap, **login.client_options())
        refused = await _refused("a deregistered CP's engine", again.start())
        await again.stop()
        assert isinstance(refused, KafkaConnectionError)
    finally:
        system.stop_all()
