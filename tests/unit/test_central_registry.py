"""Central's in-memory view of the charging points (EV_Central.registry): pure, no I/O."""

from __future__ import annotations

import itertools

import pytest

from EV_Central.pricing import amount_cents
from EV_Central.registry import ChargingPoint, Registry
from EV_Central.session import Session as LiveSession
from EV_Central.session import SessionStatus as SessionPhase
from shared.messages import CPState, CPStateUpdate, CPSummary

PHASES = [
    None,
    SessionPhase.ASKED,
    SessionPhase.AUTHORISED,
    SessionPhase.SUPPLYING,
    SessionPhase.ENDING,
]
SESSION_KEYS = {"session_id", "session_phase", "driver_id", "kw", "kwh", "amount_eur"}


def live(
    phase: SessionPhase = SessionPhase.SUPPLYING,
    *,
    session_id: str = "s1",
    price_eur_kwh: float = 0.35,
    kw: float = 0.0,
    kwh: float = 0.0,
) -> LiveSession:
    return LiveSession(
        session_id=session_id,
        cp_id="CP001",
        driver_id="user1",
        status=phase,
        price_eur_kwh=price_eur_kwh,
        kw=kw,
        kwh=kwh,
    )


def make_cp(
    cp_id: str = "CP001",
    *,
    connected: bool = True,
    engine_ok: bool = True,
    in_service: bool = True,
    phase: str | None = None,
    last_heartbeat: float = 0.0,
) -> ChargingPoint:
    return ChargingPoint(
        id=cp_id,
        location="Alicante - Campus",
        price_eur_kwh=0.35,
        max_kw=22.0,
        connected=connected,
        engine_ok=engine_ok,
        in_service=in_service,
        last_heartbeat=last_heartbeat,
        session=None if phase is None else live(phase, session_id=f"s-{cp_id}"),
    )


# --- the health table -------------------------------------------------------------------


ANY = None  # a column the row does not look at
NOT_SUPPLYING = (None, SessionPhase.ASKED, SessionPhase.AUTHORISED, SessionPhase.ENDING)

# The brief's table as data: (connected, engine OK, session phase, in service) -> state. Each
# combination of the four must match exactly one row (checked below), so the rows need no order.
Row = tuple[bool | None, bool | None, tuple[str | None, ...] | None, bool | None, CPState]
HEALTH_TABLE: list[Row] = [
    (False, ANY, ANY, ANY, CPState.DESCONECTADO),
    (True, False, ANY, ANY, CPState.AVERIADO),
    (True, True, (SessionPhase.SUPPLYING,), ANY, CPState.SUMINISTRANDO),
    (True, True, NOT_SUPPLYING, False, CPState.PARADO),
    (True, True, NOT_SUPPLYING, True, CPState.ACTIVADO),
]


def table_rows(
    connected: bool, engine_ok: bool, in_service: bool, phase: str | None
) -> list[CPState]:
    """The states of the table's rows that match this combination."""
    return [
        state
        for row_connected, row_engine, row_phases, row_service, state in HEALTH_TABLE
        if row_connected in (ANY, connected)
        and row_engine in (ANY, engine_ok)
        and (row_phases is ANY or phase in row_phases)
        and row_service in (ANY, in_service)
    ]


ALL_COMBINATIONS = list(itertools.product([True, False], [True, False], [True, False], PHASES))


@pytest.mark.parametrize(("connected", "engine_ok", "in_service", "phase"), ALL_COMBINATIONS)
def test_every_row_of_the_health_table(
    connected: bool, engine_ok: bool, in_service: bool, phase: str | None
) -> None:
    [state] = table_rows(connected, engine_ok, in_service, phase)  # exactly one row
    cp = make_cp(connected=connected, engine_ok=engine_ok, in_service=in_service, phase=phase)
    assert cp.state == state


@pytest.mark.parametrize(
    ("engine_ok", "in_service", "phase"),
    list(itertools.product([True, False], [True, False], PHASES)),
)
def test_not_connected_is_desconectado_whatever_else(
    engine_ok: bool, in_service: bool, phase: str | None
) -> None:
    cp = make_cp(connected=False, engine_ok=engine_ok, in_service=in_service, phase=phase)
    assert cp.state == CPState.DESCONECTADO
    assert not cp.available


@pytest.mark.parametrize(("in_service", "phase"), list(itertools.product([True, False], PHASES)))
def test_engine_ko_is_averiado_even_while_supplying_or_stopped(
    in_service: bool, phase: str | None
) -> None:
    cp = make_cp(engine_ok=False, in_service=in_service, phase=phase)
    assert cp.state == CPState.AVERIADO
    assert not cp.available


