"""scripts/deploy.sh and scripts/deploy.ps1 offer the same options and do the same with them.

PowerShell does not run here, so deploy.ps1 is read: its param() block, where each parameter
is used, and the compose commands it runs. deploy.sh runs for real, beside a stand-in `docker`
that records what it is asked and answers as a healthy deployment would.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_SH = REPO_ROOT / "scripts" / "deploy.sh"
DEPLOY_PS1 = REPO_ROOT / "scripts" / "deploy.ps1"

# deploy.ps1's parameters that are not a --switch of deploy.sh, and what stands for each there.
PS1_TO_SH = {
    "Pc": "PC",
    "Action": "ACTION",
    "Service": "SERVICE",
    "WaitSeconds": "EV_DEPLOY_WAIT",
}

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def ps1_source() -> str:
    return DEPLOY_PS1.read_text(encoding="utf-8")


def param_block(source: str) -> str:
    """The text inside the script's param( ... ), parentheses balanced."""
    start = re.search(r"^param\(", source, re.MULTILINE)
    assert start is not None, "deploy.ps1 has no param() block"
    depth = 0
    for index in range(start.end() - 1, len(source)):
        depth += {"(": 1, ")": -1}.get(source[index], 0)
        if depth == 0:
            return source[start.end() : index]
    raise AssertionError("deploy.ps1: param( is never closed")


def ps1_parameters() -> dict[str, str]:
    """deploy.ps1's parameters and their types, from its param() block."""
    found = re.findall(r"\[(\w+)\]\s*\$(\w+)", param_block(ps1_source()))
    return {name: kind for kind, name in found}


def ps1_validate_set(parameter: str) -> list[str]:
    block = param_block(ps1_source())
    match = re.search(r"\[ValidateSet\(([^)]*)\)\]\s*\[\w+\]\s*\$" + parameter + r"\b", block)
    assert match is not None, f"deploy.ps1: no ValidateSet for ${parameter}"
    return re.findall(r'"([^"]+)"', match.group(1))


def ps1_body() -> str:
    source = ps1_source()
    return source[source.index(param_block(source)) + len(param_block(source)) :]


def ps1_branch(action: str) -> str:
    """The text of one action's branch of deploy.ps1's switch."""
    body = ps1_body()
    start = body.index(f'"{action}" {{')
    next_branch = re.search(r'^\s{4}"\w+" \{', body[start + 1 :], re.MULTILINE)
    return body[start : start + 1 + next_branch.start()] if next_branch else body[start:]


def sh_help() -> str:
    result = subprocess.run(
        ["bash", str(DEPLOY_SH), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def sh_options(help_text: str) -> set[str]:
    return set(re.findall(r"^\s*(--[a-z][\w-]*)", help_text, re.MULTILINE)) - {"--help"}


def sh_case_values(variable: str) -> set[str]:
    """The values a `case "$VARIABLE" in a|b) …` of deploy.sh accepts."""
    source = DEPLOY_SH.read_text(encoding="utf-8")
    match = re.search(r'case "\$' + variable + r'" in (.*?) esac', source)
    assert match is not None, f"deploy.sh: no case on ${variable}"
    values: set[str] = set()
    for pattern in re.findall(r"([\w|]+)\)", match.group(1)):
        values.update(pattern.split("|"))
    return values


def test_ps1_has_the_build_and_follow_switches() -> None:
    parameters = ps1_parameters()
    assert parameters.get("Build") == "switch", parameters
    assert parameters.get("Follow") == "switch", parameters


def test_every_ps1_parameter_is_used_outside_its_declaration() -> None:
    body = ps1_body()
    for name in ps1_parameters():
        assert re.search(r"\$" + name + r"\b", body), (
            f"deploy.ps1 declares ${name} but never uses it"
        )


@needs_bash
def test_the_two_scripts_offer_the_same_options() -> None:
    help_text = sh_help()
    switches = {name for name, kind in ps1_parameters().items() if kind == "switch"}
    others = set(ps1_parameters()) - switches
    assert {f"--{name.lower()}" for name in switches} == sh_options(help_text), (
        "deploy.ps1's switches and deploy.sh's --options differ"
    )
    assert others == set(PS1_TO_SH), f"deploy.ps1 parameters without a deploy.sh twin: {others}"
    for name, twin in PS1_TO_SH.items():
        assert twin in help_text, f"deploy.sh --help does not mention {twin} (deploy.ps1: -{name})"


def test_the_two_scripts_take_the_same_pcs_and_actions() -> None:
    assert set(ps1_validate_set("Pc")) == sh_case_values("PC")
    assert set(ps1_validate_set("Action")) == sh_case_values("ACTION")


def test_ps1_builds_before_starting_and_follows_after_health() -> None:
    up = ps1_branch("up")
    build = re.search(r"if \(\$Build\) \{ Invoke-Compose (build[^}]*?)\s*\}", up)
    assert build is not None, "deploy.ps1: up does not build when -Build is given"
    assert up.index(build.group(0)) < up.index("Invoke-Compose up ")
    sh = DEPLOY_SH.read_text(encoding="utf-8")
    assert f"compose {build.group(1)};" in sh, "deploy.sh --build runs another build command"
    follow = up.index("if ($Follow)")
    assert up.index("is up and healthy") < follow < up.index("logs -f", follow)


def fake_docker(bin_dir: Path, log: Path, body: str = "exit 0\n") -> None:
    """A `docker` that logs each call, then runs `body`: by default it behaves as an engine
    with nothing unhealthy."""
    script = bin_dir / "docker"
    script.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\n{body}', encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def deploy_copy(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """deploy.sh in a copy of what it reads, so its .env lands in tmp_path, not the tree."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(DEPLOY_SH, tmp_path / "scripts" / "deploy.sh")
    shutil.copy2(REPO_ROOT / "scripts" / "make-certs.py", tmp_path / "scripts" / "make-certs.py")
    shutil.copy2(REPO_ROOT / "network_config.py", tmp_path / "network_config.py")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "docker.log"
    fake_docker(bin_dir, log)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PC", "EV_")) and key != "PYTHON"
    }
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHON=sys.executable)
    env.update(PC1_IP="192.168.1.10", PC2_IP="192.168.1.20", PC3_IP="192.168.1.30")
    return tmp_path / "scripts" / "deploy.sh", log, env


