"""scripts/prereqs.sh, which `make test`, `make run` and CI call first: on a PATH that lacks
some tools it names each missing piece and the one command that installs them, in one line,
within its first seconds; as root it installs them with apt-get (here a stand-in apt-get)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import need_root, need_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
PREREQS = REPO_ROOT / "scripts" / "prereqs.sh"
BASH = shutil.which("bash") or "/bin/bash"

# What `make test` checks; `make run` needs the first three.
TEST_TOOLS = (
    "python3",
    "java",
    "mvn",
    "make",
    "chromium",
    "docker-compose",
    "ip",
    "faketime",
    "iptables",
    "podman",
    "buildah",
    "debootstrap",
    "runc",
)
RUN_TOOLS = ("python3", "java", "mvn")
SUDO = "" if os.geteuid() == 0 else "sudo "
JAVA_17 = "echo 'openjdk version \"17.0.15\" 2025-04-15' >&2"


def stand_in(path: Path, body: str = "exit 0") -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def bin_dir(tmp_path: Path, tools: tuple[str, ...], name: str = "bin") -> Path:
    """A directory to be the whole PATH, with only `tools` in it: the machine's own where it has
    them (python3 is the interpreter running the tests), otherwise a stand-in, so the answer
    never depends on what this machine happens to have."""
    directory = tmp_path / name
    directory.mkdir()
    for tool in dict.fromkeys(tools):
        real = str(Path(sys.executable).resolve()) if tool == "python3" else shutil.which(tool)
        if real:
            (directory / tool).symlink_to(real)
        else:
            stand_in(directory / tool, JAVA_17 if tool == "java" else "exit 0")
    return directory


def prereqs(path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(PREREQS), *args],
        env={"PATH": str(path), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The script's whole output, which must be exactly one line."""
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def without(*missing: str) -> tuple[str, ...]:
    return tuple(tool for tool in TEST_TOOLS if tool not in missing)


def test_names_every_missing_piece_and_the_command_in_one_line_within_seconds(
    tmp_path: Path,
) -> None:
    path = bin_dir(tmp_path, without("chromium", "docker-compose"))
    started = time.monotonic()
    proc = prereqs(path, "test", "--check")
    assert time.monotonic() - started < 5
    assert proc.returncode == 1
    assert one_line(proc) == (
        "make test: missing chromium (browser tests), docker-compose (compose file checks); "
        f"install them with: {SUDO}apt-get install -y chromium docker-compose"
    )


def test_with_everything_there_it_says_nothing(tmp_path: Path) -> None:
    proc = prereqs(bin_dir(tmp_path, TEST_TOOLS), "test", "--check")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_run_needs_python_java_and_maven_only(tmp_path: Path) -> None:
    path = bin_dir(tmp_path, RUN_TOOLS)
    run = prereqs(path, "run", "--check")
    assert (run.returncode, run.stderr) == (0, "")
    test = prereqs(path, "test", "--check")
    assert test.returncode == 1
    assert one_line(test).startswith(
        "make test: missing make, chromium (browser tests), docker-compose (compose file checks),"
        " ip (multi-host tests), faketime (clock skew tests), iptables (chaos network faults),"
        " podman (compose run), buildah (compose run), debootstrap (compose run), runc (compose"
        " run); install them with: "
    )
    missing_java = prereqs(bin_dir(tmp_path, ("python3", "mvn"), "nojava"), "run", "--check")
    assert missing_java.returncode == 1
    assert one_line(missing_java) == (
        f"make run: missing java >= 17; install them with: {SUDO}apt-get install -y "
        "openjdk-17-jre-headless"
    )


@pytest.mark.parametrize(
    ("version", "enough"),
    [("17.0.15", True), ("21", True), ("25-ea", True), ("11.0.2", False), ("1.8.0_402", False)],
)
def test_java_older_than_17_counts_as_missing(tmp_path: Path, version: str, enough: bool) -> None:
    path = bin_dir(tmp_path, without("java"))
    stand_in(path / "java", f"echo 'openjdk version \"{version}\" 2024-01-16' >&2")
    proc = prereqs(path, "test", "--check")
    if enough:
        assert (proc.returncode, proc.stderr) == (0, "")
    else:
        assert proc.returncode == 1
        assert one_line(proc).startswith("make test: missing java >= 17; ")


