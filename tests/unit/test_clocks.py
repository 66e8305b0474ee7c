"""Clock offsets: the NTP arithmetic, the estimates, the warnings, and Central's registry."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from EV_Central.clocks import HOP_KEPT, HOPS, Clocks, Hops, PeerClock
from EV_Central.metrics import render
from shared.clock import (
    FIX,
    SKEW_WARNING_S,
    NetworkClock,
    OffsetEstimate,
    broker_time,
    describe,
    ntp_offset,
    ntp_offset4,
)


def test_ntp_arithmetic_takes_the_middle_of_the_round_trip() -> None:
    # Our clock 60 s ahead; the answer took 0.1 s there and back, served half way.
    offset, trip = ntp_offset(1000.0, 940.05, 1000.1)
    assert offset == pytest.approx(60.0) and trip == pytest.approx(0.1)
    # Four times: they received at t2 and answered at t3 (their clock, 5 s behind ours).
    offset, trip = ntp_offset4(100.0, 95.02, 95.52, 100.54)
    assert offset == pytest.approx(-5.0) and trip == pytest.approx(0.04)


def test_the_sample_with_the_shortest_trip_wins_and_one_way_takes_the_largest() -> None:
    estimate = OffsetEstimate(kept=3)
    assert estimate.offset is None and estimate.age is None
    estimate.add(10.4, spread=0.8)
    estimate.add(10.01, spread=0.02)
    estimate.add(9.7, spread=0.6)
    assert estimate.offset == 10.01
    estimate.add(11.0, 0.9)
    estimate.add(11.0, 0.9)
    estimate.add(11.0, 0.9)  # the good one has left the window
    assert estimate.offset == 11.0
    one_way = OffsetEstimate(one_way=True)
    for late in (0.3, 0.01, 0.2):  # sent-minus-arrived: late by the trip each time
        one_way.add(60.0 - late)
    assert one_way.offset == pytest.approx(59.99)


def test_broker_time_is_read_only_from_records_the_broker_stamped() -> None:
    assert broker_time(SimpleNamespace(timestamp_type=1, timestamp=1_700_000_000_123)) == (
        pytest.approx(1_700_000_000.123)
    )
    assert broker_time(SimpleNamespace(timestamp_type=0, timestamp=1_700_000_000_123)) is None
    assert broker_time(SimpleNamespace(timestamp_type=1, timestamp=-1)) is None
    assert describe(60.04) == "60.0 s ahead of" and describe(-2.5) == "2.5 s behind"


async def test_a_network_clock_measures_warns_once_and_says_when_it_is_right_again() -> None:
    local = [1000.0]
    network_behind = [60.0]  # this PC minus the network

    async def probe() -> float:
        local[0] += 0.01  # the probe's way there
        served = local[0] - network_behind[0]
        local[0] += 0.01  # and back
        return served

    said: list[str] = []
    clock = NetworkClock(probe, who="test", warn=said.append, clock=lambda: local[0])
    assert clock.offset is None and clock.now() == local[0]  # unknown: this PC's clock
    assert await clock.probe() == pytest.approx(60.0)
    assert clock.round_trip == pytest.approx(0.02)
    assert clock.now() == pytest.approx(local[0] - 60.0)
    assert clock.to_local(940.0) == pytest.approx(1000.0)
    await clock.probe()
    assert len(said) == 1 and "60.0 s ahead of" in said[0] and FIX in said[0]
    network_behind[0] = 0.5
    await clock.probe()  # the clock was set right: a step, and the old samples are history
    assert clock.offset == pytest.approx(0.5)
    assert len(said) == 2 and "agrees with the network's again" in said[1]


async def test_a_probe_the_broker_did_not_stamp_is_an_error() -> None:
    async def unstamped() -> None:
        return None

    with pytest.raises(ValueError, match="LogAppendTime"):
        await NetworkClock(unstamped, who="test").probe()


async def test_central_shows_each_peer_against_the_network_and_warns_once() -> None:
    warnings: list[tuple[str, str, str]] = []

    async def warn(kind: str, peer_id: str, text: str) -> None:
        warnings.append((kind, peer_id, text))

    central_ahead = [0.3]

    async def probe() -> float:
        return 2000.0 - central_ahead[0]  # served right away, at the network's time

    clocks = Clocks(NetworkClock(probe, who="Central", clock=lambda: 2000.0), warn=warn)
    await clocks.network.probe()
    assert clocks.central_offset == pytest.approx(0.3)
    assert clocks.central_time(1000.0) == pytest.approx(1000.3)

    # A monitor 60 s ahead of Central: probe at 100 (Central), it gets it at 160.01 (its clock),
    # answers at 160.5, Central reads the answer at 100.52.
    offset = clocks.from_monitor("CP001", 100.0, 160.01, 160.5, 100.52)
    assert offset == pytest.approx(60.0, abs=0.01)
    # Its engine 2 s behind the monitor.
    clocks.engine_via_monitor("CP001", -2.0, 0.004)
    # A driver 30 s behind the network: its message stamped 1000 by the broker.
    clocks.from_kafka("driver", "user1", 970.0 - 0.01, 1000.0)
    # Kafka timestamps of an engine measured through its monitor do not replace that.
    clocks.from_kafka("engine", "CP001", 5000.0, 1000.0)
    await asyncio.sleep(0)  # the warnings' tasks
    view = clocks.as_api()
    peers = {(p["kind"], p["id"]): p for p in view["peers"]}
    assert peers["monitor", "CP001"]["offset_s"] == pytest.approx(60.3, abs=0.01)
    assert peers["monitor", "CP001"]["via"] == "round trips"
    assert peers["engine", "CP001"]["offset_s"] == pytest.approx(58.3, abs=0.01)
    assert peers["engine", "CP001"]["via"] == "monitor"
    assert peers["driver", "user1"]["offset_s"] == pytest.approx(-30.01, abs=0.01)
    assert all(p["warning"] for p in peers.values())
    assert view["central"] == {"offset_s": 0.3, "round_trip_ms": 0.0, "warning": False}
    assert sorted((k, i) for k, i, _ in warnings) == [
        ("driver", "user1"),
        ("engine", "CP001"),
        ("monitor", "CP001"),
    ]
    clocks.from_monitor("CP001", 100.0, 160.01, 160.5, 100.52)
    await asyncio.sleep(0)
    assert len(warnings) == 3  # once per clock
    assert "60.3 s ahead of the network's" in next(t for k, _, t in warnings if k == "monitor")
    # A time a peer wrote, on Central's clock.
    assert clocks.sent_at("monitor", "CP001", 1060.0) == pytest.approx(1000.0, abs=0.01)
    assert clocks.sent_at("driver", "nobody", 1060.0) == 1060.0
    # An answer to a probe long gone says nothing.
    assert clocks.from_monitor("CP002", 100.0, 100.0, 100.0, 200.0) is None


async def test_the_panel_lists_the_clocks_off_first_and_counts_every_one() -> None:
    """With thousands of CPs the panel gets the clocks furthest off, not every one."""
    clocks = Clocks()
    for n in range(200):  # monitors 0.001 s to 0.2 s off: none to warn about
        clocks.from_monitor(f"CP{n:03d}", 100.0, 100.0 + n / 1000, 100.0 + n / 1000, 100.0)
    clocks.from_monitor("CP900", 100.0, 130.0, 130.0, 100.0)  # 30 s ahead
    clocks.from_kafka("driver", "late", 90.0, 100.0)  # 10 s behind
    clocks.from_kafka("driver", "soon", 99.5, 100.0)  # 0.5 s behind: not off
    await asyncio.sleep(0)

    view = clocks.as_api(limit=4)
    assert [(p["kind"], p["id"]) for p in view["peers"]] == [
        ("monitor", "CP900"),
        ("driver", "late"),
        ("driver", "soon"),
        ("monitor", "CP199"),
    ]
    assert view["peers_measured"] == 203
    assert view["peers_off"] == 2
    # Without a limit (/metrics): every one, by kind and id.
    every = clocks.as_api()["peers"]
    assert len(every) == 203
    assert every[0]["kind"] == "driver" and every[-1]["id"] == "CP900"


def test_each_hop_keeps_at_most_its_newest_times() -> None:
    hops = Hops()
    for n in range(HOP_KEPT + 500):
        hops.add(HOPS[0], n / 1000)  # n ms
    [first] = [row for row in hops.as_api() if row["hop"] == HOPS[0]]
    assert first["n"] == HOP_KEPT
    assert first["last_ms"] == HOP_KEPT + 499
    assert first["p50_ms"] == 500 + HOP_KEPT // 2  # the oldest 500 are gone


async def test_central_warns_about_its_own_clock() -> None:
    warnings: list[str] = []
    warned = asyncio.Event()

    async def warn(kind: str, peer_id: str, text: str) -> None:
        warnings.append(f"{kind} {text}")
        warned.set()

    async def probe() -> float:
        return 1000.0 - 45.0

    clocks = Clocks(NetworkClock(probe, who="Central", clock=lambda: 1000.0), warn=warn)
    task = asyncio.create_task(clocks.run(interval=0.01))
    try:
        await asyncio.wait_for(warned.wait(), 5)
        await asyncio.sleep(0.05)  # more rounds of measuring: still one warning
    finally:
        task.cancel()
    assert warnings == ["central Central's own clock is 45.0 s ahead of the network's"]
    assert clocks.as_api()["central"]["warning"] is True


def test_hops_keep_the_last_minute_and_show_quantiles() -> None:
    hops = Hops()
    for ms in range(1, 101):
        hops.add("engine → Central", ms / 1000)
    rows = {row["hop"]: row for row in hops.as_api()}
    assert list(rows) == list(HOPS)
    row = rows["engine → Central"]
    assert row["n"] == 100 and row["p50_ms"] == 51.0 and row["p95_ms"] == 96.0
    assert row["last_ms"] == 100.0
    assert rows["driver → Central"] == {
        "hop": "driver → Central",
        "n": 0,
        "p50_ms": None,
        "p95_ms": None,
        "last_ms": None,
    }


def test_metrics_show_every_offset_and_hop() -> None:
    view = {
        "threshold_s": SKEW_WARNING_S,
        "central": {"offset_s": 0.002, "round_trip_ms": 1.0, "warning": False},
        "peers": [
            {"kind": "engine", "id": "CP001", "offset_s": 60.0},
            {"kind": "driver", "id": "user1", "offset_s": 3.0},
            {"kind": "monitor", "id": "CP002", "offset_s": None},
        ],
        "hops": [{"hop": "engine → Central", "p50_ms": 4.0, "p95_ms": None}],
    }
    text = render(
        cps_by_state={},
        sessions_by_status={},
        messages={},
        handler_seconds={},
        consumer_lag={},
        monitors_connected=0,
        websocket_clients=0,
        clocks=view,
    )
    assert 'ev_clock_offset_seconds{kind="central",id="central"} 0.002' in text
    assert 'ev_clock_offset_seconds{kind="engine",id="CP001"} 60.0' in text
    assert 'id="user1"' not in text and 'id="CP002"' not in text
    assert 'ev_hop_seconds{hop="engine → Central",quantile="0.5"} 0.004' in text


def test_a_cp_s_clocks_were_last_heard_with_its_monitor_s_last_heartbeat() -> None:
    """Most heartbeats carry no measurement: the panel's "last heard" of a CP's monitor and
    engine is the registry's last heartbeat; a driver's is its last measured message."""

    def last_heard(cp_id: str) -> float | None:
        return time.time() - 2.0 if cp_id == "CP001" else None

    measured_long_ago = time.monotonic() - 100.0
    for kind, peer_id, want in (
        ("monitor", "CP001", 2.0),
        ("engine", "CP001", 2.0),
        ("monitor", "CP002", 100.0),  # not in the registry: when it was measured
        ("driver", "CP001", 100.0),
    ):
        peer = PeerClock(kind, peer_id, "round trips", OffsetEstimate(), seen=measured_long_ago)
        assert peer.age(last_heard) == pytest.approx(want, abs=0.5)
