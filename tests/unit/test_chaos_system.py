"""The chaos tool's Kafka node: started again when it exits while starting, found by the pid file
kafka.sh writes, and not stopped again by a second restart-broker fault while it starts (which
made it exit while starting). A stand-in for scripts/kafka.sh fails as many times as asked and
takes as long as asked to start."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import tools.chaos.system as system
from tools.chaos.faults import FaultLog, inject
from tools.chaos.schedule import Fault
from tools.chaos.system import BROKER_RETRY_PAUSE, BROKER_START_TRIES, Broker, SystemError_

# Fails its first $FAILS starts as kafka.sh did in a long run, each leaving its broker.log;
# each start takes $START_SECONDS. Every command is written to `calls`.
FAKE_KAFKA_SH = """#!/bin/sh
dir="$EV_KAFKA_RUN_DIR"; [ "$1" = cluster ] && dir="$dir/node$3"
mkdir -p "$dir"
echo "$*" >> "$EV_KAFKA_RUN_DIR/calls"
case "$*" in *stop*) exit 0 ;; esac
sleep "${START_SECONDS:-0}"
n=$(( $(cat "$EV_KAFKA_RUN_DIR/tries" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$EV_KAFKA_RUN_DIR/tries"
echo "the log of start $n" > "$dir/broker.log"
if [ "$n" -le "$FAILS" ]; then
    echo "[2026-12-06 23:27:33,568] INFO [ControllerServer id=1] Starting controller" >&2
    echo "kafka.sh: broker exited during startup" >&2
    exit 1
fi
echo "4242 " > "$dir/kafka.pid"
"""


@pytest.fixture
def kafka_sh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The stand-in in place of kafka.sh; the pauses between tries, taken without waiting."""
    script = tmp_path / "kafka.sh"
    script.write_text(FAKE_KAFKA_SH)
    script.chmod(0o755)
    monkeypatch.setattr(system, "KAFKA_SH", script)
    pauses: list[float] = []
    monkeypatch.setattr(time, "sleep", pauses.append)  # the module tools.chaos.system uses
    return pauses


def broker(tmp_path: Path, fails: int, cluster: bool = False, start_seconds: float = 0) -> Broker:
    env = {
        "EV_KAFKA_RUN_DIR": str(tmp_path / "kafka"),
        "FAILS": str(fails),
        "START_SECONDS": str(start_seconds),
    }
    if cluster:
        return Broker(2, 19093, env, base=19092)
    return Broker(0, 19092, env)


@pytest.mark.parametrize("cluster", [False, True])
def test_a_broker_that_exits_while_starting_is_started_again(
    tmp_path: Path, kafka_sh: list[float], caplog: pytest.LogCaptureFixture, cluster: bool
) -> None:
    node = broker(tmp_path, fails=2, cluster=cluster)
    with caplog.at_level(logging.WARNING, logger="tools.chaos.system"):
        assert node.start() == ["broker exited during startup"] * 2
    assert node.up and kafka_sh == [BROKER_RETRY_PAUSE] * 2
    assert node.pid() == 4242
    # Each failed start's log is kept: the next start empties broker.log.
    for n in (1, 2):
        kept = node.run_dir / f"broker.log.failed-start-{n}"
        assert kept.read_text() == f"the log of start {n}\n"
    assert (node.run_dir / "broker.log").read_text() == "the log of start 3\n"
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        f"{node.name} did not start (try {n} of {BROKER_START_TRIES}: broker exited during startup"
        for n in (1, 2)
    ]


def test_a_broker_that_never_starts_is_an_error_after_the_last_try(
    tmp_path: Path, kafka_sh: list[float]
) -> None:
    node = broker(tmp_path, fails=BROKER_START_TRIES)
    with pytest.raises(SystemError_, match="broker exited during startup"):
        node.start()
    assert not node.up and node.pid() is None
    assert len(kafka_sh) == BROKER_START_TRIES - 1
    assert (tmp_path / "kafka" / "tries").read_text().strip() == str(BROKER_START_TRIES)


def test_a_broker_that_starts_at_once_says_so(tmp_path: Path, kafka_sh: list[float]) -> None:
    node = broker(tmp_path, fails=0)
    assert node.start() == [] and node.up and kafka_sh == []
    # The pid that a "pause" fault stops: kafka.sh's pid file (it was looked for under another
    # name, so no broker was ever paused).
    assert node.pid() == 4242


async def test_a_broker_still_restarting_from_one_fault_is_left_alone_by_the_next(
    tmp_path: Path, kafka_sh: list[float]
) -> None:
    """The half-hour run's 8 failed restarts each had a second restart-broker begin while the
    broker started: its stop ended the starting broker."""
    node = broker(tmp_path, fails=0, start_seconds=1.5)
    running = SimpleNamespace(broker=lambda name: node)
    log = FaultLog()
    t0 = time.monotonic()
    first = Fault(0.0, "restart-broker", "broker", 0.1)
    second = Fault(0.8, "restart-broker", "broker", 0.1)

    async def at(fault: Fault) -> None:
        await asyncio.sleep(fault.at)
        await inject(running, fault, log, t0)  # type: ignore[arg-type]  # a stand-in System

    await asyncio.gather(at(first), at(second))
    whats = {done.fault.at: done.what for done in log.done}
    assert whats[0.0] == "stopped Kafka broker, started it again after 0.1 s"
    assert whats[0.8] == "broker still restarting from an earlier fault: not restarted again"
    calls = (tmp_path / "kafka" / "calls").read_text().splitlines()
    assert calls == ["stop 19092", "start 19092"]
    assert node.up and not node.restarting
