"""The site dashboard's pure logic: faults, silence, availability, with a hand-driven clock."""

from __future__ import annotations

import pytest

from EV_CP_M.site import Site
from shared.messages import CPState, CPStateUpdate, HealthSample

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def site(clock: FakeClock) -> Site:
    return Site(clock=clock)


def sample(
    clock: FakeClock,
    cp_id: str = "CP001",
    *,
    engine_ok: bool = True,
    central_ok: bool = True,
    rtt_ms: float | None = 1.5,
    detail: str = "",
    at: float | None = None,
) -> HealthSample:
    return HealthSample(
        cp_id=cp_id,
        engine_ok=engine_ok,
        central_ok=central_ok,
        rtt_ms=rtt_ms if engine_ok else None,
        detail=detail,
        ts=clock.now if at is None else at,
    )


def feed(site: Site, clock: FakeClock, seconds: int, **kwargs: object) -> None:
    """One sample a second for `seconds` seconds (the clock ends one second after the last)."""
    for _ in range(seconds):
        site.on_sample(sample(clock, **kwargs))  # type: ignore[arg-type]
        clock.advance(1)
        site.tick()


# --- faults ---------------------------------------------------------------------------------


def test_an_engine_ko_opens_a_fault_that_recovery_closes_with_its_duration(
    site: Site, clock: FakeClock
) -> None:
    feed(site, clock, 5)
    assert site.timeline() == []
    started = clock.now
    feed(site, clock, 7, engine_ok=False, detail="engine reports KO (IDLE)")

    [fault] = site.timeline()
    assert fault["open"] is True
    assert fault["kind"] == "engine" and fault["label"] == "Engine KO"
    assert fault["detail"] == "engine reports KO (IDLE)"
    assert fault["started_at"] == started
    assert fault["duration_s"] == 7.0  # still open: it grows with the clock
    view = site.cp_view("CP001")
    assert view["engine"] == "KO" and view["fault"]["open"] is True

    recovered = clock.now
    feed(site, clock, 3)
    [fault] = site.timeline()
    assert fault["open"] is False
    assert fault["ended_at"] == recovered
    assert fault["duration_s"] == 7.0
    clock.advance(100)
    assert site.timeline()[0]["duration_s"] == 7.0  # a closed fault keeps its duration
    assert site.cp_view("CP001")["fault"] is None


def test_consecutive_ko_samples_make_one_fault(site: Site, clock: FakeClock) -> None:
    feed(site, clock, 10, engine_ok=False, detail="no health report within 0.8 s")
    assert len(site.timeline()) == 1


def test_silence_counts_as_monitor_lost_from_its_last_sample(site: Site, clock: FakeClock) -> None:
    feed(site, clock, 5)
    last = clock.now - 1
    clock.advance(2)  # 3 s since the last sample: not yet lost
    assert site.tick() is False
    assert site.cp_view("CP001")["monitor"] == "live"
    clock.advance(0.5)
    assert site.tick() is True
    view = site.cp_view("CP001")
    assert view["monitor"] == "lost" and view["engine"] == "UNKNOWN"
    assert view["central_ok"] is None
    [fault] = site.timeline()
    assert fault["kind"] == "monitor" and fault["open"] is True
    assert fault["started_at"] == last
    assert fault["duration_s"] == pytest.approx(3.5)
    assert site.tick() is False  # declared once

    clock.advance(6.5)
    back = clock.now
    site.on_sample(sample(clock))
    [fault] = site.timeline()
    assert fault["open"] is False and fault["ended_at"] == back
    assert fault["duration_s"] == pytest.approx(10.0)
    assert site.cp_view("CP001")["monitor"] == "live"


def test_engine_fault_then_monitor_lost_then_back_ko_chains_the_faults(
    site: Site, clock: FakeClock
) -> None:
    feed(site, clock, 3)
    feed(site, clock, 3, engine_ok=False)
    clock.advance(5)
    site.tick()
    feed(site, clock, 2, engine_ok=False)
    kinds = [(f["kind"], f["open"]) for f in reversed(site.timeline())]
    assert kinds == [("engine", False), ("monitor", False), ("engine", True)]
    faults = list(reversed(site.timeline()))
    assert faults[0]["ended_at"] == faults[1]["started_at"]
    assert faults[1]["ended_at"] == faults[2]["started_at"]


