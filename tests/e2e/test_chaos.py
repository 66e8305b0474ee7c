"""A seeded two-minute chaos run (tools/chaos): twenty faults or more, of four kinds or more,
and not one invariant violated (docs/reliability.md). Real processes: its own Kafka broker,
Central, four CPs, four driver apps and the fleet simulator. Then a shorter one on three
simulated PCs (--net, root), with the network between them cut, lossy and slow as well."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import need_root, need_tool
from procs import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.timeout(900)]

SEED = 2026
NET_KINDS = ("net-cut", "net-loss", "net-delay")


def chaos(out: Path, *args: str) -> tuple[dict, str, str]:
    """Run the tool: its results, the end of what it printed (for a failure's message) and
    its progress lines in full."""
    done = subprocess.run(
        [sys.executable, "-m", "tools.chaos", "--seed", str(SEED), *args, "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    report = done.stdout + done.stderr[-4000:]
    assert (out / "results.json").exists(), report
    results = json.loads((out / "results.json").read_text())
    assert done.returncode == 0, report
    return results, report, done.stderr


def test_two_minutes_of_random_faults_lose_nothing_and_bill_right(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    results, report, _ = chaos(out, "--duration", "120", "--fleet-cps", "100")
    totals = results["totals"]
    assert totals["violations"] == 0, report
    assert totals["faults"] >= 20 and len(totals["faults_by_kind"]) >= 4, totals
    assert totals["supplies_real"] >= 10 and totals["supplies_sim"] >= 20, totals
    assert all(i["checked"] > 0 for i in results["invariants"] if "stopped" not in i["name"])
    assert (out / "timeline.png").stat().st_size > 10_000
    assert "PASS" in (out / "report.html").read_text()


def test_a_network_that_fails_between_the_pcs_loses_nothing_either(tmp_path: Path) -> None:
    """100 s on three simulated PCs (drivers on PC1, Kafka and Central on PC2, CPs on PC3) with
    every kind of fault, those of the network among them."""
    need_root("chaos runs on simulated PCs (network namespaces)")
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        need_tool(tool, "chaos runs on simulated PCs", package)
    out = tmp_path / "chaos"
    results, report, progress = chaos(out, "--net", "--duration", "100", "--fleet-cps", "50")
    totals = results["totals"]
    assert totals["violations"] == 0, report
    by_kind = totals["faults_by_kind"]
    assert all(by_kind.get(kind, 0) >= 1 for kind in NET_KINDS), by_kind
    net = [f for f in results["faults"] if f["kind"] in NET_KINDS]
    assert all("Error" not in f["detail"] for f in net), net
    # The losses and delays touched the PCs' traffic: the netem program counted it.
    for kind in ("net-loss", "net-delay"):
        counted = [f["detail"] for f in net if f["kind"] == kind]
        assert all(re.search(r": [1-9]\d* packets: ", d) for d in counted), counted
    assert any(re.search(r": [1-9]\d* dropped", f["detail"]) for f in net), net
    assert totals["supplies_real"] >= 5 and totals["supplies_sim"] >= 10, totals
    assert "--net" in results["command"]
    # The tool removed the PCs it made.
    made = re.search(r"simulated PCs (evc\d+)-pc1", progress)
    assert made, progress[:2000]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert f"{made[1]}-" not in listed.stdout, listed.stdout
