"""Fixtures for the multi-host tests: three simulated PCs and the deployment running on them.

One set of namespaces, one broker, one Central and two CPs serve the whole module (starting
Kafka is the slow part), secured as the compose files run them (netsim.MultiHostDeployment):
the certificates and Kafka's logins are made once, with the broker. Before each test the
`hosts` fixture puts every PC back on the network, restarts Central if a test left it stopped,
and waits until both CPs are ACTIVADO.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netsim import (
    CP_IDS,
    TIMINGS,
    CentralView,
    MultiHostDeployment,
    Probe,
    SimulatedNetwork,
)

from helpers import need_root, need_tool, wait_for


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # First of all, before the modules' own skip marks and before any fixture: a test on the
    # simulated hosts is skipped here (or fails, under EV_TEST_REQUIRE_ALL=1) when this machine
    # cannot make network namespaces.
    if "network" in item.fixturenames:
        need_root("multi-host tests (network namespaces)")
        need_tool("ip", "multi-host tests", "iproute2")


@pytest.fixture(scope="module")
def network() -> Iterator[SimulatedNetwork]:
    SimulatedNetwork.clean_stale()
    pid = os.getpid()
    net = SimulatedNetwork(f"evt{pid}", f"10.231.{pid % 250 + 1}")
    try:
        net.up()
        yield net
    finally:
        leftovers = net.pids()  # the deployment has stopped: nothing may still run here
        net.down()
        remaining = net.namespaces()
        assert not remaining, f"namespaces left behind: {remaining}"
        assert not leftovers, f"processes still running in the namespaces: {leftovers}"


@pytest.fixture(scope="module")
def deployment(
    network: SimulatedNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MultiHostDeployment]:
    system = MultiHostDeployment(network, tmp_path_factory.mktemp("multihost"))
    try:
        system.start_kafka()
        system.start_central()
        for cp_id in CP_IDS:
            system.start_cp(cp_id)
        yield system
    finally:
        system.stop_all()
        system.stop_kafka()


@dataclass
class Hosts:
    """What a test works with: the deployment and Central's API read from PC1 and from PC2."""

    net: SimulatedNetwork
    system: MultiHostDeployment
    from_pc1: CentralView
    from_pc2: CentralView
    workdir: Path


@pytest.fixture
async def hosts(deployment: MultiHostDeployment) -> AsyncIterator[Hosts]:
    net = deployment.net
    net.mend_all()
    if deployment.central is None or not deployment.central.running:
        deployment.start_central()
    probes = [Probe(net.ns("pc1"), deployment.ca), Probe(net.ns("pc2"), deployment.ca)]
    try:
        for probe in probes:
            await probe.start()
        url = deployment.central_url()
        from_pc2 = CentralView(probes[1], url)
        central = deployment.central
        assert central is not None
        await wait_for(
            from_pc2.healthy,
            120,
            interval=0.3,
            message=f"Central not healthy; its output:\n{central.output[-3000:]}",
        )
        await from_pc2.wait_states(CP_IDS, "ACTIVADO", 60, interval=0.3)
        yield Hosts(net, deployment, CentralView(probes[0], url), from_pc2, deployment.workdir)
    finally:
        deployment.stop_drivers()
        for probe in probes:
            await probe.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("multi-host timings")
    for what, seconds, bound in TIMINGS:
        terminalreporter.write_line(
            f"{what}: {seconds:.2f} s (bound {bound:g} s, margin {bound - seconds:.2f} s)"
        )
