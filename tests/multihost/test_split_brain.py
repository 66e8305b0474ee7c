"""Split brain: the active Central is cut off from the network mid-supply, then comes back.

Three simulated PCs of their own (network namespaces, not the module-wide set of conftest.py,
which runs the single-Central deployment): PC3 runs a three-node Kafka cluster and CP001's
engine and monitor, PC2 Central A (started first, so active), PC1 Central B (standby) and the
driver. Pulling PC2's cable leaves A believing it is active while it reaches nobody: B must
take over, finish the supply with one ticket, and A, once back, must be fenced and rebuild as
a standby without anything it did while cut off reaching anyone (docs/high-availability.md).

Secured as the compose files run it: the cluster takes only TLS clients with their role's login
(made once it is up), and both Centrals serve TLS with one certificate that names both PCs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netsim import KAFKA_SH, TIMINGS, CentralView, HostProcess, Probe, SimulatedNetwork
from secured import Keys

from helpers import need_root, need_tool, scaled, wait_for
from procs import REPO_ROOT
from shared.bus import Topics

pytestmark = [
    pytest.mark.multihost,
    pytest.mark.kafka,
    pytest.mark.e2e,
    pytest.mark.slow,
]

# Every PC is a namespace with a port space of its own: fixed ports cannot clash with other
# runs on this machine, and those of the compose files read naturally.
KAFKA_BASE_PORT = 19092
CENTRAL_PORT = 5000
CENTRAL_HTTP_PORT = 8002
ENGINE_PORT = 6101
LEASE_TIMEOUT = 3.0
# The engine unplugs this long after plugging (scaled): time enough for the take-over and the
# monitor finding B while the supply still runs (about 8 s after the cut here).
AUTO_UNPLUG = 16.0
# Our namespaces are evs<pytest pid>-*: not conftest's evt<pid>-*, whose subnet is 10.231.x.
PREFIX = "evs"
STALE = re.compile(rf"^{PREFIX}(\d+)-(pc[123]|br)$")

# Run inside a PC: how many committed (or all) records of TOPIC carry KEY, from the start,
# read as the admin principal: the test's own view of the topic, not one of the roles'.
COUNT_RECORDS = """
import asyncio, sys
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from shared.kafka_access import KafkaLogin

async def main(bootstrap, topic, key, isolation, password_file, ca):
    login = KafkaLogin.from_files("admin", password_file, ca).client_options()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **login)  # only for the metadata
    await producer.start()
    try:
        numbers = await producer.partitions_for(topic)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level=isolation, enable_auto_commit=False, **login
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, number) for number in numbers]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        count = 0
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                count += sum(record.key == key.encode() for record in records)
        print(count)
    finally:
        await consumer.stop()

asyncio.run(asyncio.wait_for(main(*sys.argv[1:]), 30))
"""

# Run inside a PC: the role on a /healthz, whatever its status ("None" if nothing answered);
# Central's certificate is verified with the CA.
READ_ROLE = """
import json, ssl, sys, urllib.error, urllib.request
tls = ssl.create_default_context(cafile=sys.argv[2])
opener = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls)
)
try:
    with opener.open(sys.argv[1], timeout=10) as answer:
        body = answer.read()
except urllib.error.HTTPError as exc:
    body = exc.read()
except OSError:
    body = b"{}"
