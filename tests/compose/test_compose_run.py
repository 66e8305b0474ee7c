"""The compose files started for real, on rootful Podman (scripts/podman-setup.sh).

No Docker engine and no image registry here: the images are built on a debootstrapped base,
Kafka's from Maven's jars, and Docker Compose v2 drives `podman system service`. Everything
runs inside a network namespace of the test's own, with the three PC addresses on it.

Both run the secure default (docs/security.md, "The deployment"): the certificates and Kafka
passwords made as scripts/deploy.sh makes them, TLS on :5000 and the dashboards, Kafka secured
with SCRAM logins and ACLs; for three PCs, PC1 and PC3 get only the files `network_config.py
--needs` names for them, copied from PC2's.

First docker-compose.yml (everything on one host): every service healthy, a supply from the
driver app's container to its ticket, then Central's process killed during a supply: its
restart policy brings it back and the supply is settled. Then the three per-PC files as three
projects on one host (PC2 first, as docs/deployment.md says), each PC's published ports bound
to its own address: every service healthy and a supply from PC1's driver at a CP of PC3.

Kafka UI (provectuslabs/kafka-ui) is the one service left out: its image can only be pulled.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import need_root, need_tool, scaled

pytestmark = [pytest.mark.compose, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP = REPO_ROOT / "scripts" / "podman-setup.sh"
SUBNET = "10.232.0"
PC_IPS = {"pc1": f"{SUBNET}.1", "pc2": f"{SUBNET}.2", "pc3": f"{SUBNET}.3"}
# Services whose image cannot be had without a registry.
UNAVAILABLE = {"kafka-ui"}
ONE_SHOT = {"keys", "kafka-format", "kafka-init", "kafka-access"}


class Podman:
    """scripts/podman-setup.sh with a run directory and a network namespace of this test's."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.netns = f"evp{os.getpid()}"
        self.started = time.monotonic()
        self.images_seconds = 0.0
        self.env = {
            **os.environ,
            "EV_PODMAN_RUN": str(run_dir),
            "EV_PODMAN_SUBNET": SUBNET,
        }
        # The podman commands here read the script's containers.conf, as its own do: where it
        # is, the script says (`env`: "export CONTAINERS_CONF=... DOCKER_HOST=...").
        exports = subprocess.run(
            [str(SETUP), "env"], env=self.env, capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        variables = dict(item.split("=", 1) for item in exports.split()[1:])
        self.env["CONTAINERS_CONF"] = variables["CONTAINERS_CONF"]

    def setup(self, *args: str, timeout: float) -> None:
        result = subprocess.run(
            [str(SETUP), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=scaled(timeout),
        )
        assert result.returncode == 0, f"podman-setup.sh {' '.join(args)}:\n{result.stderr}"

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def podman(self, *args: str, timeout: float = 60) -> str:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
        return result.stdout

    def containers(self, project: str) -> dict[str, dict[str, Any]]:
        """The project's containers by service, as `podman inspect` has them."""
        for attempt in range(5):
            ids = self.podman(
                "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}"
            ).split()
            if not ids:
                return {}
            result = self.run("inspect", *ids)
            if result.returncode == 0:
                break
            # A container removed between the listing and the inspect (a `compose run --rm`
            # that has just ended) is no error: list them again.
            assert "no such object" in result.stderr and attempt < 4, (
                f"podman inspect {' '.join(ids)}: {result.stderr}"
            )
        found: dict[str, dict[str, Any]] = {}
        for info in json.loads(result.stdout):
            labels = info["Config"]["Labels"]
            if labels.get("com.docker.compose.oneoff") != "True":  # not a `compose run`
                found[labels["com.docker.compose.service"]] = info
        return found


class Project:
    """One compose project: a compose file, its .env and its directory (./secrets, ...)."""

    def __init__(
        self, podman: Podman, name: str, compose_file: str, directory: Path, *extra: Path
    ) -> None:
        self.podman = podman
        self.name = name
        self.directory = directory
        self.files = [REPO_ROOT / compose_file, *extra]

    def command(self, *args: str) -> list[str]:
        files = [arg for path in self.files for arg in ("-f", str(path))]
        return [
            str(SETUP),
            "compose",
            "-p",
            self.name,
            "--project-directory",
            str(self.directory),
            "--env-file",
            str(self.directory / ".env"),
            *files,
            *args,
        ]

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args),
            env=self.podman.env,
            capture_output=True,
            text=True,
            timeout=scaled(timeout),
        )

    def services(self) -> list[str]:
        result = self.compose("config", "--services")
        assert result.returncode == 0, result.stderr
        return [s for s in result.stdout.split() if s not in UNAVAILABLE]

    def up(self) -> subprocess.Popen[str]:
        """`up -d` of every service; it returns once the dependencies' conditions are met."""
        with (self.podman.run_dir / f"{self.name}-up.log").open("w") as log:
            return subprocess.Popen(
                self.command("up", "-d", "--no-build", *self.services()),
                env=self.podman.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "-t", "5", timeout=180)

    def logs(self) -> str:
        return self.compose("logs", "--tail", "15", "--no-color", timeout=60).stdout[-6000:]


