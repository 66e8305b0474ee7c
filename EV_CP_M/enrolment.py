"""Self-enrolment: a new CP fetches its secret from EV_Registry with a one-time token.

`python -m EV_CP_M ... --secret-file PATH --registry https://PC2:8004 --enrolment-token T`:
when PATH does not exist yet, the monitor sends the token to the registry
(`POST /cps/{id}/enrol`), writes the secret it gets into PATH (created with mode 0600, never
overwritten) and carries on as usual; when PATH exists the CP is enrolled already and the
token is not used (EV_CP_M/config.py reads the file then). It runs once, at start-up, before
the event loop: nothing else is running yet.
A refused token (wrong, used, expired) is `EnrolmentRefused`, a ConfigError (exit code 2);
a registry that cannot be reached is `EnrolmentFailed` (exit code 1).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

from EV_CP_M.config import MonitorSettings
from shared.errors import ConfigError, EVError
from shared.tls import client_context, describe_failure

log = logging.getLogger(__name__)

MAX_ANSWER = 64 * 1024  # bytes of the registry's answer
ENROL_TIMEOUT = 15.0  # seconds the registry (and Central behind it) has to answer


class EnrolmentRefused(ConfigError):
    """The registry refused the token (or the request): starting again will not help."""


class EnrolmentFailed(EVError):
    """The registry could not be asked (unreachable, TLS, an answer that makes no sense)."""


def enrol(settings: MonitorSettings, timeout: float = ENROL_TIMEOUT) -> MonitorSettings:
    """Enrol the CP at the registry (its secret file does not exist yet), keep the secret in
    that file, and return the settings with it."""
    assert settings.registry and settings.enrolment_token and settings.secret_file
    path = Path(settings.secret_file)
    secret = redeem(
        settings.registry, settings.cp_id, settings.enrolment_token, settings.registry_ca, timeout
    )
    try:
        # O_EXCL: a file that appeared meanwhile is not overwritten; 0600 from the start.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise EnrolmentFailed(
            f"enrolled, but cannot write the secret to {path}: {exc.strerror or exc}; "
            "ask an admin for a new enrolment token"
        ) from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    log.info("%s enrolled at %s; its secret is in %s", settings.cp_id, settings.registry, path)
    return replace(settings, secret=secret, enrolment_token=None)


def redeem(registry: str, cp_id: str, token: str, ca: str | None, timeout: float) -> str:
    """The CP's new secret, in exchange for its one-time token; `registry` is the URL
    EV_CP_M/config.py checked (https://, no trailing slash)."""
    url = f"{registry}/cps/{quote(cp_id, safe='')}/enrol"
    body = json.dumps({"token": token}).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    context = client_context(ca) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as reply:
            answer = _json(reply.read(MAX_ANSWER))
    except urllib.error.HTTPError as exc:
        detail = _json(exc.read(MAX_ANSWER)).get("detail") or exc.reason
        if exc.code in (400, 403, 404, 422, 429):
            refused = f"the registry refused the enrolment of {cp_id}: {detail}"
            raise EnrolmentRefused(refused) from None
        failed = f"the registry failed the enrolment (HTTP {exc.code}): {detail}"
        raise EnrolmentFailed(failed) from None
    except OSError as exc:  # URLError, a refused connection, a TLS failure
        cause = getattr(exc, "reason", exc)
        reason = (describe_failure(cause) if isinstance(cause, BaseException) else None) or str(
            cause
        )
        raise EnrolmentFailed(f"cannot reach the registry at {registry}: {reason}") from None
    secret = answer.get("secret")
    if not isinstance(secret, str) or not secret or len(secret) > 256:
        raise EnrolmentFailed("the registry's answer carries no secret")
    return secret


def _json(raw: bytes) -> dict[str, object]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