print(json.loads(body or b"{}").get("role"))
"""


def run(args: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)}: exit {proc.returncode}\n{output}"
    return proc.stdout


def clean_our_stale() -> None:
    """Remove the namespaces of an earlier run of this module that crashed (its pid is gone)."""
    names = run(["ip", "netns", "list"], 10).split()
    for pid in {int(m.group(1)) for m in map(STALE.match, names) if m}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            continue
        SimulatedNetwork(f"{PREFIX}{pid}", "10.232.0").down()


class NamespacedCluster:
    """Three secured Kafka nodes inside one PC (`scripts/kafka.sh cluster`), on its address."""

    def __init__(self, netns: str, host: str, run_dir: Path, keys: Keys) -> None:
        self.netns = netns
        self.bootstrap = ",".join(f"{host}:{KAFKA_BASE_PORT + i}" for i in range(3))
        self.env = {
            **os.environ,
            "EV_KAFKA_LISTEN_HOST": host,
            "EV_KAFKA_ADVERTISED_HOST": host,
            "EV_KAFKA_RUN_DIR": str(run_dir),
            "EV_KAFKA_SECURE_DIR": str(keys.dir),
            "PYTHON": sys.executable,
        }

    def _kafka_sh(self, *args: str, timeout: float) -> None:
        command = ["ip", "netns", "exec", self.netns, str(KAFKA_SH), "cluster", *args]
        run([*command, str(KAFKA_BASE_PORT)], timeout, self.env)

    def start(self) -> None:
        need_tool(self.env.get("JAVA", "java"), "Kafka tests", "openjdk-17-jre-headless")
        self._kafka_sh("start", "3", timeout=scaled(300))

    def stop(self) -> None:
        self._kafka_sh("stop", timeout=scaled(60))


@dataclass
class Site:
    net: SimulatedNetwork
    kafka: NamespacedCluster
    workdir: Path
    keys: Keys


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """Our own three PCs with the Kafka cluster on PC3, torn down whatever happens."""
    need_root("multi-host tests (network namespaces)")
    need_tool("ip", "multi-host tests", "iproute2")
    clean_our_stale()
    pid = os.getpid()
    net = SimulatedNetwork(f"{PREFIX}{pid}", f"10.232.{pid % 250 + 1}")
    keys = Keys(tmp_path / "keys")
    # One certificate for every node, valid on each PC as the deployment's is (the nodes all
    # listen on PC3 here); one for both Centrals, which the monitor dials by their PCs.
    keys.make(
        {
            "kafka": [net.ip(pc) for pc in ("pc1", "pc2", "pc3")],
            "central": ["central", net.ip("pc2"), net.ip("pc1")],
        }
    )
    kafka = NamespacedCluster(net.ns("pc3"), net.ip("pc3"), tmp_path / "kafka", keys)
    try:
        net.up()
        try:
            kafka.start()
            keys.make_logins(net.ns("pc3"), kafka.bootstrap, ["CP001"])
            yield Site(net, kafka, tmp_path, keys)
        finally:
            kafka.stop()
    finally:
        leftovers = net.pids()  # every process of the test has stopped by now
        net.down()
        assert not net.namespaces(), f"namespaces left behind: {net.namespaces()}"
        assert not leftovers, f"processes still running in the namespaces: {leftovers}"


class HACentral:
    """One Central of the pair (--ha) on one PC: its process, database and admin URL."""

    def __init__(self, site: Site, pc: str, name: str, audit_key: str) -> None:
        self.name = name
        self.url = f"https://{site.net.ip(pc)}:{CENTRAL_HTTP_PORT}"
        self.ca = site.keys.ca
        workdir = site.workdir / name
        workdir.mkdir()
        self.db_path = workdir / "central.db"
        key_file = workdir / "central.db.audit-key"
        key_file.write_text(audit_key)
        key_file.chmod(0o600)
        args = [
            *("-m", "EV_Central", "--ha", "--advertise", site.net.ip(pc)),
            *("--port", str(CENTRAL_PORT), "--http-port", str(CENTRAL_HTTP_PORT)),
            *("--broker", site.kafka.bootstrap, "--db", str(self.db_path)),
            *("--listen-host", "0.0.0.0", "--lease-timeout", f"{LEASE_TIMEOUT:g}"),
            *("--console", "log", "--demo"),
            *("--tls-cert", str(site.keys.cert("central"))),
            *("--tls-key", str(site.keys.key("central"))),
            *site.keys.kafka_flags("central"),
        ]
        self.process = HostProcess(site.net.ns(pc), name, args, site.workdir)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Read the database file (read-only: a missing file is not created behind Central)."""
        uri = f"file:{self.db_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            return db.execute(sql).fetchall()

    def ledger(self) -> dict[str, list[tuple[Any, ...]]] | None:
        """Sessions and balances, or None while the database is being rebuilt."""
        try:
            return {
                "sessions": self.query(
                    "SELECT id, cp_id, driver_id, status, kwh, amount_cents, ticket_revision"
                    " FROM sessions ORDER BY id"
                ),
                "balances": self.query("SELECT id, balance_cents FROM users ORDER BY id"),
            }
        except sqlite3.Error:
            return None

    def verify_audit(self) -> None:
        verified = subprocess.run(
            [sys.executable, "-m", "EV_Central", "audit", "verify", "--db", str(self.db_path)],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            check=False,
            timeout=scaled(60),
        )
        assert verified.returncode == 0, (self.name, verified.stdout + verified.stderr)
        assert "MACs" in verified.stdout and "NOT" not in verified.stdout, verified.stdout


