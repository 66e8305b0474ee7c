"""The monitor's --broker flag, the site dashboard's settings and what browsers may send it."""

from __future__ import annotations

import pytest

from EV_CP_M.config import parse_settings as parse_monitor
from EV_CP_M.dashboard import PingRequest, SnapshotRequest, parse_client_message
from EV_CP_M.dashboard import parse_settings as parse_dashboard
from shared.errors import MessageError

MONITOR = [
    "--engine",
    "127.0.0.1:7001",
    "--central",
    "127.0.0.1:5000",
    "--cp-id",
    "CP001",
    "--secret",
    "s3cret",
]


def test_the_monitor_publishes_nothing_without_a_broker() -> None:
    assert parse_monitor(MONITOR, environ={}).broker is None


def test_the_monitor_takes_a_broker_from_the_flag_or_the_environment() -> None:
    assert parse_monitor([*MONITOR, "--broker", "kafka:9092"], environ={}).broker == "kafka:9092"
    settings = parse_monitor(MONITOR, environ={"EV_BROKER": "10.0.0.2:9092"})
    assert settings.broker == "10.0.0.2:9092"


def test_the_monitor_refuses_a_malformed_broker(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_monitor([*MONITOR, "--broker", "kafka"], environ={})
    assert exit_info.value.code == 2
    assert "--broker" in capsys.readouterr().err


def test_dashboard_settings_defaults_and_environment() -> None:
    settings = parse_dashboard(["--broker", "127.0.0.1:9092"], environ={})
    assert (settings.http_port, settings.listen_host, settings.monitor_timeout) == (
        8003,
        "0.0.0.0",
        3.0,
    )
    settings = parse_dashboard(
        [], environ={"EV_BROKER": "k:9092", "EV_HTTP_PORT": "9003", "EV_LISTEN_HOST": "127.0.0.1"}
    )
    assert (settings.broker, settings.http_port, settings.listen_host) == (
        "k:9092",
        9003,
        "127.0.0.1",
    )


def test_dashboard_needs_a_broker(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_dashboard([], environ={})
    assert exit_info.value.code == 2
    assert "--broker" in capsys.readouterr().err


def test_browser_messages_are_validated() -> None:
    assert isinstance(parse_client_message('{"type":"ping","ref":"a"}'), PingRequest)
    assert isinstance(parse_client_message('{"type":"snapshot"}'), SnapshotRequest)
    for bad in ("", "nope", "[]", '{"type":"stop"}', '{"type":"ping","x":1}', b"{}"):
        with pytest.raises(MessageError):
            parse_client_message(bad)
    with pytest.raises(MessageError, match="ref"):
        parse_client_message('{"type":"ping","ref":"' + "x" * 65 + '"}')


def test_the_dashboard_takes_its_site_s_cp_secrets_and_refuses_malformed_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = ["--broker", "kafka:9092"]
    settings = parse_dashboard([*broker, "--cp-secrets", "CP001=a, CP002=b=c"], environ={})
    assert dict(settings.cp_secrets) == {"CP001": "a", "CP002": "b=c"}
    from_env = parse_dashboard(broker, environ={"EV_CP_SECRETS": "CP003=hush"})
    assert dict(from_env.cp_secrets) == {"CP003": "hush"}
    assert "hush" not in repr(from_env)  # secrets stay out of logs
    for bad in ("CP001", "CP001=", "=secret", "no spaces=secret"):
        with pytest.raises(SystemExit) as exit_info:
            parse_dashboard([*broker, "--cp-secrets", bad], environ={})
        assert exit_info.value.code == 2
        assert "--cp-secrets" in capsys.readouterr().err