def health(info: dict[str, Any]) -> str:
    state = info["State"]
    return str((state.get("Health") or state.get("Healthcheck") or {}).get("Status", ""))


def pending(project: Project, services: list[str]) -> list[str]:
    """Services of `project` not yet healthy (one-shot ones: not yet exited 0)."""
    containers = project.podman.containers(project.name)
    waiting = []
    for svc in services:
        info = containers.get(svc)
        if info is None:
            waiting.append(f"{svc}(missing)")
            continue
        state = info["State"]
        if svc in ONE_SHOT:
            if state["Status"] != "exited" or state["ExitCode"] != 0:
                waiting.append(f"{svc}({state['Status']}/{state['ExitCode']})")
        elif state["Status"] != "running" or health(info) != "healthy":
            waiting.append(f"{svc}({state['Status']}/{health(info)})")
    return waiting


def until(
    condition: Callable[[], bool], timeout: float, interval: float, failure: Callable[[], str]
) -> None:
    """Check `condition` every `interval` s until it holds; once the scaled `timeout` has passed,
    fail with `failure()`, the state then. The synchronous kin of helpers.wait_for: these tests
    drive subprocesses, not an event loop."""
    deadline = time.monotonic() + scaled(timeout)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(failure())
        time.sleep(interval)


def wait_healthy(projects: list[Project], timeout: float) -> None:
    wanted = {p.name: p.services() for p in projects}

    def left() -> dict[str, list[str]]:
        return {p.name: pending(p, wanted[p.name]) for p in projects}

    until(
        lambda: not any(left().values()),
        timeout,
        interval=2,
        failure=lambda: (
            f"not healthy after {timeout}s: {left()}\n" + "\n".join(p.logs() for p in projects)
        ),
    )


def driver(project: Project, service: str, user: str, cp: str, *extra: str) -> list[str]:
    """The command line of the driver app in `service`'s image, on its network."""
    return project.command(
        "run",
        "--rm",
        "--no-deps",
        "-T",
        "-e",
        f"EV_PASSWORD={user.replace('user', 'pass')}",
        "--entrypoint",
        "ev-driver",
        service,
        "--driver-id",
        user,
        "--cp",
        cp,
        "--json",
        *extra,
    )


