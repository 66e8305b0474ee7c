"""The network on a three-node Kafka cluster: a broker may fail mid-supply and nothing is lost.

Every topic has three copies and a write counts once two have it; every producer waits for
those copies and is idempotent, so a retry after a failover neither loses nor repeats a record.
Real processes: Central, a CP's engine and monitor, a driver app, and three Kafka nodes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from cluster import Cluster
from helpers import free_port
from procs import Deployment
from shared.bus import Topics

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.slow]


async def leader_of(bootstrap: str, topic: str, key: bytes) -> int:
    """The node that leads the partition `key` goes to in `topic`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-leader")
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        partitions = {p["partition"]: p for p in described["partitions"]}
        assert all(len(p["replicas"]) == 3 for p in partitions.values()), partitions
        ids = sorted(partitions)
        return int(partitions[DefaultPartitioner()(key, ids, ids)]["leader"])
    finally:
        await admin.close()


async def test_a_supply_carries_on_when_a_broker_fails(
    kafka_cluster: Cluster, tmp_path: Path
) -> None:
    # The first address of every service's broker list is dead: the others are used. So is
    # the first Central the monitor is given.
    brokers = f"127.0.0.1:{free_port()},{kafka_cluster.bootstrap}"
    system = Deployment(brokers, tmp_path)
    try:
        await system.start_central()
        system.start_engine("CP001", "--auto-plug", "1", "--auto-unplug", "12")
        centrals = f"127.0.0.1:{free_port()},127.0.0.1:{system.central_port}"
        monitor = system.start_monitor("CP001", "--central", centrals)
        await system.wait_state("CP001", "ACTIVADO", timeout=30)
        assert "cannot reach Central at" in monitor.output  # the dead one, said once
        driver = system.start_driver("user1", "--cp", "CP001")
        await driver.wait_output('"event":"started"', 30)

        # The broker that leads CP001's events (its telemetry and its final figures) fails.
        node = await leader_of(kafka_cluster.bootstrap, Topics.CP_EVENTS, b"CP001")
        killed_at = len(driver.output)
        kafka_cluster.kill_node(node)

        assert await driver.wait_exit(60) == 0, driver.output[-3000:]
        assert driver.output.find('"event":"telemetry"', killed_at) > 0, "no figures after"
        [ticket] = [e for e in driver.json_events() if e["event"] == "ticket"]
        assert ticket["reason"] == "unplugged"
        # Exactly the engine's energy, billed once.
        engine = system.engines["CP001"]
        match = re.search(r"ended \(unplugged\): ([\d.]+) kWh", engine.output)
        assert match is not None, engine.output[-2000:]
        assert ticket["kwh"] == pytest.approx(float(match.group(1)), abs=1e-4)
        rows = system.query("SELECT status, kwh, amount_cents FROM sessions")
        assert rows == [("COMPLETED", ticket["kwh"], round(ticket["amount_eur"] * 100))]
        assert system.balance("user1") == 15000 - rows[0][2]
        await system.wait_state("CP001", "ACTIVADO")
    finally:
        system.stop_all()
        kafka_cluster.heal()


async def test_a_cluster_without_a_majority_is_reported_in_one_line(
    kafka_cluster: Cluster, tmp_path: Path
) -> None:
    system = Deployment(kafka_cluster.bootstrap, tmp_path)
    try:
        kafka_cluster.kill_node(2)
        kafka_cluster.kill_node(3)
        driver = system.start_driver("user1", "--cp", "CP001")
        # Kafka keeps the request waiting, or refuses it at once (a node it names is down):
        # either way one line, not one per retry.
        one_line = (
            r"Kafka at \S+ has .* for 10 s: are its brokers"
            r"|cannot set up the topics on Kafka at \S+ .*most of a cluster's nodes"
        )
        said = await driver.wait_output(one_line, 60)
        assert "Traceback" not in driver.output
        assert len(re.findall(one_line, driver.output)) == 1  # once, not per retry
        kafka_cluster.start_node(2)
        kafka_cluster.start_node(3)
        await driver.wait_output(r"Kafka at \S+ answers again", 60, said.end())
        assert driver.running
    finally:
        system.stop_all()
        kafka_cluster.heal()