@pytest.mark.parametrize("in_service", [True, False])
def test_supplying_is_suministrando_even_when_taken_out_of_service(in_service: bool) -> None:
    cp = make_cp(in_service=in_service, phase=SessionPhase.SUPPLYING)
    assert cp.state == CPState.SUMINISTRANDO
    assert not cp.available


@pytest.mark.parametrize("phase", [None, SessionPhase.AUTHORISED, SessionPhase.ENDING])
def test_out_of_service_is_parado(phase: str | None) -> None:
    cp = make_cp(in_service=False, phase=phase)
    assert cp.state == CPState.PARADO
    assert not cp.available


def test_healthy_idle_cp_is_activado_and_available() -> None:
    cp = make_cp()
    assert cp.state == CPState.ACTIVADO
    assert cp.available


@pytest.mark.parametrize("phase", [SessionPhase.ASKED, SessionPhase.AUTHORISED])
def test_a_cp_held_for_a_driver_is_reserved_and_says_so_without_naming_them(phase: str) -> None:
    cp = make_cp(phase=phase)
    assert cp.state == CPState.ACTIVADO
    assert not cp.available and cp.reserved
    assert cp.unavailable_detail() == "CP001 is reserved for another driver"
    assert cp.as_api()["reserved"] is True
    assert cp.state_message().reserved is True
    assert "user1" not in cp.state_message().model_dump_json()


def test_a_cp_finishing_a_supply_is_not_reserved_nor_available() -> None:
    cp = make_cp(phase=SessionPhase.ENDING)
    assert cp.state == CPState.ACTIVADO
    assert not cp.available and not cp.reserved
    assert cp.unavailable_detail() == "CP001 is finishing another supply"


def test_an_unavailable_cp_says_its_state() -> None:
    stopped = make_cp(in_service=False)
    assert stopped.unavailable_detail() == "CP001 is PARADO (stopped by an admin)"
    assert make_cp(phase=SessionPhase.SUPPLYING).unavailable_detail() == "CP001 is SUMINISTRANDO"


def test_state_follows_the_cp_as_it_changes() -> None:
    cp = make_cp(connected=False)
    seen = [(cp.state, cp.available)]
    cp.connected = True
    seen.append((cp.state, cp.available))
    cp.session = live(SessionPhase.AUTHORISED)
    seen.append((cp.state, cp.available))
    cp.session.status = SessionPhase.SUPPLYING
    seen.append((cp.state, cp.available))
    cp.engine_ok = False
    seen.append((cp.state, cp.available))
    cp.engine_ok = True
    cp.session = None
    cp.in_service = False
    seen.append((cp.state, cp.available))
    cp.in_service = True
    seen.append((cp.state, cp.available))
    assert seen == [
        (CPState.DESCONECTADO, False),
        (CPState.ACTIVADO, True),
        (CPState.ACTIVADO, False),
        (CPState.SUMINISTRANDO, False),
        (CPState.AVERIADO, False),
        (CPState.PARADO, False),
        (CPState.ACTIVADO, True),
    ]


# --- the registry -----------------------------------------------------------------------


def make_registry() -> Registry:
    reg = Registry()
    reg.add(make_cp("CP003", last_heartbeat=95.0))
    reg.add(make_cp("CP001", last_heartbeat=80.0, phase=SessionPhase.SUPPLYING))
    reg.add(make_cp("CP002", connected=False, last_heartbeat=0.0))
    reg.add(make_cp("CP004", last_heartbeat=90.0))
    return reg


def test_stale_lists_connected_cps_past_the_timeout() -> None:
    reg = make_registry()
    # At t=100 with a 10 s timeout: CP001 (20 s) is stale, CP004 (exactly 10 s) and CP003
    # (5 s) are not, and CP002 (never heard from) is not connected so it cannot go stale.
    assert {cp.id for cp in reg.stale(now=100.0, timeout=10.0)} == {"CP001"}


def test_stale_honours_the_timeout_given() -> None:
    reg = make_registry()
    assert {cp.id for cp in reg.stale(now=100.0, timeout=4.0)} == {"CP001", "CP003", "CP004"}
    assert reg.stale(now=100.0, timeout=30.0) == []
    assert {cp.id for cp in reg.stale(now=100.1, timeout=10.0)} == {"CP001", "CP004"}


def test_a_heartbeat_makes_a_cp_fresh_again() -> None:
    reg = make_registry()
    cp = reg.get("CP001")
    assert cp is not None
    cp.last_heartbeat = 99.0
    assert reg.stale(now=100.0, timeout=10.0) == []


