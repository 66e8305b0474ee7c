"""The chaos schedule: the same seed gives the same faults; bad input is named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.chaos.run import targets
from tools.chaos.schedule import KINDS, ScheduleError, make_schedule, parse_kinds
from tools.chaos.system import REPO, Settings

CPS = ["CP001", "CP002", "CP003", "CP004"]
DRIVERS = ["user1", "user2", "user3", "user4"]


def schedule(seed: int, duration: float = 120.0, kinds: tuple[str, ...] = tuple(KINDS)) -> list:
    hits = targets(Settings(out=REPO / "unused"), CPS, DRIVERS)
    return make_schedule(seed, duration, kinds, hits, rate=15)


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    assert schedule(7) == schedule(7)
    assert schedule(7) != schedule(8)


def test_a_two_minute_run_has_twenty_faults_of_four_kinds_or_more() -> None:
    for seed in range(20):
        faults = schedule(seed)
        assert len(faults) >= 15, (seed, len(faults))
        assert len({f.kind for f in faults}) >= 4, seed
    faults = schedule(2026)  # the seed `make test` runs
    assert len(faults) >= 20 and len({f.kind for f in faults}) >= 4


def test_faults_stay_inside_the_run_and_never_hit_a_part_that_is_down() -> None:
    faults = schedule(3, duration=600)
    assert all(10 <= f.at and f.at < 600 - 15 for f in faults)
    busy: dict[str, float] = {}
    for f in faults:
        part = {"kill-engine": "engine-", "kill-monitor": "monitor-", "kill-driver": "driver-"}
        name = part.get(f.kind, "") + f.target if f.kind != "stop-cp" else f"service {f.target}"
        assert busy.get(name, 0.0) <= f.at, f
        busy[name] = f.at + f.length + 2.0
    shifts = [f.detail for f in faults if f.kind == "clock"]
    assert shifts and all(s.endswith("s") and s[0] in "+-" for s in shifts)


def test_only_the_kinds_asked_for() -> None:
    faults = schedule(5, kinds=("pause", "kill-engine"))
    assert {f.kind for f in faults} == {"pause", "kill-engine"}
    assert parse_kinds("all") == tuple(KINDS)
    assert parse_kinds("pause, pause,stop-cp") == ("pause", "stop-cp")
    with pytest.raises(ScheduleError, match="unknown fault kind 'kill-all'"):
        parse_kinds("pause,kill-all")
    with pytest.raises(ScheduleError, match="too short"):
        schedule(1, duration=20)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--faults", "explode"], "unknown fault kind 'explode'"),
        (["--seed", "twelve"], "the seed must be a whole number, got 'twelve'"),
        (["--duration", "-5"], "expected a positive number of seconds"),
        (["--cps", "40"], "--cps must be 1..10"),
    ],
)
def test_bad_input_gets_a_one_line_error(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.chaos", "--schedule-only", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert done.stderr.startswith("python -m tools.chaos: error: ")


def test_no_kafka_jars_is_a_one_line_error(tmp_path: Path) -> None:
    """Without the jars in the cache and with Maven failing, the tool says so and stops."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mvn").write_text("#!/bin/sh\necho 'no network' >&2\nexit 1\n")
    (fake / "mvn").chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-m", "tools.chaos", "--duration", "60", "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PATH": f"{fake}:{os.environ['PATH']}",
            "EV_KAFKA_CACHE": str(tmp_path / "cache"),
        },
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "cannot get Kafka's jars" in done.stderr
    assert not (tmp_path / "o").exists()
