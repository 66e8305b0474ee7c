"""The secure default on the simulated PCs: certificates, Kafka's admin password and logins.

One directory holds them all, as /keys does in the compose files' containers: ca.crt and the
servers' NAME.crt and NAME.key (scripts/make-certs.py), kafka-admin.password (what
`EV_KAFKA_SECURE_DIR` needs besides) and each login's kafka-NAME.password, written by
`python -m EV_Central kafka-access` (docs/security.md, "Kafka"; docs/tls.md).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from helpers import scaled
from procs import REPO_ROOT

MAKE_CERTS = REPO_ROOT / "scripts" / "make-certs.py"


class Keys:
    """The files of a secured deployment in `directory`, and the flags that use them."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def admin_password(self) -> Path:
        return self.dir / "kafka-admin.password"

    def cert(self, server: str) -> Path:
        return self.dir / f"{server}.crt"

    def key(self, server: str) -> Path:
        return self.dir / f"{server}.key"

    def password_file(self, login: str) -> Path:
        return self.dir / f"kafka-{login}.password"

    def kafka_flags(self, login: str) -> list[str]:
        """A service's flags to log in to the secured Kafka as `login`."""
        return [
            *("--kafka-user", login, "--kafka-password-file", str(self.password_file(login))),
            *("--kafka-ca", str(self.ca)),
        ]

    def make(self, servers: Mapping[str, Iterable[str]]) -> None:
        """A CA, a certificate per server valid for its names, and Kafka's admin password."""
        args = [f"--server={name}={','.join(sans)}" for name, sans in servers.items()]
        _run([sys.executable, str(MAKE_CERTS), "--out", str(self.dir), *args], 60, "make-certs")
        self.admin_password.write_text(secrets.token_urlsafe(24) + "\n")
        self.admin_password.chmod(0o600)

    def make_logins(self, netns: str, bootstrap: str, cp_ids: Iterable[str]) -> None:
        """The topics and every role's login, and each CP engine's, made as an operator does
        (`kafka-access setup DIR CP_ID...`) from inside `netns`: the broker listens on the
        simulated network only."""
        access = [sys.executable, "-m", "EV_Central", "kafka-access", "--broker", bootstrap]
        access += ["--kafka-ca", str(self.ca), "--kafka-password-file", str(self.admin_password)]
        setup = ["ip", "netns", "exec", netns, *access, "setup", str(self.dir), *cp_ids]
        _run(setup, 120, "kafka-access setup")


def _run(args: list[str], timeout: float, what: str) -> None:
    """Run a tool of the repository's; the test fails with its output when the tool does."""
    done = subprocess.run(
        args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=scaled(timeout), check=False
    )
    assert done.returncode == 0, f"{what} failed:\n{done.stdout}{done.stderr}"
