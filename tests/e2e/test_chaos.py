"""A seeded two-minute chaos run (tools/chaos): twenty faults or more, of four kinds or more,
and not one invariant violated (docs/reliability.md). Real processes: its own Kafka broker,
Central, four CPs, four driver apps and the fleet simulator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from procs import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.timeout(900)]

SEED = 2026


def test_two_minutes_of_random_faults_lose_nothing_and_bill_right(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    done = subprocess.run(
        [sys.executable, "-m", "tools.chaos", "--seed", str(SEED), "--duration", "120"]
        + ["--fleet-cps", "100", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    results = json.loads((out / "results.json").read_text())
    report = done.stdout + done.stderr[-4000:]
    assert done.returncode == 0, report
    totals = results["totals"]
    assert totals["violations"] == 0, report
    assert totals["faults"] >= 20 and len(totals["faults_by_kind"]) >= 4, totals
    assert totals["supplies_real"] >= 10 and totals["supplies_sim"] >= 20, totals
    assert all(i["checked"] > 0 for i in results["invariants"] if "stopped" not in i["name"])
    assert (out / "timeline.png").stat().st_size > 10_000
    assert "PASS" in (out / "report.html").read_text()
