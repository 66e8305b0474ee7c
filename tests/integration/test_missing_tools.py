"""A test that needs a tool this machine lacks is skipped with the reason, and under CI's
EV_TEST_REQUIRE_ALL=1 fails instead: shown on a generated test that uses tests/helpers.py,
and on the browser and multi-host suites run with a PATH that has none of their tools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS = REPO_ROOT / "tests"

NEEDS_A_TOOL = """
from helpers import need_tool


def test_uses_the_tool():
    need_tool("ev-no-such-tool", "these tests", "ev-no-such-package")
"""


def run_pytest(
    args: list[str], cwd: Path, require_all: bool, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EV_TEST_REQUIRE_ALL", "EV_CHROMIUM")}
    env["PYTHONPATH"] = str(TESTS)
    if require_all:
        env["EV_TEST_REQUIRE_ALL"] = "1"
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def summary(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture
def generated(tmp_path: Path) -> Path:
    (tmp_path / "test_generated.py").write_text(NEEDS_A_TOOL)
    return tmp_path


# What tests/multihost/conftest.py says, before the test module's own skip mark could.
MULTIHOST_REASON = (
    "multi-host tests need ip, which is not installed"
    if os.geteuid() == 0
    else "multi-host tests (network namespaces) need root"
)
REASON = (
    "these tests need ev-no-such-tool, which is not installed (apt-get install ev-no-such-package)"
)


def test_a_missing_tool_skips_with_the_reason(generated: Path) -> None:
    proc = run_pytest(["test_generated.py"], generated, require_all=False)
    assert proc.returncode == 0, proc.stdout
    assert "SKIPPED [1] " in proc.stdout and REASON in proc.stdout
    assert summary(proc).startswith("1 skipped")


def test_under_require_all_a_missing_tool_fails_naming_it(generated: Path) -> None:
    proc = run_pytest(["test_generated.py"], generated, require_all=True)
    assert proc.returncode == 1, proc.stdout
    assert f"{REASON} (EV_TEST_REQUIRE_ALL=1: every test must run)" in proc.stdout
    assert summary(proc).startswith("1 failed")


@pytest.mark.parametrize(
    ("suite", "reason"),
    [
        (["tests/browser", "-k", "site"], "browser tests need chromium"),
        (["tests/multihost/test_across_hosts.py"], MULTIHOST_REASON),
    ],
    ids=["browser", "multihost"],
)
@pytest.mark.parametrize("require_all", [False, True], ids=["skip", "require-all"])
def test_the_suites_check_their_tools_before_anything_starts(
    tmp_path: Path, suite: list[str], reason: str, require_all: bool
) -> None:
    # An empty PATH: no chromium, no ip (and, not being root, no namespaces either).
    proc = run_pytest(suite, REPO_ROOT, require_all, path=str(tmp_path))
    assert reason in proc.stdout, proc.stdout
    if require_all:
        assert proc.returncode == 1, proc.stdout
        assert "error" in summary(proc) and "skipped" not in summary(proc)
    else:
        assert proc.returncode == 0, proc.stdout
        assert "skipped" in summary(proc) and "error" not in summary(proc)
