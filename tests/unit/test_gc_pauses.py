"""Central's garbage-collection pause histogram, and how /metrics shows it."""

from __future__ import annotations

import gc

from EV_Central.metrics import GcPauses, render
from tools.fleet import promtext


def test_each_collection_is_timed_by_generation_while_installed() -> None:
    with GcPauses() as pauses:
        gc.collect()  # a full collection
        gc.collect(0)
    assert pauses.by_generation["2"].count == 1
    assert pauses.by_generation["0"].count >= 1
    assert pauses.by_generation["2"].sum > 0
    gc.collect()  # no longer installed: not counted
    assert pauses.by_generation["2"].count == 1


def test_metrics_page_lists_the_pauses() -> None:
    with GcPauses() as pauses:
        gc.collect()
    text = render(
        cps_by_state={},
        sessions_by_status={},
        messages={},
        handler_seconds={},
        consumer_lag={},
        monitors_connected=0,
        websocket_clients=0,
        gc_pauses=pauses.by_generation,
    )
    assert "# TYPE ev_central_gc_pause_seconds histogram" in text
    samples = promtext.parse(text)
    assert promtext.value(samples, "ev_central_gc_pause_seconds_count", generation="2") == 1