def test_get_and_sorted() -> None:
    reg = make_registry()
    assert reg.get("CP002") is not None
    assert reg.get("CP999") is None
    assert [cp.id for cp in reg.sorted()] == ["CP001", "CP002", "CP003", "CP004"]


def test_by_session_finds_the_cp_of_a_session() -> None:
    reg = make_registry()
    cp = reg.by_session("s-CP001")
    assert cp is not None and cp.id == "CP001"
    assert reg.by_session("s-CP003") is None
    assert reg.by_session("nope") is None


def test_session_of_driver_finds_the_cp_a_driver_uses() -> None:
    reg = make_registry()
    cp = reg.session_of_driver("user1")
    assert cp is not None and cp.id == "CP001"
    assert reg.session_of_driver("user2") is None
    cp.session = None
    assert reg.session_of_driver("user1") is None
    assert reg.by_session("s-CP001") is None


# --- what Central shows -----------------------------------------------------------------


def test_as_api_without_a_session_has_no_supply_figures() -> None:
    entry = make_cp(in_service=False).as_api()
    assert entry == {
        "id": "CP001",
        "location": "Alicante - Campus",
        "price_eur_kwh": 0.35,
        "max_kw": 22.0,
        "state": "PARADO",
        "connected": True,
        "engine_ok": True,
        "in_service": False,
        "weather_hold": "",
        "stop_reason": "stopped by an admin",
        "reserved": False,
        "speed": 1.0,
    }
    assert not SESSION_KEYS & entry.keys()


def test_as_api_shows_driver_power_energy_and_amount_while_supplying() -> None:
    cp = make_cp()
    cp.session = live(SessionPhase.SUPPLYING, kw=7.4, kwh=12.345678)
    entry = cp.as_api()
    assert entry["state"] == "SUMINISTRANDO"
    assert entry["session_id"] == "s1"
    assert entry["session_phase"] == "SUPPLYING"
    assert entry["driver_id"] == "user1"
    assert entry["kw"] == 7.4
    assert entry["kwh"] == 12.3457
    assert entry["amount_eur"] == 4.32  # 12.345678 kWh x 0.35 = 4.3209...


def test_as_api_drops_the_supply_figures_when_the_session_ends() -> None:
    cp = make_cp()
    cp.session = live(SessionPhase.AUTHORISED)
    assert SESSION_KEYS <= cp.as_api().keys()
    cp.session = None
    assert not SESSION_KEYS & cp.as_api().keys()


def test_state_message_while_supplying() -> None:
    cp = make_cp()
    cp.session = live(SessionPhase.SUPPLYING, kw=11.0, kwh=2.00004)
    msg = cp.state_message()
    assert isinstance(msg, CPStateUpdate)
    assert msg.type == "cp_state"
    assert (msg.cp_id, msg.state, msg.location) == ("CP001", CPState.SUMINISTRANDO, cp.location)
    assert (msg.price_eur_kwh, msg.max_kw) == (0.35, 22.0)
    # The state topic is public: who charges and what they pay stay out of it.
    assert (msg.driver_id, msg.session_id, msg.amount_eur) == (None, None, 0.0)
    assert (msg.kw, msg.kwh) == (11.0, 2.0)


def test_a_cp_on_a_simulated_clock_says_so_in_the_api_and_on_the_state_topic() -> None:
    cp = make_cp()
    assert (cp.as_api()["speed"], cp.state_message().speed) == (1.0, 1.0)
    cp.speed = 60.0  # its monitor's heartbeats relay the engine's --speed
    assert cp.as_api()["speed"] == 60.0
    assert cp.state_message().speed == 60.0


def test_state_message_without_a_session_is_zeroed() -> None:
    msg = make_cp(engine_ok=False).state_message()
    assert msg.state == CPState.AVERIADO
    assert (msg.driver_id, msg.session_id) == (None, None)
    assert (msg.kw, msg.kwh, msg.amount_eur) == (0.0, 0.0, 0.0)


def test_summary() -> None:
    summary = make_cp(connected=False).summary()
    assert summary == CPSummary(
        cp_id="CP001",
        location="Alicante - Campus",
        price_eur_kwh=0.35,
        state=CPState.DESCONECTADO,
    )


def test_live_amount_is_kwh_times_price() -> None:
    assert live(kwh=10.0).amount_eur == 3.5
    assert live(kwh=0.0).amount_eur == 0.0
    assert live(kwh=7.4, price_eur_kwh=0.36).amount_eur == 2.66  # 2.664


def test_live_amount_matches_the_billed_amount() -> None:
    session = live(kwh=0.25, price_eur_kwh=0.5)
    assert session.amount_eur == amount_cents(0.25, 0.5) / 100