def run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60
    )


def compose_calls(log: Path, pc: str = "pc2") -> list[str]:
    calls = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    marker = f" -f docker-compose.{pc}.yml "
    return [call.split(marker, 1)[1] for call in calls if marker in call]


@needs_bash
def test_sh_up_with_build_and_follow(deploy_copy: tuple[Path, Path, dict[str, str]]) -> None:
    script, log, env = deploy_copy
    result = run(script, env, "pc2", "up", "--build", "--follow")
    assert result.returncode == 0, result.stderr
    calls = compose_calls(log)
    assert calls[0] == "build --pull", calls
    assert calls[1] == "up -d --build --remove-orphans", calls
    assert calls[-1] == "logs -f --tail 200", calls
    assert "PC2_IP=192.168.1.20" in (script.parent.parent / ".env").read_text(encoding="utf-8")


@needs_bash
def test_sh_up_without_options_neither_pulls_nor_follows(
    deploy_copy: tuple[Path, Path, dict[str, str]],
) -> None:
    script, log, env = deploy_copy
    result = run(script, env, "--follow", "pc2", "up", "central")  # options go anywhere
    assert result.returncode == 0, result.stderr
    assert compose_calls(log)[-1] == "logs -f --tail 200 central"
    log.unlink()
    assert run(script, env, "pc2", "up").returncode == 0
    calls = compose_calls(log)
    assert not any(call.startswith(("build", "logs")) for call in calls), calls


@needs_bash
def test_sh_up_passes_over_a_container_removed_while_it_checks_health(
    deploy_copy: tuple[Path, Path, dict[str, str]],
) -> None:
    """`compose ps` lists a container that is gone by the time it is inspected (a `compose run
    --rm` that has just ended): it is no service waited for."""
    script, log, env = deploy_copy
    fake_docker(
        Path(env["PATH"].split(os.pathsep)[0]),
        log,
        'case "$*" in\n'
        '  compose*" ps -q") echo gone; echo here ;;\n'
        '  "inspect "*gone) echo "Error: no such object: gone" >&2; exit 125 ;;\n'
        '  "inspect "*here) echo "/central running healthy 0" ;;\n'
        "esac\n",
    )
    result = run(script, {**env, "EV_DEPLOY_WAIT": "6"}, "pc2", "up")
    assert result.returncode == 0, result.stderr
    assert "is up and healthy" in result.stdout


@needs_bash
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pc2", "status", "--build"], "--build goes with up"),
        (["pc2", "down", "--follow"], "--follow goes with up"),
        (["pc2", "up", "--bulid"], "unknown option --bulid"),
    ],
)
def test_sh_refuses_an_option_it_cannot_honour(
    deploy_copy: tuple[Path, Path, dict[str, str]], args: list[str], message: str
) -> None:
    script, log, env = deploy_copy
    result = run(script, env, *args)
    assert result.returncode == 2
    assert f"deploy: {message}" in result.stderr
    assert not log.exists(), "nothing may run after a usage error"


