"""The fleet simulator's pure parts: percentiles, /proc parsing, the metrics text format."""

from __future__ import annotations

import pytest

from EV_Central.metrics import Histogram, render
from tools.fleet import procstat, promtext
from tools.fleet.stats import percentile, summarise


def test_percentile_interpolates_between_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_nothing_and_bad_quantiles() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarise_reports_milliseconds_and_handles_no_samples() -> None:
    summary = summarise([0.001 * i for i in range(1, 101)])
    assert summary["count"] == 100
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["max"] == pytest.approx(100.0)
    assert summarise([]) == {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}


def test_parse_stat_counts_fields_after_a_command_name_with_spaces() -> None:
    # pid (comm) state ppid ... utime(14) stime(15): comm holds a space and a parenthesis.
    fields = ["S", "1"] + ["0"] * 9 + ["250", "150"] + ["0"] * 30
    text = "1234 (python (x) y) " + " ".join(fields)
    assert procstat.parse_stat(text, ticks=100) == pytest.approx(4.0)


def test_parse_status_reads_rss_and_threads() -> None:
    text = "Name:\tpython\nVmRSS:\t  123456 kB\nThreads:\t7\n"
    assert procstat.parse_status(text) == (123456 * 1024, 7)


def test_sample_of_this_process() -> None:
    import os

    s = procstat.sample(os.getpid())
    assert s.cpu_seconds > 0
    assert s.rss_bytes > 1_000_000
    assert s.threads >= 1


def test_histogram_is_cumulative_and_ends_with_inf() -> None:
    h = Histogram([0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.count == 4
    assert h.sum == pytest.approx(3.65)


def test_rendered_metrics_parse_back() -> None:
    h = Histogram()
    h.observe(0.002)
    text = render(
        cps_by_state={"ACTIVADO": 3, "DESCONECTADO": 1},
        sessions_by_status={"COMPLETED": 2},
        messages={"heartbeat": 10, 'we"ird': 1},
        handler_seconds={"supply_request": h},
        consumer_lag={"ev.cp.events/0": 5},
        monitors_connected=3,
        websocket_clients=1,
        outbox_pending=0,
        stage_seconds={"arrival": h},
    )
    assert "# TYPE ev_central_handler_seconds histogram" in text
    samples = promtext.parse(text)
    assert promtext.value(samples, "ev_central_cps", state="ACTIVADO") == 3
    assert promtext.value(samples, "ev_central_messages_total", type="heartbeat") == 10
    assert promtext.value(samples, "ev_central_messages_total", type='we"ird') == 1
    assert promtext.value(samples, "ev_central_consumer_lag", partition="ev.cp.events/0") == 5
    assert (
        promtext.value(
            samples, "ev_central_handler_seconds_bucket", type="supply_request", le="+Inf"
        )
        == 1
    )
    assert promtext.value(samples, "ev_central_handler_seconds_count", type="supply_request") == 1
    assert promtext.value(samples, "ev_central_monitors_connected") == 3
    assert promtext.value(samples, "ev_central_outbox_pending") == 0
    assert promtext.value(samples, "ev_central_stage_seconds_count", stage="arrival") == 1


def test_promtext_rejects_a_broken_line() -> None:
    with pytest.raises(ValueError):
        promtext.parse("not a metric line at all {\n")
