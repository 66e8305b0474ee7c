"""What the driver app prints (EV_Driver.output) and its command-line entry point."""

from __future__ import annotations

import io
import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from EV_Driver.__main__ import main
from EV_Driver.flow import (
    Accepted,
    Authorized,
    Available,
    Denied,
    Event,
    Failure,
    Following,
    Notice,
    Requested,
    Started,
    Telemetry,
    TicketKind,
    TicketShown,
)
from EV_Driver.output import Output, Symbols, human_lines, iso_utc, json_object, price
from shared import messages as m

D = "D1"
TICKET = m.TicketData(
    session_id="ab12cd34ef56",
    cp_id="CP001",
    driver_id=D,
    kwh=0.0411,
    price_eur_kwh=0.35,
    amount_eur=0.01,
    reason=m.EndReason.UNPLUGGED,
    started_at=1_700_000_000.0,
    ended_at=1_700_000_060.5,
)
SUMMARY = m.CPSummary(
    cp_id="CP001", location="Calle Mayor 1", price_eur_kwh=0.35, state=m.CPState.ACTIVADO
)
SESSION = m.SessionInfo(session_id="ab12cd34ef56", cp_id="CP001", status="SUPPLYING", kw=7.4)

EVENTS: list[Event] = [
    Requested(D, "CP001", "r1"),
    Available(D, (SUMMARY,)),
    Available(D, ()),
    Accepted(D, "CP001", "ab12cd34ef56", "r1"),
    Denied(D, "CP001", "r1", "cp_unavailable", ""),
    Authorized(D, "CP001", "ab12cd34ef56", 0.35, 1_700_000_100.0),
    Started(D, "CP001", "ab12cd34ef56"),
    Telemetry(D, "CP001", "ab12cd34ef56", 7.4, 0.0123, 0.0),
    TicketShown(TICKET),
    TicketShown(TICKET, TicketKind.AWAY),
    TicketShown(TICKET.model_copy(update={"revision": 2}), TicketKind.CORRECTION),
    Following(D, SESSION),
    Notice(D, "hello", "info"),
    Failure(D, "cannot reach Central; waiting"),
]

UNI = Symbols(unicode=True)


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (Requested(D, "CP001", "r1"), "→ request CP001"),
        (
            Accepted(D, "CP001", "ab12cd34ef56", "r1"),
            "✓ accepted: asking CP001 to authorise (session ab12cd34…)",
        ),
        (
            Denied(D, "CP001", "r1", "cp_unavailable", ""),
            "✗ denied: the charging point is not available (cp_unavailable)",
        ),
        (
            Denied(D, "CP001", "r1", "cp_unavailable", "CP001 is PARADO"),
            "✗ denied: the charging point is not available (cp_unavailable: CP001 is PARADO)",
        ),
        (
            Denied(D, "CP001", "r1", "cp_refused", "engine is KO"),
            "✗ denied: the charging point refused the authorisation (cp_refused: engine is KO)",
        ),
        (
            Denied(D, "CP001", "r1", "cp_no_answer", ""),
            "✗ denied: the charging point did not answer in time (cp_no_answer)",
        ),
        # A reason this version does not know yet is shown as it came.
        (Denied(D, "CP001", "r1", "cp_on_fire", "smoke"), "✗ denied: cp_on_fire (smoke)"),
        (
            Authorized(D, "CP001", "s", 0.35, 0.0),
            "authorised at CP001 (0.35 €/kWh): plug in now",
        ),
        (Started(D, "CP001", "s"), "supply started"),
        (Telemetry(D, "CP001", "s", 7.4, 0.0123, 0.0), "  7.40 kW  0.0123 kWh  0.00 €"),
        (TicketShown(TICKET), "ticket: CP001 0.0411 kWh × 0.35 €/kWh = 0.01 € (unplugged)"),
        (
            TicketShown(TICKET, TicketKind.AWAY),
            "ticket (while you were away): CP001 0.0411 kWh × 0.35 €/kWh = 0.01 € (unplugged)",
        ),
        (Failure(D, "cannot reach Central; waiting"), "✗ cannot reach Central; waiting"),
    ],
)
def test_human_lines(event: Event, line: str) -> None:
    assert human_lines(event, UNI) == [line]


@pytest.mark.parametrize("reason", list(m.DenialReason))
def test_every_denial_reason_reads_as_words(reason: m.DenialReason) -> None:
    (line,) = human_lines(Denied(D, "CP001", "r1", reason.value, ""), UNI)
    assert line.endswith(f" ({reason.value})")
    words = line.removeprefix("✗ denied: ").removesuffix(f" ({reason.value})")
    assert words and "_" not in words, line