def test_a_gap_in_replayed_history_is_a_monitor_lost_fault(site: Site, clock: FakeClock) -> None:
    """After a restart, history is read without ticks: gaps still count as silence."""
    start = clock.now
    clock.advance(600)
    for t in range(10):
        site.on_sample(sample(clock, at=start + t))
    for t in range(30, 40):
        site.on_sample(sample(clock, at=start + t))
    [fault] = site.timeline()
    assert fault["kind"] == "monitor" and fault["open"] is False
    assert fault["started_at"] == start + 9 and fault["ended_at"] == start + 30


def test_old_or_repeated_samples_change_nothing(site: Site, clock: FakeClock) -> None:
    feed(site, clock, 5)
    old = sample(clock, engine_ok=False, at=clock.now - 3)
    site.on_sample(old)
    site.on_sample(old)
    assert site.timeline() == []
    assert site.cp_view("CP001")["engine"] == "OK"


def test_a_sample_from_the_future_counts_as_now(site: Site, clock: FakeClock) -> None:
    site.on_sample(sample(clock, at=clock.now + 30))
    assert site.cp_view("CP001")["last_check"] == clock.now


# --- availability ---------------------------------------------------------------------------


def test_availability_is_unknown_without_samples(site: Site, clock: FakeClock) -> None:
    site.on_state(_state("CP009", CPState.DESCONECTADO))
    assert site.availability("CP009") is None
    view = site.cp_view("CP009")
    assert view["monitored"] is False and view["monitor"] == "none"
    assert view["availability"] is None and view["strip"] == []


def test_availability_counts_engine_ko_and_central_down_as_unavailable(
    site: Site, clock: FakeClock
) -> None:
    feed(site, clock, 60)
    feed(site, clock, 30, engine_ok=False)
    feed(site, clock, 30, central_ok=False)
    feed(site, clock, 80)
    # 200 s observed: 60 + 80 up (the last sample holds until now).
    assert site.availability("CP001") == pytest.approx(140 / 200)


def test_availability_counts_a_lost_monitor_as_down(site: Site, clock: FakeClock) -> None:
    feed(site, clock, 100)
    clock.advance(99)  # silent for 100 s after the last sample
    site.tick()
    assert site.availability("CP001") == pytest.approx(99 / 199)


def test_availability_covers_only_the_last_hour(site: Site, clock: FakeClock) -> None:
    feed(site, clock, 600, engine_ok=False)  # ten minutes KO, then...
    feed(site, clock, 3600)  # ...an hour OK: the KO left the window
    assert site.availability("CP001") == pytest.approx(1.0)
    assert site.cp_view("CP001")["observed_s"] == pytest.approx(3600)
    clock.advance(1)
    site.tick()
    assert site.timeline() == []  # the fault ended more than an hour ago
    assert len(site.faults) == 0
    assert len(site.cps["CP001"].segments) == 1  # old history is forgotten


def test_availability_with_half_of_the_hour_down(site: Site, clock: FakeClock) -> None:
    feed(site, clock, 1800)
    feed(site, clock, 1800, engine_ok=False)
    assert site.availability("CP001") == pytest.approx(0.5, abs=0.001)
    strip = site.availability_strip("CP001")
    assert len(strip) == 60
    assert strip[:29] == [1.0] * 29 and strip[-29:] == [0.0] * 29


def test_the_strip_shows_minutes_without_data_as_none(site: Site, clock: FakeClock) -> None:
    feed(site, clock, 90)
    strip = site.availability_strip("CP001")
    assert strip[:58] == [None] * 58
    assert strip[-1] == 1.0


# --- views ----------------------------------------------------------------------------------


def _state(cp_id: str, state: CPState, **kwargs: object) -> CPStateUpdate:
    return CPStateUpdate(
        cp_id=cp_id,
        state=state,
        location="Alicante",
        price_eur_kwh=0.35,
        max_kw=22.0,
        **kwargs,
    )


