"""The weather service's pure parts: Central's stop rules, the places file, OpenWeather's
answers, and EV_W's command line (docs/weather.md)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from EV_Central import schema
from EV_Central.registry import ChargingPoint
from EV_Central.weather import STALE_AFTER_S, PlaceWeather, place_of, resume_refusal
from EV_W.__main__ import main as ev_w
from EV_W.config import parse_settings
from EV_W.places_file import PlacesFileError, parse_places, parse_temperature, set_place
from EV_W.providers import FileProvider, ProviderError, parse_openweather
from EV_W.service import unreachable
from shared.messages import CPState


def test_a_cps_place_is_its_location_up_to_the_dash() -> None:
    assert place_of("Alicante - Puerto, Muelle 12") == "Alicante"
    assert place_of("San Vicente - Centro Comercial") == "San Vicente"
    assert place_of("Alicante, Av. Maisonnave 12") == "Alicante, Av. Maisonnave 12"


def test_below_zero_freezes_and_zero_or_above_thaws() -> None:
    weather = PlaceWeather("Alicante")
    weather.record(3.0, "file", "", now=100.0)
    assert not weather.frozen and weather.hold() == ""
    weather.record(-2.0, "file", "", now=104.0)
    assert weather.frozen and weather.frozen_at == 104.0
    assert weather.hold() == "weather: -2.0 °C at Alicante"
    weather.record(-3.5, "file", "", now=108.0)  # colder: the alert keeps its start
    assert weather.frozen_at == 104.0 and weather.hold() == "weather: -3.5 °C at Alicante"
    weather.record(0.0, "file", "", now=112.0)
    assert not weather.frozen and weather.hold() == ""


def test_a_failed_reading_marks_the_place_stale_and_changes_nothing_else() -> None:
    weather = PlaceWeather("Alicante")
    weather.record(-2.0, "openweather", "", now=100.0)
    weather.record(None, "openweather", "HTTP 500: oops", now=104.0)
    assert weather.frozen and weather.temperature == -2.0 and weather.updated_at == 100.0
    assert weather.stale(104.0) and weather.error == "HTTP 500: oops"
    weather.record(5.0, "openweather", "", now=108.0)
    assert not weather.stale(108.0) and not weather.frozen
    # A service that stops reporting altogether turns stale too.
    assert weather.stale(108.0 + STALE_AFTER_S + 1)


def test_an_admin_stop_and_a_weather_stop_are_independent() -> None:
    cp = ChargingPoint("CP001", "Alicante - Campus", 0.35, 22.0, connected=True)
    assert cp.state == CPState.ACTIVADO and cp.serving
    cp.weather_hold = "weather: -2.0 °C at Alicante"
    assert cp.state == CPState.PARADO and cp.stop_reason == "weather: -2.0 °C at Alicante"
    assert cp.state_message().stop_reason == cp.stop_reason
    assert "weather: -2.0 °C at Alicante" in cp.unavailable_detail()
    cp.in_service = False  # an admin stops it too
    assert cp.stop_reason == "stopped by an admin; weather: -2.0 °C at Alicante"
    cp.weather_hold = ""  # the thaw
    assert cp.state == CPState.PARADO and cp.stop_reason == "stopped by an admin"
    assert not cp.serving


def test_an_admin_may_not_resume_a_cp_that_frost_holds() -> None:
    assert resume_refusal("CP001", "") is None
    refusal = resume_refusal("CP001", "weather: -2.0 °C at Alicante")
    assert refusal == "CP001 stays PARADO: weather: -2.0 °C at Alicante"


def test_the_places_file_is_checked() -> None:
    assert parse_places('{"Alicante": -2, "Elche": 14.5}', "f") == {
        "Alicante": -2.0,
        "Elche": 14.5,
    }
    for bad, why in [
        ("[1, 2]", "JSON object"),
        ('{"Alicante": "cold"}', "not a number"),
        ('{"Alicante": true}', "not a number"),
        ('{"Alicante": 99}', "from -100 to 70"),
        ("{", "not JSON"),
    ]:
        with pytest.raises(PlacesFileError, match=why):
            parse_places(bad, "f")
    assert parse_temperature("-2") == -2.0 and parse_temperature("3,5") == 3.5
    for bad in ("cold", "nan", "inf", "1e9"):
        with pytest.raises(PlacesFileError):
            parse_temperature(bad)


def test_set_rewrites_the_file_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "weather.json"
    assert ev_w(["set", "Alicante", "12", "--file", str(path), "--add"]) == 0
    assert ev_w(["set", "alicante", "-2", "--file", str(path)]) == 0  # the file's spelling
    assert json.loads(path.read_text()) == {"Alicante": -2.0}
    before = path.read_bytes()
    assert ev_w(["set", "Alicamte", "5", "--file", str(path)]) == 2
    assert "unknown location 'Alicamte'" in capsys.readouterr().err
    assert ev_w(["set", "Alicante", "freezing", "--file", str(path)]) == 2
    assert "not a temperature" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["weather.json"]  # no temporary left
    with pytest.raises(PlacesFileError, match="unknown location"):
        set_place(path, "Murcia", 1.0, add=False)


async def test_the_file_provider_reports_what_it_lacks_as_failures(tmp_path: Path) -> None:
    path = tmp_path / "weather.json"
    path.write_text('{"Alicante": -2}')
    readings = await FileProvider(path).temperatures(["Alicante", "Murcia"])
    assert readings["Alicante"] == -2.0
    assert isinstance(readings["Murcia"], ProviderError)
    path.write_text("{broken")
    readings = await FileProvider(path).temperatures(["Alicante"])
    assert isinstance(readings["Alicante"], ProviderError)
    assert "not JSON" in str(readings["Alicante"])


def test_openweather_answers_are_parsed_or_refused() -> None:
    good = json.dumps({"name": "Alicante", "main": {"temp": -1.25, "humidity": 80}}).encode()
    assert parse_openweather(200, good) == -1.25
    with pytest.raises(ProviderError, match="HTTP 401: Invalid API key"):
        parse_openweather(401, b'{"cod": 401, "message": "Invalid API key"}')
    with pytest.raises(ProviderError, match="malformed reply"):
        parse_openweather(200, b'{"main": {"temp": "cold"}}')
    with pytest.raises(ProviderError, match="not JSON"):
        parse_openweather(200, b"<html>")


def test_the_service_needs_a_password_and_openweather_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        parse_settings([], environ={})
    assert stop.value.code == 2 and "password is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--provider", "openweather"], environ={"EV_WEATHER_PASSWORD": "p"})
    assert "needs an API key" in capsys.readouterr().err
    key = tmp_path / "key"
    key.write_text("abc123\n")
    settings = parse_settings(
        ["--provider", "openweather", "--api-key-file", str(key)],
        environ={"EV_WEATHER_PASSWORD": "p"},
    )
    assert settings.api_key == "abc123" and "abc123" not in repr(settings)


def test_an_older_database_takes_the_weather_role(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE users (id TEXT PRIMARY KEY,"
            " role TEXT NOT NULL CHECK (role IN ('driver', 'admin')),"
            " password_hash TEXT NOT NULL, balance_cents INTEGER NOT NULL DEFAULT 0"
            " CHECK (balance_cents >= 0), created_at REAL NOT NULL)"
        )
        conn.execute("INSERT INTO users VALUES ('ana', 'driver', 'h', 500, 1.0)")
    schema.initialise(path, seed=False)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO users VALUES ('weather', 'weather', 'h', 0, 2.0)")
        rows = conn.execute("SELECT id, role, balance_cents FROM users ORDER BY id").fetchall()
    assert rows == [("ana", "driver", 500), ("weather", "weather", 0)]


def test_a_widening_that_fails_leaves_the_accounts_where_they_were(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    with sqlite3.connect(path) as conn:  # a column this Central does not know: the copy fails
        conn.execute(
            "CREATE TABLE users (id TEXT PRIMARY KEY,"
            " role TEXT NOT NULL CHECK (role IN ('driver', 'admin')),"
            " password_hash TEXT NOT NULL, balance_cents INTEGER NOT NULL DEFAULT 0,"
            " created_at REAL NOT NULL, nickname TEXT)"
        )
        conn.execute("INSERT INTO users VALUES ('ana', 'driver', 'h', 500, 1.0, 'A')")
    with pytest.raises(sqlite3.OperationalError):
        schema.initialise(path, seed=False)
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        rows = conn.execute("SELECT id, balance_cents FROM users").fetchall()
    assert "users_before_weather" not in tables and rows == [("ana", 500)]


def test_a_central_that_does_not_answer_in_time_is_said_so() -> None:
    assert unreachable(TimeoutError()) == "timed out"
    assert unreachable(ConnectionRefusedError(111, "Connection refused")) == (
        "[Errno 111] Connection refused"
    )