def events(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def supply(
    project: Project, service: str, user: str, cp: str, *extra: str, plugged: bool = True
) -> dict[str, Any]:
    """A whole supply through the containers; returns its ticket. `plugged`: the CP's engine
    plugs in by itself (docker-compose.yml's do; PC3's wait for their menu), so it bills energy."""
    result = subprocess.run(
        driver(project, service, user, cp, *extra),
        env=project.podman.env,
        capture_output=True,
        text=True,
        timeout=scaled(180),
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    tickets = [e for e in events(result.stdout) if e["event"] == "ticket"]
    assert len(tickets) == 1, result.stdout
    assert tickets[0]["cp_id"] == cp and tickets[0]["driver_id"] == user, tickets
    assert (tickets[0]["kwh"] > 0) is plugged, tickets
    return tickets[0]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    need_root("the compose run (rootful Podman, a network namespace)")
    for tool, package in (
        ("podman", "podman"),
        ("buildah", "buildah"),
        ("debootstrap", "debootstrap"),
        ("runc", "runc"),
        ("mvn", "maven"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
    ):
        need_tool(tool, "the compose run", package)
    p = Podman(tmp_path_factory.mktemp("podman"))
    p.setup("images", timeout=900)
    p.images_seconds = time.monotonic() - p.started
    p.setup("netns", "up", p.netns, timeout=30)
    try:
        p.setup("service", "start", p.netns, timeout=60)
        p.setup("health", "start", p.netns, timeout=30)
        yield p
    finally:
        p.setup("health", "stop", timeout=30)
        p.setup("service", "stop", timeout=60)
        p.setup("netns", "down", p.netns, timeout=60)


def make_keys(directory: Path, env: dict[str, str]) -> None:
    """What `scripts/deploy.sh pc2 up` (or `all up`) makes first, in `directory`: the CA and
    certificates, the Kafka passwords and the audit key; and the scripts the compose files
    mount."""
    for args in (
        [str(REPO_ROOT / "scripts" / "make-certs.py"), "--out", str(directory / "certs")],
        [str(REPO_ROOT / "network_config.py"), "--kafka-passwords", str(directory / "secrets")],
        [str(REPO_ROOT / "network_config.py"), "--audit-key"]
        + [str(directory / "secrets" / "central.audit-key")],
    ):
        subprocess.run([sys.executable, *args], check=True, capture_output=True, env=env)
    copy_mounted_scripts(directory)


def copy_mounted_scripts(directory: Path) -> None:
    """The scripts the compose files mount from ./docker: the project's directory stands in
    for the repository."""
    (directory / "docker").mkdir(exist_ok=True)
    for script in ("install-keys.sh", "kafka-format.sh"):
        shutil.copy(REPO_ROOT / "docker" / script, directory / "docker" / script)


def copy_needed(source: Path, target: Path, pc: str, env: dict[str, str]) -> None:
    """What the operator copies from PC2 to `pc`: the files network_config.py names for it."""
    needs = subprocess.run(
        [sys.executable, str(REPO_ROOT / "network_config.py"), "--needs", pc],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.split()
    assert needs, f"{pc} needs nothing from PC2?"
    for name in needs:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target / name)
    (target / "certs").mkdir(exist_ok=True)
    copy_mounted_scripts(target)


def report(podman: Podman, line: str) -> None:
    """Timings, kept beside the run's logs (and shown with pytest -s)."""
    print(line)
    with (podman.run_dir / "timings.txt").open("a") as out:
        out.write(line + "\n")


# The first test also builds the images (the module's fixture): from nothing, about four
# minutes of the time.
@pytest.mark.timeout(scaled(1200))
def test_all_in_one_stack_supplies_and_survives_a_central_crash(
    podman: Podman, tmp_path: Path
) -> None:
    directory = tmp_path / "all"
    directory.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_IP")}
    subprocess.run(
        ["python3", str(REPO_ROOT / "network_config.py"), "--env", str(directory / ".env")],
        check=True,
        capture_output=True,
        env=env,
    )
    make_keys(directory, env)
    project = Project(podman, "ev-all", "docker-compose.yml", directory)
    try:
        up = project.up()
        assert up.wait(timeout=scaled(300)) == 0, (podman.run_dir / "ev-all-up.log").read_text()
        wait_healthy([project], timeout=180)
        report(
            podman,
            f"all-in-one healthy {time.monotonic() - podman.started:.0f}s after the start "
            f"(images {podman.images_seconds:.0f}s)",
        )

        supply(project, "driver-dashboard", "user1", "CP001")

        # A crash, not a stop: Central's process killed from outside, as the kernel's OOM
        # killer would. `podman kill` would count as stopped by the user and not restart it.
        follow = subprocess.Popen(
            driver(project, "driver-dashboard", "user2", "CP002"),
            env=podman.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            started = None
            deadline = time.monotonic() + scaled(90)
            assert follow.stdout is not None
            lines = []
            while started is None and time.monotonic() < deadline:
                ready, _, _ = select.select([follow.stdout], [], [], 1)
                if ready:
                    line = follow.stdout.readline()
                    lines.append(line)
                    if line.startswith("{") and json.loads(line)["event"] == "started":
                        started = json.loads(line)
            assert started is not None, "".join(lines)
            central = podman.containers("ev-all")["central"]
            os.kill(central["State"]["Pid"], 9)

            def central_back() -> bool:
                central = podman.containers("ev-all")["central"]
                return bool(central["RestartCount"] >= 1 and health(central) == "healthy")

            until(
                central_back,
                120,
                interval=1,
                failure=lambda: (
                    f"Central not back: {podman.containers('ev-all')['central']['State']}"
                ),
            )
            out, _ = follow.communicate(timeout=scaled(120))
        finally:
            if follow.poll() is None:
                follow.kill()
            # Reaped and its pipe closed whatever happened: an open pipe left to the garbage
            # collector fails whichever test runs when it is collected (ResourceWarning).
            follow.wait()
            if follow.stdout is not None:
                follow.stdout.close()
        assert follow.returncode == 0, out[-3000:]
        tickets = [e for e in events(out) if e["event"] == "ticket"]
        assert [t["session_id"] for t in tickets] == [started["session_id"]], out[-3000:]
        assert tickets[0]["kwh"] > 0
        report(podman, f"all-in-one done {time.monotonic() - podman.started:.0f}s")
    finally:
        project.down()


def central_roles(podman: Podman) -> list[str]:
    """What the two Centrals' /healthz say they are ("active", "standby"; "" if no answer)."""
    roles = []
    for pc in ("pc1", "pc2"):
        central = podman.containers(f"ev-{pc}").get("central")
        probe = subprocess.run(
            [
                "podman",
                "exec",
                central["Id"] if central else f"ev-{pc}-central-1",
                "python",
                "-c",
                "import json, os, ssl, urllib.request; print(json.load(urllib.request.urlopen("
                "'https://127.0.0.1:%s/healthz' % os.environ['EV_HTTP_PORT'], timeout=5, "
                "context=ssl.create_default_context(cafile='/keys/ca.crt'))).get('role', ''))",
            ],
            env=podman.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        roles.append(probe.stdout.strip() if probe.returncode == 0 else "")
    return roles


def pc_override(pc: str, directory: Path) -> Path:
    """Three PCs on one host: each PC's ports published on its own address only (on three
    PCs each has the host to itself), and each PC's containers on a network not isolated from
    the others' (Podman isolates networks made through its Docker API, so a container could not
    reach another PC's published port at its address; between real PCs nothing is in the way).
    And the Centrals' authorisations expire after 10 s instead of 60: the test's supply is
    never plugged in (PC3's engines plug in from their menu), so it waits for the expiry."""
    spec = yaml.safe_load((REPO_ROOT / f"docker-compose.{pc}.yml").read_text())
    lines = ["services:"]
    for name, svc in spec["services"].items():
        if svc.get("ports") or name == "central":
            lines.append(f"  {name}:")
        if svc.get("ports"):
            lines.append("    ports: !override")
            lines += [f'      - "${{{pc.upper()}_IP}}:{port}"' for port in svc["ports"]]
        if name == "central":
            lines += ["    environment:", '      EV_AUTHORIZATION_TTL: "10"']
    lines += ["networks:", "  default:", f"    name: ev-{pc}-net", "    external: true"]
    path = directory / "three-pcs-on-one-host.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.timeout(scaled(900))
def test_three_pcs_start_pc2_first_and_supply_across_them(podman: Podman, tmp_path: Path) -> None:
    env = {**os.environ, **{f"{pc.upper()}_IP": ip for pc, ip in PC_IPS.items()}}
    projects: dict[str, Project] = {}
    for pc in ("pc2", "pc1", "pc3"):
        directory = tmp_path / pc
        (directory / "secrets").mkdir(parents=True)
        subprocess.run(
            [
                "python3",
                str(REPO_ROOT / "network_config.py"),
                "--env",
                str(directory / ".env"),
                "--three-pcs",
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        projects[pc] = Project(
            podman, f"ev-{pc}", f"docker-compose.{pc}.yml", directory, pc_override(pc, directory)
        )
    # What PC2's deploy makes, and the operator copies to PC1 and PC3.
    make_keys(tmp_path / "pc2", env)
    for pc in ("pc1", "pc3"):
        copy_needed(tmp_path / "pc2", tmp_path / pc, pc, env)
    ups: list[subprocess.Popen[str]] = []
    try:
        for pc, project in projects.items():
            podman.podman("network", "create", f"ev-{pc}-net")
            # Each `up` waits for its Kafka node, which needs a second PC's: they run together.
            ups.append(project.up())
            time.sleep(2)
        for up, project in zip(ups, projects.values(), strict=True):
            code = up.wait(timeout=scaled(540))
            assert code == 0, (podman.run_dir / f"{project.name}-up.log").read_text()[-4000:]
        wait_healthy(list(projects.values()), timeout=240)
        report(podman, f"three PCs healthy {time.monotonic() - podman.started:.0f}s")

        # Both Centrals answer /healthz as soon as they serve; one of them must also have
        # become the active one (its transactional producer started: on a busy machine the
        # cluster's transaction log, fifty partitions of three copies, takes a while).
        until(
            lambda: central_roles(podman).count("active") == 1,
            300,
            interval=3,
            failure=lambda: f"no active Central: {central_roles(podman)}",
        )
        report(podman, f"three PCs: a Central active {time.monotonic() - podman.started:.0f}s")

        # PC1's driver app, at a CP of PC3, through the active Central: accepted, authorised
        # by the CP's engine, and settled with a ticket (no energy: PC3's engines plug in from
        # their menu only, so the authorisation runs out).
        supply(
            projects["pc1"],
            "driver-dashboard",
            "user3",
            "CP001",
            "--reply-timeout",
            "30",
            plugged=False,
        )
        report(podman, f"three PCs done {time.monotonic() - podman.started:.0f}s")
    finally:
        for up in ups:
            if up.poll() is None:
                up.kill()
        for project in projects.values():
            project.down()
        for pc in projects:
            subprocess.run(
                ["podman", "network", "rm", "-f", f"ev-{pc}-net"],
                env=podman.env,
                capture_output=True,
            )
