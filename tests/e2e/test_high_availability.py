"""Two Centrals on a three-node Kafka cluster: one active, one hot standby that takes over.

Real processes throughout: two Centrals started with the same flags (--ha), a CP's engine and
monitor, a driver app, three Kafka nodes. Kafka decides which Central is active (a consumer
group), fences the one before (a transactional producer) and carries every change to the
standby (the compacted changelog): docs/high-availability.md.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from cluster import Cluster
from helpers import free_port, wait_for
from procs import Deployment, http_get
from shared.bus import Topics

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.slow]


def pair(
    kafka_cluster: Cluster, tmp_path: Path, brokers: str | None = None
) -> tuple[Deployment, Deployment]:
    """Two Centrals of one network: their own databases, the same audit key."""
    key = secrets.token_bytes(32).hex() + "\n"
    centrals = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        (workdir / "central.db.audit-key").write_text(key)
        (workdir / "central.db.audit-key").chmod(0o600)
        centrals.append(
            Deployment(brokers or kafka_cluster.bootstrap, workdir, ha=True, advertise="127.0.0.1")
        )
    return centrals[0], centrals[1]


def wipe(db_path: Path) -> None:
    """An empty disk: the database and its write-ahead log are gone (the audit key stays)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)


def read_page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


async def role(central: Deployment) -> str | None:
    try:
        status, body = await asyncio.to_thread(http_get, central.url("/healthz"), 2)
    except OSError:
        return None
    return body.get("role") if status == 200 and isinstance(body, dict) else None


async def wait_role(central: Deployment, wanted: str, timeout: float) -> float:
    """Seconds until `central` says it has the role `wanted`."""
    started = time.monotonic()

    async def reached() -> bool:
        return await role(central) == wanted

    await wait_for(reached, timeout, interval=0.1, message=f"never {wanted}")
    return time.monotonic() - started