def test_view_shows_each_cps_time_scale(site: Site, clock: FakeClock) -> None:
    # CP001's monitor reports its engine's speed; CP002 has no monitor here, Central relays it.
    site.on_state(_state("CP001", CPState.ACTIVADO))
    site.on_sample(sample(clock).model_copy(update={"speed": 60.0}))
    site.on_state(_state("CP002", CPState.ACTIVADO, speed=30.0))
    site.on_state(_state("CP003", CPState.DESCONECTADO))
    speeds = {cp["id"]: cp["speed"] for cp in site.view()["cps"]}
    assert speeds == {"CP001": 60.0, "CP002": 30.0, "CP003": 1.0}


def test_view_shows_a_reserved_cp(site: Site, clock: FakeClock) -> None:
    site.on_state(_state("CP001", CPState.ACTIVADO, reserved=True))
    site.on_state(_state("CP002", CPState.ACTIVADO))
    reserved = {cp["id"]: cp["reserved"] for cp in site.view()["cps"]}
    assert reserved == {"CP001": True, "CP002": False}


def test_view_joins_central_state_and_monitor_health(site: Site, clock: FakeClock) -> None:
    site.on_state(_state("CP001", CPState.ACTIVADO))
    site.on_state(_state("CP001", CPState.SUMINISTRANDO, driver_id="user1", kw=22.0, kwh=0.5))
    site.on_state(_state("CP002", CPState.DESCONECTADO))
    feed(site, clock, 3, rtt_ms=2.25)
    view = site.view()
    assert [cp["id"] for cp in view["cps"]] == ["CP001", "CP002"]
    cp1 = view["cps"][0]
    assert cp1["state"] == "SUMINISTRANDO" and cp1["colour"] == "green"
    assert cp1["driver_id"] == "user1" and cp1["kwh"] == 0.5
    assert cp1["engine"] == "OK" and cp1["central_ok"] is True and cp1["rtt_ms"] == 2.25
    assert cp1["monitor"] == "live" and cp1["availability"] == 1.0
    assert view["summary"] == {
        "monitored": 1,
        "engine_ok": 1,
        "engine_ko": 0,
        "monitor_lost": 0,
        "open_faults": 0,
        "known": 2,
    }
    assert view["states"]["AVERIADO"] == "red"
    assert site.rtt_history()["CP001"][-1][1] == 2.25


# --- clocks ---------------------------------------------------------------------------------


def skewed(
    clock: FakeClock, cp_id: str, monitor: float | None, engine: float | None
) -> HealthSample:
    """A sample stamped on a monitor clock `monitor` s off the network's, engine `engine` s."""
    return HealthSample(
        cp_id=cp_id,
        engine_ok=True,
        central_ok=True,
        ts=clock.now + (monitor or 0.0),
        monitor_offset_s=monitor,
        engine_offset_s=engine,
    )


def test_view_shows_each_cps_clock_offsets_and_warns_from_two_seconds(
    site: Site, clock: FakeClock
) -> None:
    site.on_sample(skewed(clock, "CP001", 0.012, 60.0))
    site.on_sample(skewed(clock, "CP002", -1.9, 0.3))
    site.on_sample(skewed(clock, "CP003", -2.0, None))
    site.on_sample(sample(clock, "CP004"))  # a monitor that does not measure clocks
    clocks = {
        cp["id"]: (cp["monitor_offset_s"], cp["engine_offset_s"], cp["clock_warning"])
        for cp in site.view()["cps"]
    }
    assert clocks == {
        "CP001": (0.012, 60.0, True),
        "CP002": (-1.9, 0.3, False),
        "CP003": (-2.0, None, True),
        "CP004": (None, None, False),
    }
    assert site.view()["clock_warning_s"] == 2.0


def test_a_monitor_whose_clock_is_behind_is_not_taken_for_silent(
    site: Site, clock: FakeClock
) -> None:
    # Stamped a minute in the past, on time by the network's clock: the offset corrects it.
    for _ in range(5):
        site.on_sample(skewed(clock, "CP001", -60.0, None))
        clock.advance(1)
        site.tick()
    view = site.cp_view("CP001")
    assert view["monitor"] == "live" and site.timeline() == []
    assert view["last_check"] == clock.now - 1
    assert view["availability"] == 1.0


def test_timeline_is_newest_first_across_cps(site: Site, clock: FakeClock) -> None:
    site.on_sample(sample(clock, "CP001", engine_ok=False))
    clock.advance(1)
    site.on_sample(sample(clock, "CP002", engine_ok=False))
    assert [f["cp_id"] for f in site.timeline()] == ["CP002", "CP001"]
