"""EV_Registry's pure parts: its bodies, the body-size limit, its settings, and the monitor's
enrolment flags (the API over HTTPS is in tests/integration/test_registry_api.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from EV_Central.admin_api import ADMIN_REQUEST, EnrolRequest, IssueEnrolment
from EV_Central.enrolment import new_token, token_hash
from EV_CP_M.config import parse_settings as monitor_settings
from EV_CP_M.site import Site
from EV_Registry.config import check_files, parse_settings
from EV_Registry.limits import BodyLimit
from EV_Registry.models import EnrolmentRequest, LoginForm, NewCP, Redemption
from shared.errors import ConfigError
from shared.messages import CPState, CPStateUpdate

GOOD_CP: dict[str, Any] = {"id": "CP100", "location": "x", "price_eur_kwh": 0.3, "max_kw": 22}


@pytest.mark.parametrize(
    "change",
    [
        {"id": ""},
        {"id": "CP/1"},
        {"id": "C" * 33},
        {"location": ""},
        {"location": "x" * 121},
        {"price_eur_kwh": -0.01},
        {"price_eur_kwh": 10.01},
        {"price_eur_kwh": "cheap"},
        {"max_kw": 0},
        {"max_kw": 1001},
        {"extra": 1},
    ],
)
def test_a_cp_out_of_range_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        NewCP.model_validate(GOOD_CP | change)


def test_the_registry_accepts_what_central_accepts() -> None:
    cp = NewCP.model_validate(GOOD_CP)
    command = ADMIN_REQUEST.validate_python({"type": "register_cp", **cp.model_dump()})
    assert command.model_dump()["id"] == "CP100"


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (LoginForm, {"username": "admin"}),
        (LoginForm, {"username": "a b", "password": "x"}),
        (LoginForm, {"username": "admin", "password": ""}),
        (EnrolmentRequest, {"ttl_s": 59}),
        (EnrolmentRequest, {"ttl_s": 7 * 24 * 3600 + 1}),
        (Redemption, {"token": "short"}),
        (Redemption, {"token": "x" * 20 + "!"}),
    ],
)
def test_bad_bodies_are_refused(model: Any, body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        model.model_validate(body)


def test_tokens_are_random_and_only_their_hash_is_kept() -> None:
    first, second = new_token(), new_token()
    assert first != second and len(first) >= 32
    assert EnrolRequest(cp_id="CP001", token=first).token == first  # Central takes it
    assert token_hash(first) != first and len(token_hash(first)) == 64
    assert IssueEnrolment(target="CP001").ttl_s == 900
    with pytest.raises(ValidationError):  # the caller is an address, nothing else
        IssueEnrolment(target="CP001", caller="203.0.113.5; DROP")


def call(app: BodyLimit, body_parts: list[bytes], length: int | None) -> tuple[int, bytes]:
    """One request through `app` (a plain ASGI call): the status and body answered."""
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    scope = {"type": "http", "headers": headers, "client": ("203.0.113.5", 1)}
    incoming = [
        {"type": "http.request", "body": part, "more_body": i < len(body_parts) - 1}
        for i, part in enumerate(body_parts)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """An application that answers with the body it read."""
    message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": message["body"]})


def test_a_body_over_the_limit_is_413_announced_or_streamed() -> None:
    app = BodyLimit(echo, max_bytes=10)
    assert call(app, [b"12345", b"67890"], None) == (200, b"1234567890")
    status, body = call(app, [b"x"], 11)  # announced: refused before reading
    assert status == 413 and "larger than 10 bytes" in json.loads(body)["detail"]
    assert call(app, [b"123456", b"78901"], None)[0] == 413  # found while reading


def test_the_registry_serves_https_unless_told_plain_http_on_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="serves HTTPS"):
        parse_settings([], environ={})
    with pytest.raises(ConfigError, match="loopback"):
        parse_settings(["--insecure-http", "--listen-host", "0.0.0.0"], environ={})
    missing = parse_settings(["--tls-cert", str(tmp_path / "x"), "--tls-key", "y"], environ={})
    with pytest.raises(ConfigError, match="no such file"):
        check_files(missing)
    plain = parse_settings(["--insecure-http", "--listen-host", "127.0.0.1"], environ={})
    assert plain.scheme == "http" and plain.central == ("127.0.0.1", 8002)


MONITOR = ["--engine", "127.0.0.1:6101", "--central", "127.0.0.1:5000", "--cp-id", "CP001"]


def test_the_monitor_enrols_only_without_a_secret_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "CP001.secret"
    enrol = ["--secret-file", str(secret_file), "--registry", "https://pc2:8004/"]
    settings = monitor_settings([*MONITOR, *enrol, "--enrolment-token", "T" * 32], environ={})
    assert settings.enrolment_token == "T" * 32 and settings.secret == ""
    assert settings.registry == "https://pc2:8004"
    secret_file.write_text("the-secret\n")  # enrolled before: the token is not used again
    settings = monitor_settings([*MONITOR, *enrol, "--enrolment-token", "T" * 32], environ={})
    assert settings.enrolment_token is None and settings.secret == "the-secret"


@pytest.mark.parametrize(
    "flags",
    [
        ["--registry", "https://pc2:8004", "--secret-file", "f"],  # no token
        ["--enrolment-token", "T" * 32, "--secret-file", "f"],  # no registry
        ["--registry", "https://pc2:8004", "--enrolment-token", "T" * 32],  # nowhere to keep
    ],
)
def test_enrolment_flags_that_do_not_fit_exit_2(flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        monitor_settings([*MONITOR, *flags], environ={})
    assert exit_.value.code == 2


def test_the_registry_url_must_be_https_off_this_machine() -> None:
    flags = ["--enrolment-token", "T" * 32, "--secret-file", "f"]
    with pytest.raises(ConfigError, match="https"):
        monitor_settings([*MONITOR, *flags, "--registry", "http://pc2:8004"], environ={})
    local = monitor_settings([*MONITOR, *flags, "--registry", "http://127.0.0.1:1"], environ={})
    assert local.registry == "http://127.0.0.1:1"


def test_a_deregistered_cp_leaves_the_site_dashboard() -> None:
    site = Site()
    for cp_id in ("CP001", "CP002"):
        site.on_state(
            CPStateUpdate(
                cp_id=cp_id,
                state=CPState.ACTIVADO,
                location="Alicante",
                price_eur_kwh=0.35,
                max_kw=22.0,
            )
        )
    site.on_removed("CP002")  # the state topic's tombstone
    site.on_removed("CP404")  # one it never knew: nothing happens
    assert list(site.cps) == ["CP001"]
