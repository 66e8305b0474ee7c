"""The engine's settings: --speed / EV_SPEED, the time scale of its simulated clock."""

from __future__ import annotations

import pytest

from EV_CP_E.config import parse_settings
from shared.errors import ConfigError

REQUIRED = ["--broker", "127.0.0.1:9092", "--listen", "127.0.0.1:6101"]


def test_real_time_by_default() -> None:
    assert parse_settings(REQUIRED, environ={}).speed == 1.0


@pytest.mark.parametrize(("raw", "speed"), [("60", 60.0), ("0.5", 0.5), ("3600", 3600.0)])
def test_speed_from_the_flag_or_the_environment(raw: str, speed: float) -> None:
    assert parse_settings([*REQUIRED, "--speed", raw], environ={}).speed == speed
    assert parse_settings(REQUIRED, environ={"EV_SPEED": raw}).speed == speed


def test_the_flag_overrides_the_environment() -> None:
    settings = parse_settings([*REQUIRED, "--speed", "10"], environ={"EV_SPEED": "60"})
    assert settings.speed == 10.0


@pytest.mark.parametrize("raw", ["0", "-60", "3601", "fast", "", "nan", "inf"])
def test_a_bad_flag_exits_2_saying_what_a_speed_is(
    raw: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings([*REQUIRED, "--speed", raw], environ={})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --speed: expected how many times faster than real time" in err, err
    assert f"above 0 and at most 3600 (1: real time), got {raw!r}" in err, err
    assert err.count("\n") == 1, err  # one line, no usage dump


@pytest.mark.parametrize("raw", ["0", "1e9", "sixty"])
def test_a_bad_environment_value_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"EV_SPEED=.* is not valid"):
        parse_settings(REQUIRED, environ={"EV_SPEED": raw})