def test_a_python_without_venv_counts_as_missing(tmp_path: Path) -> None:
    path = bin_dir(tmp_path, TEST_TOOLS)
    no_venv = tmp_path / "python-without-venv"
    stand_in(no_venv, "exit 1")  # what `python3 -c 'import venv, ensurepip'` does then
    proc = prereqs(path, "run", "--check", PYTHON=str(no_venv))
    assert proc.returncode == 1
    assert one_line(proc) == (
        "make run: missing python3 >= 3.11 with venv; "
        f"install them with: {SUDO}apt-get install -y python3-venv"
    )


def test_docker_s_compose_plugin_does_instead_of_docker_compose(tmp_path: Path) -> None:
    path = bin_dir(tmp_path, without("docker-compose"))
    stand_in(path / "docker", '[ "$1 $2" = "compose version" ]')
    proc = prereqs(path, "test", "--check")
    assert (proc.returncode, proc.stderr) == (0, "")


def test_the_readme_command_installs_every_piece(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line(prereqs(empty, "test", "--check"))
    command = line.partition("install them with: ")[2].removeprefix("sudo ")
    assert command.split()[:3] == ["apt-get", "install", "-y"]
    assert len(command.split()) == 3 + len(TEST_TOOLS), "a package for every piece"
    assert f"sudo {command}" in (REPO_ROOT / "README.md").read_text()


def fake_apt_get(path: Path, log: Path, brings: tuple[str, ...]) -> None:
    """An apt-get that logs how it was called and, asked to install, puts stand-ins for `brings`
    on the PATH (which has no chmod: it is called by its full name)."""
    chmod = shutil.which("chmod") or "/bin/chmod"
    lines = [f'echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> {log}', '[ "$1" = install ] || exit 0']
    for tool in brings:
        lines += [f"echo 'exit 0' > {path / tool}", f"{chmod} +x {path / tool}"]
    stand_in(path / "apt-get", "\n".join(lines))


def test_as_root_it_installs_what_is_missing(tmp_path: Path) -> None:
    need_root("installing with apt-get")
    path = bin_dir(tmp_path, without("chromium", "docker-compose"))
    log = tmp_path / "apt.log"
    fake_apt_get(path, log, ("chromium", "docker-compose"))
    proc = prereqs(path, "test")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "make test: installing chromium docker-compose with apt-get\n"
    assert log.read_text().splitlines() == [
        "DEBIAN_FRONTEND= update -qq",
        "DEBIAN_FRONTEND=noninteractive install -y -qq chromium docker-compose",
    ]
    assert prereqs(path, "test", "--check").returncode == 0


def test_as_root_what_the_install_did_not_bring_is_still_reported(tmp_path: Path) -> None:
    need_root("installing with apt-get")
    path = bin_dir(tmp_path, without("chromium", "docker-compose"))
    log = tmp_path / "apt.log"
    fake_apt_get(path, log, ("docker-compose",))
    proc = prereqs(path, "test")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[1:] == [
        "make test: missing chromium (browser tests); install them with: "
        "apt-get install -y chromium"
    ]
    # --check never installs.
    assert prereqs(path, "test", "--check").returncode == 1
    assert len(log.read_text().splitlines()) == 2


def test_a_wrong_goal_is_a_usage_error(tmp_path: Path) -> None:
    for args in (("bench",), (), ("test", "--force")):
        proc = prereqs(tmp_path, *args)
        assert proc.returncode == 2
        assert "usage: scripts/prereqs.sh test|run [--check]" in proc.stderr


@pytest.mark.parametrize(
    ("goal", "path_has", "missing"),
    [
        ("test", without("chromium", "docker-compose"), "chromium (browser tests)"),
        ("run", ("python3", "mvn", "make"), "java >= 17"),
    ],
)
def test_make_stops_before_creating_the_venv(
    tmp_path: Path, goal: str, path_has: tuple[str, ...], missing: str
) -> None:
    """`make test` and `make run` on a machine lacking something: the one line, then nothing."""
    need_tool("make", "the Makefile's checks", "make")
    work = tmp_path / "checkout"
    (work / "scripts").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "scripts/prereqs.sh", "scripts/kafka.sh"):
        shutil.copy2(REPO_ROOT / name, work / name)
    path = bin_dir(tmp_path, (*path_has, "make", "bash"))
    started = time.monotonic()
    proc = subprocess.run(
        ["make", "-C", str(work), goal],
        env={"PATH": str(path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert time.monotonic() - started < 5
    assert proc.returncode != 0
    assert re.match(
        rf"make {goal}: missing [^\n]*{re.escape(missing)}[^\n]*; install them", proc.stderr
    )
    assert not (work / ".venv").exists(), "stopped before anything ran"
