"""The cost of a secured Kafka (`make bench-secure`, `python -m bench.run --kafka-security`).

The same fleet twice, each against a fresh single broker and Central: first plain, then with
the broker secured (TLS, SCRAM logins and ACLs: docs/security.md, "Kafka") and every client
logged in. Central logs in as `central`; the simulator, which stands in for the engines and
the driver apps at once, as a login granted both roles' ACLs. Measured side by side: request
-> authorisation, heartbeats per Central CPU-second, Central's CPU.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.kafka_access import ROLE_GRANTS, KafkaAccess, KafkaLogin

FLEET_LOGIN = "bench-fleet"  # the simulator's login: a CP engine's grants and a driver's


@dataclass(frozen=True)
class SecureKafka:
    """What a secured broker of the bench is started with, and the logins made on it."""

    keys: Path  # EV_KAFKA_SECURE_DIR: ca.crt, kafka.crt, kafka.key, kafka-admin.password
    creds: Path  # the roles' password files

    @property
    def ca(self) -> Path:
        return self.keys / "ca.crt"

    def flags(self, user: str) -> list[str]:
        return [
            "--kafka-user",
            user,
            "--kafka-password-file",
            str(self.creds / f"kafka-{user}.password"),
            "--kafka-ca",
            str(self.ca),
        ]


def make_keys(root: Path, repo: Path) -> SecureKafka:
    """A CA, the broker's certificate for 127.0.0.1 and the admin password, under `root`."""
    keys = root / "kafka-keys"
    subprocess.run(
        [sys.executable, "scripts/make-certs.py", "--out", str(keys)]
        + ["--server", "kafka=localhost,127.0.0.1"],
        cwd=repo,
        check=True,
        capture_output=True,
    )
    (keys / "kafka-admin.password").write_text(secrets.token_urlsafe(24) + "\n")
    return SecureKafka(keys, root / "kafka-creds")


def make_logins(secure: SecureKafka, bootstrap: str, repo: Path) -> None:
    """The roles' logins (as an operator makes them), and the simulator's."""
    subprocess.run(
        [sys.executable, "-m", "EV_Central", "kafka-access", "--broker", bootstrap]
        + ["--kafka-ca", str(secure.ca)]
        + ["--kafka-password-file", str(secure.keys / "kafka-admin.password")]
        + ["setup", str(secure.creds)],
        cwd=repo,
        check=True,
        capture_output=True,
    )
    password = secrets.token_urlsafe(24)
    (secure.creds / f"kafka-{FLEET_LOGIN}.password").write_text(password + "\n")
    admin = KafkaLogin.from_files(
        "admin", str(secure.keys / "kafka-admin.password"), str(secure.ca)
    )

    async def enrol() -> None:
        async with KafkaAccess(bootstrap, admin) as access:
            await access.set_password(FLEET_LOGIN, password)
            await access.grant(FLEET_LOGIN, ROLE_GRANTS["cp"] + ROLE_GRANTS["driver"])

    asyncio.run(enrol())


def report_lines(section: dict[str, Any], fmt: Any) -> list[str]:
    """The report's section: plain and secured side by side."""
    plain, secured = section["plain"], section["secure"]

    def row(name: str, get: Any) -> str:
        return f"| {name} | {fmt(get(plain))} | {fmt(get(secured))} |"

    def auth(result: dict[str, Any], key: str) -> Any:
        return (result.get("request_to_authorisation_ms") or {}).get(key)

    return [
        "",
        f"### The cost of a secured Kafka at {section['cps']} CPs",
        "",
        "The same fleet against one broker and one Central, plain and then secured (TLS,"
        " SCRAM-SHA-512 logins, ACLs; docs/security.md), in one run"
        f" (`{section['command']}`, revision {section.get('revision', '?')}).",
        "",
        "| | plain | TLS + SCRAM + ACLs |",
        "|---|---|---|",
        row("request→authorisation p50 (ms)", lambda r: auth(r, "p50")),
        row("request→authorisation p99 (ms)", lambda r: auth(r, "p99")),
        row("heartbeats per Central CPU-second", lambda r: r.get("central_heartbeats_per_cpu_s")),
        row("Central CPU (%)", lambda r: r.get("central_cpu_percent")),
        row("supplies completed", lambda r: r.get("supplies_completed")),
        row("request timeouts", lambda r: r.get("request_timeouts")),
    ]