def test_human_available_list() -> None:
    lines = human_lines(Available(D, (SUMMARY,)), UNI)
    assert lines[0].startswith("available charging points (1)")
    assert "CP001" in lines[1] and "0.35 €/kWh" in lines[1] and "Calle Mayor 1" in lines[1]
    assert "no charging point" in human_lines(Available(D, ()), UNI)[0]


def test_plain_symbols_when_the_terminal_cannot_show_them() -> None:
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    assert Symbols.for_stream(stream).ok != "✓"
    plain = Symbols(unicode=False)
    for event in EVENTS:
        for line in human_lines(event, plain):
            line.encode("ascii")


def test_price_format() -> None:
    assert price(0.35) == "0.35"
    assert price(0.3) == "0.30"
    assert price(0.345) == "0.345"


def test_iso_utc() -> None:
    assert iso_utc(None) is None
    text = iso_utc(1_700_000_060.5)
    assert text == "2023-11-14T22:14:20.500Z"
    assert datetime.fromisoformat(text).timestamp() == 1_700_000_060.5


def test_json_ticket_has_exactly_the_contract_fields() -> None:
    obj = json_object(TicketShown(TICKET))
    assert obj == {
        "event": "ticket",
        "session_id": "ab12cd34ef56",
        "cp_id": "CP001",
        "driver_id": D,
        "kwh": 0.0411,
        "price_eur_kwh": 0.35,
        "amount_eur": 0.01,
        "reason": "unplugged",
        "started_at": "2023-11-14T22:13:20.000Z",
        "ended_at": "2023-11-14T22:14:20.500Z",
        "revision": 1,
    }
    no_start = json_object(TicketShown(TICKET.model_copy(update={"started_at": None})))
    assert no_start is not None and no_start["started_at"] is None


def test_json_events() -> None:
    denied = json_object(Denied(D, "CP001", "r1", "cp_unavailable", "PARADO"))
    assert denied is not None
    assert (denied["event"], denied["reason"], denied["detail"]) == (
        "denied",
        "cp_unavailable",
        "PARADO",
    )
    telemetry = json_object(Telemetry(D, "CP001", "s", 7.4, 0.0123, 0.01))
    assert telemetry is not None
    assert {k: telemetry[k] for k in ("event", "kw", "kwh", "amount_eur", "session_id")} == {
        "event": "telemetry",
        "kw": 7.4,
        "kwh": 0.0123,
        "amount_eur": 0.01,
        "session_id": "s",
    }
    assert json_object(Requested(D, "CP001", "r1")) is None  # not part of the JSON contract


ALLOWED = {
    "accepted",
    "denied",
    "authorized",
    "started",
    "telemetry",
    "ticket",
    "error",
    "available",
    "notice",
}


def test_json_output_is_one_object_a_line_with_known_events() -> None:
    stream = io.StringIO()
    output = Output(json_mode=True, stream=stream)
    for event in EVENTS:
        output.emit(event)
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(EVENTS) - 1  # all but Requested
    for line in lines:
        obj = json.loads(line)
        assert obj["event"] in ALLOWED
        assert obj["driver_id"] == D
        if obj["event"] != "ticket":
            assert "cp_id" in obj and "session_id" in obj


def test_human_output_goes_a_line_at_a_time() -> None:
    stream = io.StringIO()
    output = Output(json_mode=False, stream=stream)
    output.emit(Started(D, "CP001", "s"))
    assert stream.getvalue() == "supply started\n"


def test_output_survives_a_closed_pipe() -> None:
    class Closed(io.StringIO):
        attempts = 0

        def write(self, s: str) -> int:
            self.attempts += 1
            raise BrokenPipeError

    stream = Closed()
    output = Output(stream=stream)
    output.emit(Started(D, "CP001", "s"))  # the reader has gone: no error
    assert stream.attempts == 1
    output.emit(Started(D, "CP001", "s"))
    output.emit(Started(D, "CP001", "s"))
    assert stream.attempts == 1  # nothing more is written to a closed pipe
    assert stream.getvalue() == ""


# --- the entry point (no broker needed for these) ---------------------------------------


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EV_"):
            monkeypatch.delenv(name)


def test_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--driver-id" in capsys.readouterr().out


def test_main_dashboard_needs_a_broker(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--broker" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--broker", "k:1", "--driver-id", "D1"],
        ["--broker", "k:1", "--driver-id", "D1", "--cp", "A", "--file", "x"],
        ["--broker", "k", "--driver-id", "D1", "--cp", "A"],
    ],
)
def test_main_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_main_unusable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.txt"
    path.write_text("# nothing valid\nCP 1\n")
    assert main(["--broker", "k:1", "--driver-id", "D1", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2" in err
    assert main(["--broker", "k:1", "--driver-id", "D1", "--file", str(tmp_path / "no")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_main_bad_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EV_PAUSE", "later")
    assert main(["--broker", "k:1", "--driver-id", "D1", "--cp", "A"]) == 2
    assert "EV_PAUSE" in capsys.readouterr().err