async def role(probe: Probe, central: HACentral) -> Any:
    """The role on the Central's /healthz as seen from the probe's PC, None if unreachable."""
    status, body = await probe.get(central.url + "/healthz")
    # 503 is a Central that cannot reach Kafka: degraded, but it still says its role.
    return body.get("role") if status in (200, 503) and isinstance(body, dict) else None


def role_within(net: SimulatedNetwork, pc: str, central: HACentral) -> Any:
    """The role, asked from inside `pc` with time to spare: a Central cut off from Kafka
    answers /healthz only after its broker check has timed out (longer than a Probe waits)."""
    out = run(
        ["ip", "netns", "exec", net.ns(pc), sys.executable, "-c", READ_ROLE]
        + [central.url + "/healthz", str(central.ca)],
        scaled(30),
    )
    return out.strip()


async def wait_role(probe: Probe, central: HACentral, wanted: str, timeout: float) -> float:
    """Seconds until `central` says it is `wanted`, seen from the probe's PC."""
    started = time.monotonic()
    seen: list[Any] = []

    async def reached() -> bool:
        seen.append(await role(probe, central))
        return bool(seen[-1] == wanted)

    await wait_for(
        reached,
        timeout,
        interval=0.1,
        message=f"{central.name} never {wanted} (last {seen[-1:]}):\n"
        + central.process.output[-4000:],
    )
    return time.monotonic() - started


def count_records(site: Site, pc: str, key: str, isolation: str) -> int:
    """Records of the driver updates topic keyed `key`, read from the start inside `pc`."""
    admin = [str(site.keys.admin_password), str(site.keys.ca)]
    out = run(
        ["ip", "netns", "exec", site.net.ns(pc), sys.executable, "-c", COUNT_RECORDS]
        + [site.kafka.bootstrap, Topics.DRIVER_UPDATES, key, isolation, *admin],
        scaled(60),
    )
    return int(out.split()[-1])


def events(driver: HostProcess, kind: str) -> list[dict[str, Any]]:
    return [e for e in driver.json_events() if e.get("event") == kind]


