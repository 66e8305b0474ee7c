"""The chaos run's report: results.json, timeline.png and report.html from a results dict."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from tools.chaos.report import (
    KIND_PALETTE,
    STATE_COLOUR,
    faults_by_kind,
    in_progress,
    kind_colours,
    render_html,
    state_spans,
    write_report,
)
from tools.chaos.schedule import KINDS, NET_KINDS

# matplotlib comes with the `bench` extra; the page and the pure parts are tested without it.
draws = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed ('.[bench]')"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMAND = "python -m tools.chaos --seed 42 --duration 120"


def results(violations: list[str]) -> dict[str, Any]:
    faults = [
        {"at": 12.3, "kind": "kill-engine", "target": "CP002", "duration": 3.0, "detail": "-9"},
        {"at": 30.0, "kind": "kill-central", "target": "central", "duration": 2.0, "detail": ""},
        {"at": 55.5, "kind": "kill-engine", "target": "CP001", "duration": 4.0, "detail": "a & b"},
        {"at": 80.0, "kind": "pause", "target": "CP001-monitor", "duration": 5.0, "detail": "x"},
    ]
    supplies: list[dict[str, Any]] = [
        {"cp_id": "CP001", "driver_id": "user1", "session_id": "ab12", "start": 5.0,
         "end": 20.5, "kwh": 0.083, "source": "real"},
        {"cp_id": "CP002", "driver_id": "user2", "session_id": "cd34", "start": 40.0,
         "end": None, "kwh": 0.01, "source": "real"},
        {"cp_id": "SIM0001", "driver_id": "sim1", "session_id": "ef56", "start": 1.0,
         "end": 9.0, "kwh": 0.05, "source": "sim"},
        {"cp_id": "SIM0002", "driver_id": "sim2", "session_id": "gh78", "start": 3.0,
         "end": 15.0, "kwh": 0.07, "source": "sim"},
    ]  # fmt: skip
    cp_states = [
        {"cp_id": "CP001", "at": 0.0, "state": "ACTIVADO"},
        {"cp_id": "CP001", "at": 5.0, "state": "SUMINISTRANDO"},
        {"cp_id": "CP001", "at": 20.5, "state": "ACTIVADO"},
        {"cp_id": "CP001", "at": 55.6, "state": "DESCONECTADO"},
        {"cp_id": "CP002", "at": 0.0, "state": "ACTIVADO"},
        {"cp_id": "CP002", "at": 12.4, "state": "AVERIADO"},
        {"cp_id": "CP002", "at": 60.0, "state": "PARADO"},
    ]
    return {
        "seed": 42,
        "duration_s": 120.0,
        "started_at": "2026-12-06T22:30:00Z",
        "command": COMMAND,
        "kinds": ["kill-central", "kill-engine", "pause", "restart-broker"],
        "faults": faults,
        "supplies": supplies,
        "cp_states": cp_states,
        "invariants": [
            {"name": "one ticket per supply", "checked": 4, "violations": violations},
            {"name": "every supply ends", "checked": 4, "violations": []},
        ],
        "totals": {
            "supplies": 4,
            "supplies_real": 2,
            "supplies_sim": 2,
            "kwh": 0.213,
            "tickets": 4,
            "faults": 4,
            "violations": len(violations),
            "euros": 0.07,
        },
    }


@draws
def test_a_failing_run_writes_all_three_files(tmp_path: Path) -> None:
    run = results(["session ab12: <script>alert(1)</script> at user1"])
    paths = write_report(run, tmp_path / "out")

    assert set(paths) == {"json", "png", "html"}
    assert all(path.is_file() and path.parent == tmp_path / "out" for path in paths.values())
    assert json.loads(paths["json"].read_text("utf-8")) == run

    png = paths["png"].read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert 10_000 < len(png) < 2_000_000

    page = paths["html"].read_text("utf-8")
    assert "FAIL" in page and "PASS" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page
    assert COMMAND in page
    assert "a &amp; b" in page
    assert '<img src="timeline.png"' in page
    for kind in run["kinds"]:
        assert kind in page


@draws
def test_a_passing_run_says_pass(tmp_path: Path) -> None:
    page = write_report(results([]), tmp_path)["html"].read_text("utf-8")
    assert "PASS" in page and "FAIL" not in page


@draws
def test_a_run_with_nothing_in_it_still_reports(tmp_path: Path) -> None:
    empty = results([])
    empty.update(kinds=[], faults=[], supplies=[], cp_states=[], invariants=[])
    paths = write_report(empty, tmp_path)
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    assert "PASS" in paths["html"].read_text("utf-8")


def test_only_the_first_violations_are_listed_on_the_page() -> None:
    page = render_html(results([f"violation number {i}" for i in range(25)]))
    assert "FAIL: 25 violations" in page
    assert "violation number 9<" in page
    assert "violation number 10<" not in page
    assert "and 15 more" in page


def test_faults_by_kind_counts_enabled_kinds_first_even_when_never_injected() -> None:
    summary = faults_by_kind(results([])["faults"], ["pause", "restart-broker"])
    assert [(s.kind, s.count, s.first_at, s.last_at) for s in summary] == [
        ("pause", 1, 80.0, 80.0),
        ("restart-broker", 0, None, None),
        ("kill-engine", 2, 12.3, 55.5),
        ("kill-central", 1, 30.0, 30.0),
    ]


def test_in_progress_counts_running_supplies_and_open_ones_until_the_end() -> None:
    supplies: list[dict[str, Any]] = [
        {"start": 1.0, "end": 5.0},
        {"start": 5.0, "end": 8.0},  # follows the first: never two at once
        {"start": 2.0, "end": None},
    ]
    times, counts = in_progress(supplies, until=10.0)
    assert list(zip(times, counts, strict=True)) == [
        (0.0, 0),
        (1.0, 1),
        (2.0, 2),
        (5.0, 1),
        (5.0, 2),
        (8.0, 1),
        (10.0, 0),
    ]


def test_state_spans_last_until_the_next_transition_or_the_end() -> None:
    spans = state_spans(results([])["cp_states"], until=120.0)
    assert spans["CP002"] == [
        ("ACTIVADO", 0.0, 12.4),
        ("AVERIADO", 12.4, pytest.approx(47.6)),
        ("PARADO", 60.0, 60.0),
    ]
    assert sum(width for _, _, width in spans["CP001"]) == pytest.approx(120.0)


def test_every_kind_of_a_net_run_has_a_colour_of_its_own() -> None:
    colours = kind_colours({"kinds": list(KINDS), "faults": []})
    assert list(colours) == list(KINDS) and set(NET_KINDS) <= set(colours)
    assert len(set(colours.values())) == len(KINDS) <= len(KIND_PALETTE)
    assert not set(colours.values()) & {*STATE_COLOUR.values(), "navy"}


@draws
def test_network_faults_are_drawn_and_listed(tmp_path: Path) -> None:
    run = results([])
    run["kinds"] = list(KINDS)
    run["faults"] += [
        {"at": 20.0, "kind": "net-cut", "target": "pc3", "duration": 4.1, "detail": "pc3 off"},
        {"at": 41.0, "kind": "net-loss", "target": "pc1", "duration": 9.0, "detail": "loss 25%"},
        {"at": 70.0, "kind": "net-delay", "target": "pc3", "duration": 6.0, "detail": "delay"},
    ]
    paths = write_report(run, tmp_path)
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    page = paths["html"].read_text()
    for kind in NET_KINDS:
        assert f"<td>{kind}</td><td class='num'>1</td>" in page