@needs_bash
def test_sh_pc2_up_makes_the_keys_once_and_pc1_and_pc3_need_copies(
    deploy_copy: tuple[Path, Path, dict[str, str]],
) -> None:
    script, log, env = deploy_copy
    root = script.parent.parent
    key = root / "secrets" / "central.audit-key"
    # PC1 first: its standby Central would start with keys of its own. Refused, nothing run.
    result = run(script, env, "pc1", "up")
    assert result.returncode == 1
    assert "deploy: missing secrets/central.audit-key certs/ca.crt" in result.stderr
    assert "copy them from PC2" in result.stderr
    assert not compose_calls(log, "pc1") and not key.exists()

    result = run(script, env, "pc2", "up")
    assert result.returncode == 0, result.stderr
    for said in ("made the local CA", "made Kafka passwords: admin, central", "made the audit key"):
        assert f"deploy: {said}" in result.stderr, result.stderr
    for pc in ("PC1", "PC3"):
        assert f"deploy: copy to {pc} " in result.stderr
    assert "certs/site-dashboard.key secrets/kafka-monitor.password" in result.stderr
    made = key.read_text(encoding="ascii")
    assert len(bytes.fromhex(made.strip())) == 32
    for secret in (key, root / "secrets" / "kafka-admin.password", root / "certs" / "ca.key"):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    # The kafka certificate is valid for every PC's node.
    cert = (root / "certs" / "kafka.crt").read_bytes()
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----")
    # The next `up` keeps everything (the other PCs have copies by then) and says nothing.
    result = run(script, env, "pc2", "up")
    assert result.returncode == 0, result.stderr
    assert "made" not in result.stderr and "copy to" not in result.stderr
    assert key.read_text(encoding="ascii") == made

    # With the copies in place (the same directory here) PC1 and PC3 start; the one-host
    # deployment needs no audit key.
    for pc in ("pc1", "pc3"):
        result = run(script, env, pc, "up")
        assert result.returncode == 0, result.stderr
        assert "up -d --build --remove-orphans" in compose_calls(log, pc)
    key.unlink()
    assert run(script, env, "all", "up").returncode == 0
    assert not key.exists()


@needs_bash
def test_sh_with_secure_off_makes_only_the_audit_key(
    deploy_copy: tuple[Path, Path, dict[str, str]],
) -> None:
    script, log, env = deploy_copy
    root = script.parent.parent
    result = run(script, env | {"SECURE": "0"}, "pc2", "keys")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (root / "secrets").iterdir()) == ["central.audit-key"]
    assert list((root / "certs").iterdir()) == []  # made empty: the keys service mounts it
    assert "SECURE=0" in (root / ".env").read_text(encoding="utf-8")
    assert not compose_calls(log), "keys starts nothing"
    # PC3 needs nothing from PC2 then.
    assert run(script, env | {"SECURE": "0"}, "pc3", "keys").returncode == 0


@needs_bash
@pytest.mark.parametrize(
    ("addresses", "message"),
    [
        ({"PC3_IP": "127.0.0.1"}, "PC3_IP is 127.0.0.1: the other PCs cannot reach that"),
        ({"PC1_IP": "192.168.1.20"}, "PC2_IP and PC1_IP are both 192.168.1.20"),
    ],
)
def test_sh_refuses_addresses_three_pcs_cannot_use(
    deploy_copy: tuple[Path, Path, dict[str, str]], addresses: dict[str, str], message: str
) -> None:
    script, log, env = deploy_copy
    for pc in ("pc1", "pc2", "pc3"):
        result = run(script, env | addresses, pc, "up")
        assert result.returncode == 1, (pc, result.stderr)
        assert f"error: {message}" in result.stderr
        assert "network_config.py refused the settings" in result.stderr
    assert not any(compose_calls(log, pc) for pc in ("pc1", "pc2", "pc3")), "nothing started"
    # One host needs no LAN addresses.
    one_host = env | {"PC1_IP": "127.0.0.1", "PC2_IP": "127.0.0.1"}
    assert run(script, one_host, "all", "up").returncode == 0


def test_both_scripts_check_three_pcs_and_make_the_same_keys() -> None:
    sh = DEPLOY_SH.read_text(encoding="utf-8")
    ps1 = ps1_source()
    for source in (sh, ps1):
        assert "--three-pcs" in source
        assert "network_config.py --audit-key secrets/central.audit-key" in source
        assert "scripts/make-certs.py --out certs" in source
        assert "network_config.py --kafka-passwords secrets" in source
        assert "network_config.py --needs" in source
    # The compose files mount the directories the scripts write to; the keys service installs
    # the audit key beside Central's database.
    for pc in ("pc1", "pc2", "pc3", None):
        name = f"docker-compose.{pc}.yml" if pc else "docker-compose.yml"
        compose = (REPO_ROOT / name).read_text(encoding="utf-8")
        assert "./secrets:/secrets:ro" in compose and "./certs:/certs:ro" in compose, name
    install = (REPO_ROOT / "docker" / "install-keys.sh").read_text(encoding="utf-8")
    assert "/secrets/central.audit-key" in install
    # PowerShell: made on pc2 (and all), checked on pc1 and pc3, before anything starts.
    up = ps1_branch("up")
    assert up.index("Confirm-Keys") < up.index("Invoke-Compose up ")
    assert re.search(r'\$Pc -in @\("pc2", "all"\)[\s\S]{0,400}make-certs', ps1)
    assert re.search(r'\$Pc -in @\("pc1", "pc3"\)', ps1)