@pytest.mark.timeout(480)
async def test_active_central_cut_off_mid_supply_is_fenced_and_rebuilds_as_standby(
    site: Site,
) -> None:
    net, bootstrap, keys = site.net, site.kafka.bootstrap, site.keys
    audit_key = secrets.token_bytes(32).hex() + "\n"
    a = HACentral(site, "pc2", "central-a", audit_key)
    b = HACentral(site, "pc1", "central-b", audit_key)
    cp_addr = f"{net.ip('pc3')}:{ENGINE_PORT}"
    engine = HostProcess(
        net.ns("pc3"),
        "engine-CP001",
        [
            *("-m", "EV_CP_E", "--broker", bootstrap, "--listen", cp_addr),
            *("--auto-plug", "1", "--auto-unplug", f"{scaled(AUTO_UNPLUG):g}"),
            *("--secret", "demo-secret-CP001"),
            *keys.kafka_flags("cp-CP001"),
        ],
        site.workdir,
    )
    centrals = f"{net.ip('pc2')}:{CENTRAL_PORT},{net.ip('pc1')}:{CENTRAL_PORT}"
    monitor = HostProcess(
        net.ns("pc3"),
        "monitor-CP001",
        [
            *("-m", "EV_CP_M", "--engine", cp_addr, "--central", centrals),
            *("--cp-id", "CP001", "--broker", bootstrap, "--secret", "demo-secret-CP001"),
            *("--tls-ca", str(keys.ca)),
            *keys.kafka_flags("monitor"),
        ],
        site.workdir,
    )
    driver = HostProcess(
        net.ns("pc1"),
        "driver-user1",
        [
            *("-m", "EV_Driver", "--broker", bootstrap, "--driver-id", "user1"),
            *("--password", "pass1", "--cp", "CP001", "--json"),
            *keys.kafka_flags("driver"),
        ],
        site.workdir,
    )
    processes = [a.process, b.process, engine, monitor, driver]
    on_pc1, on_pc2 = Probe(net.ns("pc1"), keys.ca), Probe(net.ns("pc2"), keys.ca)
    try:
        await on_pc1.start()
        await on_pc2.start()
        a.process.start()
        await wait_role(on_pc2, a, "active", 90)
        b.process.start()
        await wait_role(on_pc1, b, "standby", 60)
        engine.start()
        monitor.start()
        await CentralView(on_pc2, a.url).wait_states(("CP001",), "ACTIVADO", 60, interval=0.3)
        driver.start()
        await wait_for(
            lambda: events(driver, "started"),
            60,
            message=f"no supply started:\n{driver.output[-3000:]}",
        )

        # PC2's cable is pulled: A reaches neither Kafka nor the monitor, and does not know it.
        cut_at = time.monotonic()
        net.cut("pc2")
        bound = LEASE_TIMEOUT + 4
        took_over = await wait_role(on_pc1, b, "active", bound)
        TIMINGS.append(("PC2 cut off -> Central B active", took_over, scaled(bound)))
        a_says = await asyncio.to_thread(role_within, net, "pc2", a)
        print(f"\nB active {took_over:.2f} s after the cut; A, asked on PC2, says {a_says}")
        from_b = CentralView(on_pc1, b.url)
        await from_b.wait_states(("CP001",), "SUMINISTRANDO", 30, interval=0.2)
        print(f"CP001 supplying on B {time.monotonic() - cut_at:.2f} s after the cut")

        # The supply ends with one ticket carrying the engine's energy, billed once, by B.
        assert await driver.wait_exit(90) == 0, driver.output[-3000:]
        [ticket] = events(driver, "ticket")
        metered = re.search(r"ended \(unplugged\): ([\d.]+) kWh", engine.output)
        assert metered is not None, engine.output[-3000:]
        assert ticket["kwh"] == pytest.approx(float(metered.group(1)), abs=1e-4)
        sessions = b.query("SELECT id, status, kwh, amount_cents FROM sessions")
        assert sessions == [
            (ticket["session_id"], "COMPLETED", ticket["kwh"], round(ticket["amount_eur"] * 100))
        ], sessions
        [(balance,)] = b.query("SELECT balance_cents FROM users WHERE id = 'user1'")
        assert balance == 15000 - sessions[0][3]
        delivered = await asyncio.to_thread(count_records, site, "pc1", "user1", "read_committed")
        # Meanwhile A, sure it is still active, has settled the supply its own way: this is
        # what must reach nobody.
        assert "ending supply of user1 (monitor_lost)" in a.process.output, a.process.output

        # PC2 is back: A learns it was deposed (or is fenced) and starts again as a standby.
        # Cut off for longer than its transactions may wait, A has already stepped down.
        net.mend("pc2")
        mended_at = time.monotonic()
        await wait_role(on_pc1, a, "standby", 60)
        print(f"A standby {time.monotonic() - mended_at:.2f} s after the mend")
        assert re.search(
            r"another Central (has fenced this one|holds the lease now)|in a transaction \(cut off",
            a.process.output,
        ), a.process.output[-4000:]

        # Nothing A did while cut off reached anyone: no update for user1 was committed since
        # the ticket, B still has its one session, and A's rebuilt database is B's.
        def same_ledger() -> dict[str, list[tuple[Any, ...]]] | None:
            mine, theirs = a.ledger(), b.ledger()
            if mine is None or mine != theirs:
                return None
            # Equal and empty, or equal halfway, is two databases being rebuilt at once.
            rebuilt = ticket["session_id"] in {row[0] for row in mine["sessions"]}
            return mine if rebuilt and ("user1", balance) in mine["balances"] else None

        ledger = await wait_for(
            same_ledger,
            30,
            message=f"A's database never matched B's: {a.ledger()} vs {b.ledger()}",
        )
        [(session_id, cp_id, driver_id, status, *_)] = ledger["sessions"]
        assert (session_id, cp_id, driver_id, status) == (
            ticket["session_id"],
            "CP001",
            "user1",
            "COMPLETED",
        )
        after = await asyncio.to_thread(count_records, site, "pc1", "user1", "read_committed")
        written = await asyncio.to_thread(count_records, site, "pc1", "user1", "read_uncommitted")
        print(f"user1's updates: {after} committed, {written - after} aborted")
        assert after == delivered
        assert len(events(driver, "started")) == 1 and len(events(driver, "ticket")) == 1
        for central in (a, b):
            await asyncio.to_thread(central.verify_audit)
        for proc in (a.process, b.process, monitor):
            assert "Traceback" not in proc.output, proc.output[-4000:]

        # The lease stayed with B: a Central coming back must not depose the healthy active
        # one (the sticky assignor, docs/high-availability.md).
        assert "the lease went to another Central" not in b.process.output, (
            "B, the healthy active Central, lost the lease to A coming back:\n"
            + b.process.output[-3000:]
        )
        assert (await role(on_pc1, a), await role(on_pc1, b)) == ("standby", "active")
    finally:
        for proc in reversed(processes):
            proc.stop()
        await on_pc1.close()
        await on_pc2.close()