async def changelog_leader(bootstrap: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-leader")
    await admin.start()
    try:
        [described] = await admin.describe_topics([Topics.CENTRAL_CHANGELOG])
        return int(described["partitions"][0]["leader"])
    finally:
        await admin.close()


def ledger(central: Deployment) -> dict[str, list[tuple[object, ...]]]:
    """What must survive anything: sessions, balances, keys, accounts, the audit log."""
    return {
        "sessions": central.query(
            "SELECT id, cp_id, driver_id, status, kwh, amount_cents, ticket_revision"
            " FROM sessions ORDER BY id"
        ),
        "balances": central.query("SELECT id, balance_cents FROM users ORDER BY id"),
        "keys": central.query("SELECT key_id, kind, principal, key FROM channel_keys ORDER BY 1"),
        "audit": central.query("SELECT id, hash FROM audit_log ORDER BY id"),
        "identity": central.query("SELECT value FROM meta WHERE key = 'identity_key'"),
    }


async def test_the_standby_takes_over_mid_supply_and_both_rebuild_from_empty_disks(
    kafka_cluster: Cluster, tmp_path: Path
) -> None:
    a, b = pair(kafka_cluster, tmp_path)
    try:
        await a.start_central()
        await wait_role(a, "active", 30)
        await b.start_central()
        assert await role(b) == "standby"

        # A supply on CP001, whose monitor knows both Centrals.
        a.start_engine("CP001", "--auto-plug", "1", "--auto-unplug", "14")
        both = f"127.0.0.1:{a.central_port},127.0.0.1:{b.central_port}"
        a.start_monitor("CP001", "--central", both)
        await a.wait_state("CP001", "ACTIVADO", timeout=30)
        driver = a.start_driver("user1", "--cp", "CP001")
        await driver.wait_output('"event":"started"', 30)
        admin = {"Cookie": await a.admin_cookie()}  # the admin's login, made at A

        # The active Central dies; the standby is active and has the CP back within seconds.
        assert a.central is not None
        a.central.kill()
        took_over = await wait_role(b, "active", 5)
        await b.wait_state("CP001", "SUMINISTRANDO", timeout=10)
        status, _ = await asyncio.to_thread(http_get, b.url("/api/cps"), 5, admin)
        assert status == 200  # still logged in at the Central that took over

        # And the broker that leads the changelog fails too: the transactions go on elsewhere.
        kafka_cluster.kill_node(await changelog_leader(kafka_cluster.bootstrap))

        # The supply ends with one ticket, the engine's energy, billed once.
        assert await driver.wait_exit(60) == 0, driver.output[-3000:]
        events = driver.json_events()
        [ticket] = [e for e in events if e["event"] == "ticket"]
        assert [e["event"] for e in events].count("authorized") == 1  # answered once
        engine = a.engines["CP001"]
        match = re.search(r"ended \(unplugged\): ([\d.]+) kWh", engine.output)
        assert match is not None, engine.output[-2000:]
        assert ticket["kwh"] == pytest.approx(float(match.group(1)), abs=1e-4)
        rows = b.query("SELECT status, kwh, amount_cents FROM sessions")
        assert rows == [("COMPLETED", ticket["kwh"], round(ticket["amount_eur"] * 100))]
        assert b.balance("user1") == 15000 - rows[0][2]
        before = ledger(b)
        assert before["identity"] == ledger(a)["identity"]  # drivers pin one key

        # Both die; both start again on empty disks and rebuild everything from Kafka.
        assert b.central is not None
        b.central.kill()
        await wait_for(lambda: not b.central.running, 10)  # type: ignore[union-attr]
        for central in (a, b):
            wipe(central.db_path)
        await b.start_central()
        await wait_role(b, "active", 30)
        await a.start_central()
        await wait_role(a, "standby", 30)
        after = ledger(b)
        for name in ("sessions", "balances", "identity"):
            assert after[name] == before[name], name
        # The monitor has meanwhile logged in again: a new key and audit rows, added after.
        assert set(before["keys"]) <= set(after["keys"])
        assert after["audit"][: len(before["audit"])] == before["audit"]
        await wait_for(lambda: ledger(a) == ledger(b), 10, message="the standby is behind")
        for central in (a, b):
            verified = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "EV_Central", "audit", "verify", "--db", central.db_path],
                capture_output=True,
                text=True,
                check=False,
            )
            assert verified.returncode == 0, verified.stdout + verified.stderr
            assert "MACs" in verified.stdout and "NOT" not in verified.stdout, verified.stdout
        print(f"take-over in {took_over:.2f} s")
    finally:
        a.stop_all()
        b.stop_all()
        kafka_cluster.heal()


async def test_a_standby_refuses_a_monitor_naming_the_active_and_answers_no_request(
    kafka_cluster: Cluster, tmp_path: Path
) -> None:
    # Every process is given a broker list whose first address is dead: the others serve.
    a, b = pair(kafka_cluster, tmp_path, f"127.0.0.1:{free_port()},{kafka_cluster.bootstrap}")
    try:
        await a.start_central()
        await wait_role(a, "active", 30)
        await b.start_central()
        active, standby = a, b
        assert await role(standby) == "standby"
        standby.start_engine("CP002")
        monitor = standby.start_monitor("CP002", "--central", f"127.0.0.1:{standby.central_port}")
        where = f"127.0.0.1:{active.central_port}"
        await monitor.wait_output(
            re.escape(f"this Central is the standby; the active Central is at {where}"), 30
        )
        assert monitor.running and "Traceback" not in monitor.output
        # The standby's page says where the active one is; its API is not served.
        page = await asyncio.to_thread(read_page, standby.url("/"))
        assert f"127.0.0.1:{active.http_port}" in page and "standby" in page
        status, _ = await asyncio.to_thread(http_get, standby.url("/api/cps"), 2)
        assert status == 503
        # A driver's request is answered once, by the active Central only.
        driver = standby.start_driver("user2", "--cp", "CP003")
        assert await driver.wait_exit(60) == 3  # denied: CP003 has no monitor
        denials = [e for e in driver.json_events() if e["event"] == "denied"]
        assert len(denials) == 1
    finally:
        a.stop_all()
        b.stop_all()
