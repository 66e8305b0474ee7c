"""Attacks on the running system that must fail: forged, moved and replayed Kafka messages,
wrong and revoked CP credentials, and reading another driver's supply off the broker."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from EV_Central.auth import UNKNOWN_SOURCE_BUDGET
from EV_Driver.session import start_login
from helpers import wait_for
from procs import Deployment
from shared.bus import KafkaBus, Topics
from shared.messages import CPSupplyEnded, CPTelemetry, EndReason, StatusQuery, encode
from shared.sealing import Sealer, is_sealed, new_key
from tools.fleet.sim import central_key_from_db

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]


def current_key(system: Deployment, kind: str, principal: str) -> tuple[str, bytes]:
    rows = system.query(
        "SELECT key_id, key FROM channel_keys WHERE kind = ? AND principal = ?"
        " AND retired_at IS NULL AND revoked_at IS NULL ORDER BY issued_at DESC",
        kind,
        principal,
    )
    assert rows, f"no live key for {kind} {principal}"
    return rows[0][0], bytes(rows[0][1])


async def rejected(system: Deployment) -> int:
    return int((await system.api("/api/stats"))["messages"].get("rejected", 0))


def session_row(system: Deployment, session_id: str) -> tuple[Any, ...]:
    return system.query("SELECT status, kwh, amount_cents FROM sessions WHERE id = ?", session_id)[
        0
    ]


async def collect(consumer: AIOKafkaConsumer, into: list[Any]) -> None:
    async for record in consumer:
        into.append(record)


async def test_forged_moved_and_replayed_cp_events_change_nothing(system: Deployment) -> None:
    await system.start_central()
    await system.start_cp("CP001", "--auto-plug", "0.5")
    await system.start_cp("CP002")
    bus = KafkaBus(system.broker, "attacker")
    await bus.start(ensure_topics=False)
    sniffer = AIOKafkaConsumer(
        Topics.CP_EVENTS,
        Topics.DRIVER_UPDATES,
        bootstrap_servers=system.broker,
        auto_offset_reset="earliest",
    )
    await sniffer.start()
    seen: list[Any] = []
    reader = asyncio.create_task(collect(sniffer, seen))
    try:
        driver = system.start_driver("user1", "--cp", "CP001")
        await system.wait_state("CP001", "SUMINISTRANDO", timeout=30)
        session_id = system.query(
            "SELECT id FROM sessions WHERE cp_id = 'CP001' AND status = 'SUPPLYING'"
        )[0][0]
        await wait_for(
            lambda: sum(1 for r in seen if r.topic == Topics.CP_EVENTS and r.key == b"CP001") >= 3,
            20,
            message="no sealed telemetry of CP001 seen",
        )
        before_rejected = await rejected(system)
        ending = CPSupplyEnded(
            cp_id="CP001",
            session_id=session_id,
            kwh=999.0,
            amount_eur=0.0,
            reason=EndReason.UNPLUGGED,
        )
        other_id, other_key = current_key(system, "cp", "CP002")
        attacks: list[tuple[str, bytes]] = [
            # 1. no key at all: the message in clear
            ("CP001", encode(ending)),
            # 2. CP002's key, claiming to be CP001
            (
                "CP001",
                Sealer("cp-event", "CP001", other_id, other_key).seal(ending.id, encode(ending)),
            ),
            # 3. CP002's key, honestly CP002's envelope, carrying CP001's unplug
            (
                "CP002",
                Sealer("cp-event", "CP002", other_id, other_key).seal(ending.id, encode(ending)),
            ),
            # 4. a key Central never issued
            (
                "CP001",
                Sealer("cp-event", "CP001", "0123456789abcdef", new_key()).seal(
                    ending.id, encode(ending)
                ),
            ),
        ]
        # 5. the engine's own sealed events, captured and sent again
        captured = [r for r in seen if r.topic == Topics.CP_EVENTS and r.key == b"CP001"][:3]
        attacks += [("CP001", record.value) for record in captured]
        for key, value in attacks:
            assert b"999" not in value or is_sealed(value) or key == "CP001"
            await bus.send_raw(Topics.CP_EVENTS, key.encode(), value)

        async def all_rejected() -> bool:
            return await rejected(system) >= before_rejected + len(attacks)

        await wait_for(all_rejected, 15, message="Central did not reject every forgery")
        status, kwh, _ = session_row(system, session_id)
        assert status == "SUPPLYING" and kwh < 1.0, (status, kwh)
        assert (await system.cp_states())["CP001"] == "SUMINISTRANDO"

        # Nothing on the broker tells a sniffer about the driver's supply.
        updates = [r for r in seen if r.topic == Topics.DRIVER_UPDATES]
        assert updates, "the driver got no updates at all"
        for record in updates:
            clear = not is_sealed(record.value)
            assert not clear or json.loads(record.value)["type"] in (
                "login_result",
                "central_identity",
            ), record.value[:200]
            assert session_id.encode() not in record.value
        for record in seen:
            if record.topic == Topics.CP_EVENTS and is_sealed(record.value):
                assert session_id.encode() not in record.value

        driver.stop()
    finally:
        reader.cancel()
        await sniffer.stop()
        await bus.stop()


async def test_monitor_credentials_wrong_secret_revoked_key_and_reset(system: Deployment) -> None:
    await system.start_central()
    await system.start_cp("CP001")
    # A monitor with a wrong secret is refused and its CP never comes up.
    system.start_engine("CP003")
    intruder = system.start_monitor("CP003", "--secret", "not-the-secret")
    await intruder.wait_output("Central rejected CP003: unknown CP or wrong secret", 15)
    assert (await system.cp_states())["CP003"] == "DESCONECTADO"

    # Revoking CP001's key: messages sealed with it are refused from then on, the CP is out
    # of service until its monitor authenticates again, and then it has a new key.
    old_id, old_key = current_key(system, "cp", "CP001")
    before = await rejected(system)
    await system.ctl("revoke-key", "CP001")
    await system.wait_state("CP001", "ACTIVADO", timeout=30)
    new_id, _ = current_key(system, "cp", "CP001")
    assert new_id != old_id
    bus = KafkaBus(system.broker, "attacker")
    await bus.start(ensure_topics=False)
    try:
        telemetry = CPTelemetry(cp_id="CP001", session_id="x", seq=1, kw=1, kwh=1, amount_eur=1)
        sealed = Sealer("cp-event", "CP001", old_id, old_key).seal(telemetry.id, encode(telemetry))
        await bus.send_raw(Topics.CP_EVENTS, b"CP001", sealed)

        async def refused() -> bool:
            return await rejected(system) > before

        await wait_for(refused, 15, message="a message sealed with a revoked key was accepted")
    finally:
        await bus.stop()

    # A new secret: the monitor's old one no longer authenticates.
    out = await system.ctl("reset-secret", "CP001")
    assert "demo-secret-CP001" not in out
    await system.monitors["CP001"].wait_output("unknown CP or wrong secret", 20)
    await system.wait_state("CP001", "DESCONECTADO", timeout=10)
    audit = {row[0] for row in system.query("SELECT action FROM audit_log")}
    assert {"cp_auth", "key_issued", "key_revoked", "message_rejected"} <= audit, audit


async def test_a_driver_cannot_act_as_another(system: Deployment) -> None:
    await system.start_central()
    await system.start_cp("CP001")
    token = system.workdir / "user2.token"
    login = system.start_driver(
        "user2", "--password", "pass2", "--token-file", str(token), name="login", command="login"
    )
    assert await login.wait_exit(30) == 0, login.output
    data = json.loads(token.read_text())
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    before = await rejected(system)
    bus = KafkaBus(system.broker, "user2-impostor")
    await bus.start(ensure_topics=False)
    try:
        key_id, key = data["key_id"], base64.b64decode(data["key"])
        # user2's own envelope and key, carrying a query about user1
        query = StatusQuery(driver_id="user1")
        own = Sealer("driver-request", "user2", key_id, key)
        await bus.send_raw(Topics.DRIVER_REQUESTS, b"user2", own.seal(query.id, encode(query)))
        # user1's name on the envelope, sealed with user2's key
        query = StatusQuery(driver_id="user1")
        moved = Sealer("driver-request", "user1", key_id, key)
        await bus.send_raw(Topics.DRIVER_REQUESTS, b"user1", moved.seal(query.id, encode(query)))
        # and in clear, with no key at all
        query = StatusQuery(driver_id="user1")
        await bus.send_raw(Topics.DRIVER_REQUESTS, b"user1", encode(query))

        async def refused() -> bool:
            return await rejected(system) >= before + 3

        await wait_for(refused, 15, message="a request for another driver was not refused")
    finally:
        await bus.stop()
    # The token works for a later run without the password.
    driver = system.start_driver("user2", "--token-file", str(token), "--cp", "CP001")
    await first_authorised(driver)
    driver.stop()


async def first_authorised(driver: Any) -> None:
    def found() -> bool:
        return any(e["event"] in ("authorized", "accepted") for e in driver.json_events())

    await wait_for(found, 30, message=f"the token did not work:\n{driver.output[-2000:]}")


async def test_a_guesser_with_a_new_key_per_guess_does_not_hold_back_a_known_app(
    system: Deployment,
) -> None:
    """Over Kafka a login's source is its key. A guesser who makes up a key per guess spends
    the budget of sources that never logged in to the account; the driver's own app keeps its
    key between runs (--login-key-file), so it is a known source and gets in at once."""
    await system.start_central()
    first = system.start_driver("user1", name="login-first", command="login")
    assert await first.wait_exit(30) == 0, first.output
    central_key = central_key_from_db(str(system.db_path))
    assert central_key is not None
    bus = KafkaBus(system.broker, "guesser")
    await bus.start(ensure_topics=False)
    try:
        for n in range(UNKNOWN_SOURCE_BUDGET + 2):
            guess = start_login(central_key, "user1", f"guess{n}")  # a new key each time
            await bus.send_raw(Topics.DRIVER_REQUESTS, b"user1", encode(guess.request))
    finally:
        await bus.stop()

    def failures() -> int:
        [(count,)] = system.query(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'login' AND outcome = 'failed'"
            " AND actor = 'user1'"
        )
        return int(count)

    await wait_for(lambda: failures() >= UNKNOWN_SOURCE_BUDGET, 60, message="guesses not seen")
    # A new app (a key Central never saw) with the right password waits...
    stranger = system.workdir / "stranger.key"
    new = system.start_driver(
        "user1", "--login-key-file", str(stranger), name="login-new", command="login"
    )
    assert await new.wait_exit(30) != 0
    assert "too many failed logins" in new.output
    # ...the driver's own app does not.
    again = system.start_driver("user1", name="login-again", command="login")
    assert await again.wait_exit(30) == 0, again.output
