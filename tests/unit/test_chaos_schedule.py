"""The chaos schedule: the same seed gives the same faults; bad input is named. The network
faults (--net) are drawn the same way, and only on the simulated PCs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tools.chaos.__main__ as chaos_main
from tools.chaos.run import NET_TARGETS, targets
from tools.chaos.schedule import (
    DEFAULT_KINDS,
    KINDS,
    LENGTHS,
    NET_KINDS,
    Fault,
    ScheduleError,
    make_schedule,
    parse_kinds,
    summary,
)
from tools.chaos.system import REPO, Hosts, Settings

CPS = ["CP001", "CP002", "CP003", "CP004"]
DRIVERS = ["user1", "user2", "user3", "user4"]
HOSTS = Hosts("evc1", "10.232.2")


def schedule(
    seed: int, duration: float = 120.0, kinds: tuple[str, ...] = DEFAULT_KINDS, net: bool = False
) -> list[Fault]:
    hits = targets(Settings(out=REPO / "unused", hosts=HOSTS if net else None), CPS, DRIVERS)
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
    assert parse_kinds("all") == DEFAULT_KINDS
    assert parse_kinds("pause, pause,stop-cp") == ("pause", "stop-cp")
    with pytest.raises(ScheduleError, match="unknown fault kind 'kill-all'"):
        parse_kinds("pause,kill-all")
    with pytest.raises(ScheduleError, match="too short"):
        schedule(1, duration=20)


def test_network_faults_only_with_the_simulated_pcs() -> None:
    assert not set(NET_KINDS) & set(DEFAULT_KINDS)
    assert parse_kinds("all", net=True) == tuple(KINDS)
    assert set(NET_KINDS) <= set(KINDS)
    assert parse_kinds("net-cut,pause", net=True) == ("net-cut", "pause")
    for kind in NET_KINDS:
        with pytest.raises(ScheduleError, match=f"fault kind '{kind}' needs the simulated PCs"):
            parse_kinds(f"pause,{kind}")
    # Without the PCs there is nothing for them to hit, even if asked for.
    assert not any(targets(Settings(out=REPO / "unused"), CPS, DRIVERS)[k] for k in NET_KINDS)


def test_network_faults_are_seeded_and_hit_any_pc_one_fault_at_a_time() -> None:
    assert schedule(7, net=True) == schedule(7, net=True)
    assert schedule(7, net=True) != schedule(8, net=True)
    faults = schedule(4, duration=1200, kinds=NET_KINDS, net=True)
    assert {f.kind for f in faults} == set(NET_KINDS)
    assert {f.target for f in faults} == set(NET_TARGETS) == {"pc1", "pc2", "pc3"}
    for f in faults:
        low, high = LENGTHS[f.kind]
        assert low <= f.length <= high, f
    losses = [
        int(f.detail.removeprefix("loss ").removesuffix("%"))
        for f in faults
        if f.kind == "net-loss"
    ]
    assert losses and all(10 <= p <= 40 for p in losses) and len(set(losses)) > 3
    delays = [f.detail.split() for f in faults if f.kind == "net-delay"]
    for word, delay, jitter in delays:
        ms = int(delay.removesuffix("ms"))
        assert word == "delay" and 100 <= ms <= 400 and ms % 10 == 0, delay
        assert jitter == f"{ms // 5}ms"
    assert all(f.detail == "" for f in faults if f.kind == "net-cut")
    # One fault at a time on a PC's link (a loss would replace a delay, a mend end a loss).
    free: dict[str, float] = {}
    for f in faults:
        assert free.get(f.target, 0.0) <= f.at, f
        free[f.target] = f.at + f.length + 2.0


def test_the_network_run_of_make_test_has_each_network_kind() -> None:
    """tests/e2e/test_chaos.py's run on the simulated PCs: seed 2026, 100 s, every kind."""
    faults = make_schedule(
        2026,
        100,
        parse_kinds("all", net=True),
        targets(Settings(out=REPO / "unused", hosts=HOSTS), CPS, DRIVERS),
        rate=15,
    )
    counts = summary(faults)
    assert all(counts.get(kind, 0) >= 1 for kind in NET_KINDS), counts
    # Without --net the same seed draws what it always drew: no network fault in it.
    assert not any(f.kind in NET_KINDS for f in schedule(2026))


def test_net_needs_root_ip_and_iptables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert chaos_main._cannot_make_hosts() == "root (network namespaces)"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "iptables" else tool)
    assert chaos_main._cannot_make_hosts() == (
        "iptables, which is not installed (apt-get install iptables)"
    )


def test_schedule_only_shows_the_network_faults_without_making_the_pcs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.chaos", "--schedule-only", "--net", "--seed", "2026"]
        + ["--duration", "100"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    kinds = {json.loads(line)["kind"] for line in done.stdout.splitlines()}
    assert set(NET_KINDS) <= kinds


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--faults", "explode"], "unknown fault kind 'explode'"),
        (
            ["--faults", "pause,net-loss"],
            "fault kind 'net-loss' needs the simulated PCs: add --net",
        ),
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
