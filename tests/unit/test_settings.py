"""Flags that mirror EV_ environment variables (shared.settings)."""

from __future__ import annotations

import argparse

import pytest

from shared.errors import ConfigError
from shared.settings import (
    EnvArgumentParser,
    add_common_options,
    env_name,
    host_port,
    host_ports,
    port_number,
    positive_float,
)


def make_parser(environ: dict[str, str]) -> EnvArgumentParser:
    parser = EnvArgumentParser(prog="test", environ=environ)
    parser.add_option("--broker", required=True, help="Kafka HOST:PORT")
    parser.add_option("--http-port", type=port_number, default=8000)
    parser.add_option("--pause", type=positive_float, default=4.0)
    parser.add_option("--verbose", action="store_true")
    return parser


def test_env_name_mirrors_the_flag() -> None:
    assert env_name("--http-port") == "EV_HTTP_PORT"
    assert env_name("--broker") == "EV_BROKER"


def test_defaults_without_environment() -> None:
    args = make_parser({}).parse_args(["--broker", "k:9092"])
    assert (args.broker, args.http_port, args.pause, args.verbose) == ("k:9092", 8000, 4.0, False)


def test_environment_supplies_values_and_satisfies_required() -> None:
    environ = {"EV_BROKER": "kafka:9092", "EV_HTTP_PORT": "8001", "EV_PAUSE": "0.5"}
    args = make_parser(environ).parse_args([])
    assert args.broker == "kafka:9092"
    assert args.http_port == 8001  # converted with the option's type
    assert args.pause == 0.5


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("no", False)],
)
def test_environment_booleans(raw: str, expected: bool) -> None:
    args = make_parser({"EV_BROKER": "k:1", "EV_VERBOSE": raw}).parse_args([])
    assert args.verbose is expected


def test_flags_override_the_environment() -> None:
    environ = {"EV_BROKER": "kafka:9092", "EV_HTTP_PORT": "8001"}
    args = make_parser(environ).parse_args(["--broker", "other:9093", "--http-port", "8002"])
    assert args.broker == "other:9093"
    assert args.http_port == 8002


def test_required_flag_missing_everywhere_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        make_parser({}).parse_args([])
    assert caught.value.code == 2
    assert "--broker" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "raw"), [("EV_HTTP_PORT", "eighty"), ("EV_HTTP_PORT", "70000"), ("EV_PAUSE", "-1")]
)
def test_bad_environment_value_raises_config_error(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name) as caught:
        make_parser({"EV_BROKER": "k:1", name: raw})
    assert repr(raw) in str(caught.value)


def test_bad_flag_value_exits_2() -> None:
    with pytest.raises(SystemExit) as caught:
        make_parser({}).parse_args(["--broker", "k:1", "--http-port", "x"])
    assert caught.value.code == 2


def test_help_names_the_environment_variable() -> None:
    text = make_parser({}).format_help()
    assert "[env EV_BROKER]" in text
    assert "[env EV_HTTP_PORT]" in text


def test_explicit_env_name() -> None:
    parser = EnvArgumentParser(prog="t", environ={"KAFKA": "k:1"})
    parser.add_option("--broker", env="KAFKA")
    assert parser.parse_args([]).broker == "k:1"


def test_common_options_read_the_environment() -> None:
    parser = EnvArgumentParser(prog="t", environ={"EV_LOG_LEVEL": "DEBUG", "EV_LOG_JSON": "1"})
    add_common_options(parser)
    args = parser.parse_args([])
    assert (args.log_level, args.log_json) == ("DEBUG", True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost:9092", ("localhost", 9092)),
        ("10.0.0.2:5000", ("10.0.0.2", 5000)),
        ("[::1]:9092", ("::1", 9092)),
        ("kafka.example.org:65535", ("kafka.example.org", 65535)),
    ],
)
def test_host_port_parses(value: str, expected: tuple[str, int]) -> None:
    assert host_port(value) == expected


@pytest.mark.parametrize(
    "value", ["localhost", ":9092", "host:", "host:0", "host:65536", "host:port", "host:-1", ""]
)
def test_host_port_rejects(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="HOST:PORT"):
        host_port(value)


def test_port_number_and_positive_float() -> None:
    assert port_number("0") == 0
    assert port_number("8080") == 8080
    for bad in ("65536", "-1", "http"):
        with pytest.raises(argparse.ArgumentTypeError):
            port_number(bad)
    assert positive_float("0") == 0.0
    assert positive_float("2.5") == 2.5
    for bad in ("-0.1", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_float(bad)


def test_several_host_ports_are_parsed_in_order() -> None:
    assert host_ports("a:1, b:2,[::1]:3") == (("a", 1), ("b", 2), ("::1", 3))
    with pytest.raises(argparse.ArgumentTypeError):
        host_ports("a:1,b")
