"""`scripts/netns.sh netem` and `clear` on the simulated PCs: a PC's link loses or delays
packets both ways, as asked, and is as it was once cleared (tools/netem.py, the chaos tool's
net-loss and net-delay faults). Datagrams from PC1 echoed by PC3 measure it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from statistics import median

import pytest
from netsim import NETNS_SH, SimulatedNetwork

from helpers import need_tool, scaled

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(180)]

PORT = 7777
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(64)
    s.sendto(data, peer)
"""
# Sends COUNT datagrams 10 ms apart, waits for the last echoes, prints what came back when.
PING = """
import json, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
sent, rtts = {}, []
def drain():
    while True:
        try:
            data, _ = s.recvfrom(64)
        except BlockingIOError:
            return
        rtts.append(time.monotonic() - sent[int(data)])
for i in range(count):
    sent[i] = time.monotonic()
    s.sendto(str(i).encode(), (host, port))
    time.sleep(0.01)
    drain()
deadline = time.monotonic() + 2.0
while time.monotonic() < deadline and len(rtts) < count:
    time.sleep(0.01)
    drain()
print(json.dumps({"sent": count, "rtts": rtts}))
"""


def netns_sh(net: SimulatedNetwork, *args: str) -> str:
    done = subprocess.run(
        [str(NETNS_SH), *args, net.prefix],
        env={**net.env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def echo(network: SimulatedNetwork) -> Iterator[None]:
    need_tool("iptables", "network faults", "iptables")
    server = subprocess.Popen(
        ["ip", "netns", "exec", network.ns("pc3"), sys.executable, "-c", ECHO]
        + [network.ip("pc3"), str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        yield
    finally:
        netns_sh(network, "clear", "pc3")
        server.kill()
        server.communicate()


def ping(net: SimulatedNetwork, count: int) -> tuple[float, list[float]]:
    """(share of the datagrams echoed, their round trips in seconds) from PC1 to PC3."""
    done = subprocess.run(
        ["ip", "netns", "exec", net.ns("pc1"), sys.executable, "-c", PING]
        + [net.ip("pc3"), str(PORT), str(count)],
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=True,
    )
    result = json.loads(done.stdout)
    return len(result["rtts"]) / result["sent"], sorted(result["rtts"])


def test_delay_holds_each_packet_both_ways_then_clear_puts_the_link_back(
    network: SimulatedNetwork, echo: None
) -> None:
    back, rtts = ping(network, 50)
    assert back == 1.0 and median(rtts) < 0.05, (back, rtts[:5])
    assert "pc3 netem: delay 100ms 20ms" in netns_sh(network, "netem", "pc3", "delay 100ms 20ms")
    assert "netem: ready on NFQUEUE 0: delay 100ms 20ms" in netns_sh(network, "status")
    back, rtts = ping(network, 100)
    # Out and back, each way 80 to 120 ms: nothing lost.
    assert back == 1.0
    assert 0.16 <= rtts[0] and 0.18 <= median(rtts) <= 0.25, (rtts[0], median(rtts))
    cleared = netns_sh(network, "clear", "pc3")
    done = re.search(r"netem: done: (\d+) packets: 0 dropped, (\d+) delayed", cleared)
    assert done and int(done[1]) == int(done[2]) >= 200, cleared
    back, rtts = ping(network, 50)
    assert back == 1.0 and median(rtts) < 0.05
    rules = subprocess.run(
        ["ip", "netns", "exec", network.ns("pc3"), "iptables-legacy", "-S"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "EVNETEM" not in rules.stdout


def test_loss_drops_its_share_each_way_and_a_second_netem_replaces_the_first(
    network: SimulatedNetwork, echo: None
) -> None:
    netns_sh(network, "netem", "pc3", "delay 300ms")
    netns_sh(network, "netem", "pc3", "loss 30%")  # the delay is gone with its program
    back, rtts = ping(network, 300)
    # 0.7 × 0.7 of the datagrams come back, and at once.
    assert 0.35 < back < 0.63 and median(rtts) < 0.05, (back, median(rtts))
    cleared = netns_sh(network, "clear", "pc3")
    done = re.search(r"netem: done: (\d+) packets: (\d+) dropped, 0 delayed", cleared)
    assert done, cleared
    seen, dropped = int(done[1]), int(done[2])
    assert 0.2 < dropped / seen < 0.4, cleared
    assert "netem: ready" not in netns_sh(network, "status")
