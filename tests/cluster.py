"""A Kafka cluster for tests: three nodes started with `scripts/kafka.sh cluster`."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from helpers import free_port, need_tool, scaled

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO_ROOT / "scripts" / "kafka.sh"


def kafka_sh(args: list[str], env: dict[str, str], timeout: float) -> None:
    """Run scripts/kafka.sh; a failure fails the test with the script's output."""
    proc = subprocess.run(
        [str(KAFKA_SH), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/kafka.sh {' '.join(args)} failed (exit {proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )


class Cluster:
    """Three Kafka nodes started with `scripts/kafka.sh cluster`; a test may stop one."""

    def __init__(self, base_port: int, run_dir: Path, nodes: int = 3) -> None:
        self.base_port = base_port
        self.nodes = nodes
        self.env = {**os.environ, "EV_KAFKA_RUN_DIR": str(run_dir)}
        self.ports = [base_port + i for i in range(nodes)]
        self.bootstrap = ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def _run(self, *args: str, timeout: float) -> None:
        kafka_sh(["cluster", *args, str(self.base_port)], self.env, timeout)

    def start(self) -> None:
        need_tool(self.env.get("JAVA", "java"), "Kafka tests", "openjdk-17-jre-headless")
        self._run("start", str(self.nodes), timeout=scaled(300))

    def stop(self) -> None:
        self._run("stop", timeout=scaled(60))

    def kill_node(self, node: int) -> None:
        """SIGKILL one node (1..nodes), as a PC switched off would: no clean hand-over."""
        pid_file = Path(self.env["EV_KAFKA_RUN_DIR"]) / f"node{node}" / "kafka.pid"
        os.kill(int(pid_file.read_text()), 9)

    def start_node(self, node: int) -> None:
        self._run("start-node", str(node), timeout=scaled(120))

    def heal(self) -> None:
        """Every node up again, for the next test of the module (a no-op for those up)."""
        for node in range(1, self.nodes + 1):
            self.start_node(node)


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive free ports."""
    for _ in range(50):
        base = free_port()
        if base + count < 65536 and all(_port_free(base + i) for i in range(1, count)):
            return base
    raise AssertionError(f"no {count} consecutive free ports found")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
