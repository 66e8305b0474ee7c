"""The engine's pure state machine: supplies, energy, faults, monitor and Central conditions."""

from __future__ import annotations

from typing import Any

import pytest

from EV_Central.pricing import amount_cents
from EV_CP_E.machine import EngineMachine, EngineState, amount
from shared.messages import (
    AuthorizeSupply,
    CPAuthorisation,
    CPPlugged,
    CPRequest,
    CPRequestDenied,
    CPSupplyEnded,
    CPTelemetry,
    DenialReason,
    EndReason,
    EndSupply,
    Message,
    SetService,
    StartSupply,
)

T0 = 1_700_000_000.0
KW = 7.4
PRICE = 0.35


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_machine(clock: Clock, **kwargs: Any) -> EngineMachine:
    machine = EngineMachine(health_timeout=3.0, now=clock, **kwargs)
    assert machine.set_cp_id("CP001")
    machine.health_check(central_ok=True)
    return machine


def authorise(
    clock: Clock,
    session_id: str = "s1",
    max_kwh: float | None = None,
    expires_in: float = 60.0,
) -> AuthorizeSupply:
    return AuthorizeSupply(
        cp_id="CP001",
        session_id=session_id,
        driver_id="user1",
        price_eur_kwh=PRICE,
        max_kw=KW,
        max_kwh=max_kwh,
        expires_at=clock() + expires_in,
    )


def state_of(machine: EngineMachine) -> EngineState:
    """The state now (a call, so that type checkers do not narrow it across actions)."""
    return machine.state


def only(events: list[Message], kind: type[Message]) -> Message:
    found = [e for e in events if isinstance(e, kind)]
    assert len(found) == 1, events
    return found[0]


def refusal(events: list[Message], session_id: str) -> str:
    """The engine's refusal of an authorisation among `events`: its reason."""
    answer = only(events, CPAuthorisation)
    assert isinstance(answer, CPAuthorisation)
    assert (answer.session_id, answer.accepted) == (session_id, False)
    assert not any(isinstance(e, CPSupplyEnded) for e in events)  # nothing was supplied
    return answer.reason


def start(machine: EngineMachine, session_id: str = "s1") -> None:
    """Central's word that the plugged-in supply may begin."""
    assert machine.start_supply(StartSupply(cp_id="CP001", session_id=session_id)).events == []
    assert state_of(machine) is EngineState.SUPPLYING


def plug_and_start(machine: EngineMachine) -> None:
    plugged = machine.plug()
    assert plugged.refused is None
    assert isinstance(only(plugged.events, CPPlugged), CPPlugged)
    assert state_of(machine) is EngineState.PLUGGED
    start(machine)


def supplying(clock: Clock, **kwargs: Any) -> EngineMachine:
    machine = make_machine(clock, **kwargs)
    out = machine.authorize(authorise(clock))
    [answer] = out.events
    assert isinstance(answer, CPAuthorisation) and answer.accepted
    assert out.refused is None
    assert state_of(machine) is EngineState.AUTHORISED
    plug_and_start(machine)
    return machine


def run_ticks(machine: EngineMachine, clock: Clock, count: int) -> list[Message]:
    events: list[Message] = []
    for _ in range(count):
        clock.advance(1.0)
        machine.health_check(central_ok=machine.central_ok)
        events += machine.tick(1.0).events
    return events


def test_full_supply_accumulates_energy_and_ends_with_the_total(clock: Clock) -> None:
    machine = supplying(clock)
    started = clock()
    events = run_ticks(machine, clock, 10)
    telemetry = [e for e in events if isinstance(e, CPTelemetry)]
    assert [t.seq for t in telemetry] == list(range(1, 11))
    assert telemetry[-1].kwh == pytest.approx(KW * 10 / 3600, abs=1e-6)
    assert telemetry[-1].kw == KW
    assert telemetry[-1].amount_eur == round(telemetry[-1].kwh * PRICE, 2)
    assert "SUPPLYING driver user1" in machine.status_line()

    out = machine.unplug()
    ended = only(out.events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.reason is EndReason.UNPLUGGED
    assert ended.session_id == "s1"
    assert ended.kwh == pytest.approx(KW * 10 / 3600, abs=1e-6)
    assert ended.amount_eur == round(ended.kwh * PRICE, 2)
    assert ended.started_at == started
    assert state_of(machine) is EngineState.IDLE


def test_ko_during_supply_ends_it_with_engine_fault_and_energy_so_far(clock: Clock) -> None:
    machine = supplying(clock)
    run_ticks(machine, clock, 5)
    out = machine.set_ko(True)
    ended = only(out.events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.reason is EndReason.ENGINE_FAULT
    assert ended.kwh == pytest.approx(KW * 5 / 3600, abs=1e-6)
    assert state_of(machine) is EngineState.IDLE
    assert machine.health_ok is False
    # KO refuses new authorisations until `o`.
    refused = machine.authorize(authorise(clock, "s2"))
    assert refused.refused and "KO" in refused.refused
    assert refusal(refused.events, "s2") == "engine KO"
    machine.set_ko(False)
    assert machine.health_ok
    assert machine.authorize(authorise(clock, "s3")).refused is None


def test_monitor_lost_ends_the_supply_and_refuses_new_ones(clock: Clock) -> None:
    machine = supplying(clock)
    run_ticks(machine, clock, 2)
    clock.advance(2.0)
    assert machine.poll().events == []  # 2 s of silence: still within the 3 s timeout
    clock.advance(1.5)
    out = machine.poll()
    ended = only(out.events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.reason is EndReason.MONITOR_LOST
    assert ended.kwh == pytest.approx(KW * 2 / 3600, abs=1e-6)
    assert state_of(machine) is EngineState.IDLE
    assert "monitor lost" in machine.status_line()

    refused = machine.authorize(authorise(clock, "s2"))
    assert refusal(refused.events, "s2") == "monitor lost"
    request = machine.request("user1")
    assert request.events == [] and request.refused == "refused: monitor lost"

    machine.health_check(central_ok=True)  # the monitor is back
    out = machine.request("user1")
    assert isinstance(only(out.events, CPRequest), CPRequest)


def test_central_unreachable_refuses_new_supplies_but_finishes_the_current_one(
    clock: Clock,
) -> None:
    machine = supplying(clock)
    machine.health_check(central_ok=False)
    events = run_ticks(machine, clock, 3)
    assert len([e for e in events if isinstance(e, CPTelemetry)]) == 3
    assert state_of(machine) is EngineState.SUPPLYING
    ended = only(machine.unplug().events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.reason is EndReason.UNPLUGGED
    assert ended.kwh == pytest.approx(KW * 3 / 3600, abs=1e-6)

    refused = machine.authorize(authorise(clock, "s2"))
    assert refused.refused and "Central unreachable" in refused.refused
    assert state_of(machine) is EngineState.IDLE
    assert machine.request("user1").refused == "refused: Central unreachable"


def test_plug_refused_while_central_unreachable_then_allowed(clock: Clock) -> None:
    machine = make_machine(clock)
    machine.authorize(authorise(clock))
    machine.health_check(central_ok=False)
    out = machine.plug()
    assert out.refused == "Central unreachable" and out.events == []
    assert state_of(machine) is EngineState.AUTHORISED
    machine.health_check(central_ok=True)
    assert machine.plug().refused is None
    assert state_of(machine) is EngineState.PLUGGED


def test_max_kwh_caps_the_supply_with_balance_exhausted(clock: Clock) -> None:
    machine = make_machine(clock)
    cap = KW * 2.5 / 3600  # reached during the third tick
    machine.authorize(authorise(clock, max_kwh=cap))
    plug_and_start(machine)
    events = run_ticks(machine, clock, 3)
    ended = only(events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.reason is EndReason.BALANCE_EXHAUSTED
    assert ended.kwh == pytest.approx(cap)
    telemetry = [e for e in events if isinstance(e, CPTelemetry)]
    assert telemetry[-1].kwh == pytest.approx(cap)
    assert state_of(machine) is EngineState.IDLE
    assert run_ticks(machine, clock, 1) == []


def test_expired_authorisation_is_refused(clock: Clock) -> None:
    machine = make_machine(clock)
    out = machine.authorize(authorise(clock, expires_in=-1.0))
    assert refusal(out.events, "s1") == "authorisation already expired"
    assert state_of(machine) is EngineState.IDLE


def test_plug_after_expiry_goes_back_to_idle(clock: Clock) -> None:
    machine = make_machine(clock)
    machine.authorize(authorise(clock, expires_in=5.0))
    clock.advance(6.0)
    machine.health_check(central_ok=True)
    out = machine.plug()
    assert out.refused == "authorisation expired"
    ended = only(out.events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.reason is EndReason.AUTHORIZATION_EXPIRED
    assert state_of(machine) is EngineState.IDLE


def test_end_supply_for_another_session_is_ignored(clock: Clock) -> None:
    machine = supplying(clock)
    run_ticks(machine, clock, 2)
    out = machine.end_supply(
        EndSupply(cp_id="CP001", session_id="other", reason=EndReason.STOPPED_BY_ADMIN)
    )
    assert out.events == [] and state_of(machine) is EngineState.SUPPLYING

    out = machine.end_supply(
        EndSupply(cp_id="CP001", session_id="s1", reason=EndReason.DRIVER_STOP)
    )
    ended = only(out.events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.reason is EndReason.DRIVER_STOP
    assert ended.kwh == pytest.approx(KW * 2 / 3600, abs=1e-6)


def test_end_supply_while_authorised_ends_with_zero_energy(clock: Clock) -> None:
    machine = make_machine(clock)
    machine.authorize(authorise(clock))
    out = machine.end_supply(
        EndSupply(cp_id="CP001", session_id="s1", reason=EndReason.STOPPED_BY_ADMIN)
    )
    ended = only(out.events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert (ended.kwh, ended.reason, ended.started_at) == (0.0, EndReason.STOPPED_BY_ADMIN, None)
    assert state_of(machine) is EngineState.IDLE


def test_duplicate_authorisation_is_ignored_and_another_is_refused_while_busy(
    clock: Clock,
) -> None:
    machine = make_machine(clock)
    command = authorise(clock)
    machine.authorize(command)
    assert machine.authorize(command).events == []
    assert state_of(machine) is EngineState.AUTHORISED
    other = machine.authorize(authorise(clock, "s2"))
    assert refusal(other.events, "s2") == "busy with session s1"
    assert machine.auth is not None and machine.auth.session_id == "s1"


def test_out_of_service_ends_the_supply_and_refuses(clock: Clock) -> None:
    machine = supplying(clock)
    out = machine.set_service(SetService(cp_id="CP001", in_service=False))
    ended = only(out.events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.reason is EndReason.STOPPED_BY_ADMIN
    assert machine.request("user1").refused == "refused: out of service"
    machine.set_service(SetService(cp_id="CP001", in_service=True))
    assert machine.request("user1").refused is None


def test_automatic_plug_and_unplug(clock: Clock) -> None:
    machine = make_machine(clock, auto_plug=2.0, auto_unplug=3.0)
    machine.authorize(authorise(clock))
    clock.advance(1.0)
    assert machine.poll().events == []
    clock.advance(1.0)
    machine.health_check(central_ok=True)
    assert isinstance(only(machine.poll().events, CPPlugged), CPPlugged)
    start(machine)
    run_ticks(machine, clock, 3)
    ended = only(machine.poll().events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.reason is EndReason.UNPLUGGED


def test_request_from_menu_and_shutdown(clock: Clock) -> None:
    machine = make_machine(clock)
    request = only(machine.request("user7").events, CPRequest)
    assert isinstance(request, CPRequest)
    assert (request.cp_id, request.driver_id) == ("CP001", "user7")
    machine.authorize(authorise(clock))
    assert machine.request("user8").refused == "refused: authorised"
    plug_and_start(machine)
    run_ticks(machine, clock, 1)
    ended = only(machine.shutdown().events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.reason is EndReason.UNPLUGGED and ended.kwh > 0


def test_a_different_cp_id_is_refused(clock: Clock) -> None:
    machine = make_machine(clock)
    assert machine.set_cp_id("CP001")
    assert not machine.set_cp_id("CP002")
    assert machine.cp_id == "CP001"


def test_an_accepted_authorisation_is_answered_once(clock: Clock) -> None:
    machine = make_machine(clock)
    command = authorise(clock)
    [answer] = machine.authorize(command).events
    assert isinstance(answer, CPAuthorisation)
    assert (answer.cp_id, answer.session_id, answer.accepted, answer.reason) == (
        "CP001",
        "s1",
        True,
        "",
    )
    assert machine.authorize(command).events == []  # a redelivery: answered already


def test_an_authorisation_out_of_service_is_refused_with_the_reason(clock: Clock) -> None:
    machine = make_machine(clock)
    machine.set_service(SetService(cp_id="CP001", in_service=False))
    out = machine.authorize(authorise(clock))
    assert refusal(out.events, "s1") == "out of service"
    assert out.refused == "authorisation for session s1 refused: out of service"
    assert state_of(machine) is EngineState.IDLE


def test_a_denial_of_a_menu_request_is_shown_with_its_reason() -> None:
    machine = EngineMachine()
    denied = CPRequestDenied(
        cp_id="CP001",
        driver_id="user3",
        request_id="r1",
        reason=DenialReason.INSUFFICIENT_BALANCE,
        detail="",
    )
    out = machine.request_denied(denied)
    assert out.notes == ["Central denied the supply for driver user3: insufficient_balance"]
    assert out.events == []


# --- a simulated clock (--speed) ------------------------------------------------------------


def test_speed_scales_the_energy_of_each_tick_and_the_amount_follows(clock: Clock) -> None:
    machine = supplying(clock, speed=60.0)
    events = run_ticks(machine, clock, 10)
    telemetry = [e for e in events if isinstance(e, CPTelemetry)]
    # Ten real seconds are ten simulated minutes: kW x s x N / 3600 kWh.
    for n, sample in enumerate(telemetry, start=1):
        assert sample.kwh == pytest.approx(KW * n * 60 / 3600, rel=1e-12)
        assert sample.kw == KW  # the power is the power: only time runs faster
        assert sample.amount_eur == round(sample.kwh * PRICE, 2)
    assert telemetry[-1].kwh == pytest.approx(1.2333, abs=1e-4)

    ended = only(machine.unplug().events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.kwh == telemetry[-1].kwh  # the ticket's energy is what was metered
    assert ended.amount_eur == round(ended.kwh * PRICE, 2) == 0.43


def test_speed_keeps_the_energy_cap_exact(clock: Clock) -> None:
    machine = make_machine(clock, speed=60.0)
    cap = KW * 2.5 * 60 / 3600  # reached during the third tick, as at real time
    machine.authorize(authorise(clock, max_kwh=cap))
    plug_and_start(machine)
    events = run_ticks(machine, clock, 3)
    ended = only(events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.reason is EndReason.BALANCE_EXHAUSTED
    assert ended.kwh == cap
    assert [e.kwh for e in events if isinstance(e, CPTelemetry)][-1] == cap


def test_speed_leaves_real_time_timers_alone(clock: Clock) -> None:
    # Auto-unplug is about real seconds: three of them, whatever the time scale.
    machine = make_machine(clock, auto_plug=1.0, auto_unplug=3.0, speed=600.0)
    machine.authorize(authorise(clock))
    clock.advance(1.0)
    machine.poll()
    start(machine)
    run_ticks(machine, clock, 2)
    assert state_of(machine) is EngineState.SUPPLYING
    run_ticks(machine, clock, 1)
    ended = only(machine.poll().events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert ended.kwh == pytest.approx(KW * 3 * 600 / 3600)


def test_the_screen_line_names_a_simulated_clock(clock: Clock) -> None:
    assert "simulated" not in make_machine(clock).status_line()
    fast = supplying(clock, speed=60.0)
    assert fast.status_line().endswith("[×60 simulated time]")
    slow = make_machine(clock, speed=0.5)
    assert slow.status_line() == "[CP001] IDLE (ready)  [×0.5 simulated time]"


@pytest.mark.parametrize(("kwh", "price", "euros"), [(3.3, 0.35, 1.16), (0.0417, 0.42, 0.02)])
def test_the_engine_rounds_amounts_as_central_bills_them(
    kwh: float, price: float, euros: float
) -> None:
    assert amount(kwh, price) == euros
    assert round(amount_cents(kwh, price) / 100, 2) == euros


def test_a_plugged_vehicle_draws_nothing_until_central_starts_the_supply(clock: Clock) -> None:
    machine = make_machine(clock)
    machine.authorize(authorise(clock))
    assert only(machine.plug().events, CPPlugged)
    assert machine.plug().refused == "already plugged in, waiting for Central to start the supply"
    assert run_ticks(machine, clock, 3) == []  # no telemetry, no energy
    assert "waiting for Central" in machine.status_line()
    # A word for another session changes nothing.
    assert machine.start_supply(StartSupply(cp_id="CP001", session_id="s0")).events == []
    assert state_of(machine) is EngineState.PLUGGED
    start(machine)
    [sample] = run_ticks(machine, clock, 1)
    assert isinstance(sample, CPTelemetry)
    assert (sample.seq, sample.kwh) == (1, pytest.approx(KW / 3600))
    # A redelivered word does not restart the supply.
    assert machine.start_supply(StartSupply(cp_id="CP001", session_id="s1")).events == []
    assert machine.supply is not None and machine.supply.seq == 1


def test_a_withdrawn_authorisation_ends_before_any_energy(clock: Clock) -> None:
    # Central gave up waiting for the acceptance and stops the engine: the car had plugged in.
    machine = make_machine(clock, auto_plug=1.0)
    machine.authorize(authorise(clock))
    clock.advance(1.0)
    machine.health_check(central_ok=True)
    assert only(machine.poll().events, CPPlugged)
    run_ticks(machine, clock, 2)
    out = machine.end_supply(
        EndSupply(cp_id="CP001", session_id="s1", reason=EndReason.AUTHORIZATION_EXPIRED)
    )
    ended = only(out.events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert (ended.kwh, ended.started_at) == (0.0, None)
    assert state_of(machine) is EngineState.IDLE


def test_a_supply_central_never_starts_ends_when_the_authorisation_lapses(clock: Clock) -> None:
    machine = make_machine(clock)
    machine.authorize(authorise(clock, expires_in=5.0))
    machine.plug()
    clock.advance(5.0)
    machine.health_check(central_ok=True)
    out = machine.poll()
    ended = only(out.events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert (ended.kwh, ended.reason) == (0.0, EndReason.AUTHORIZATION_EXPIRED)
    assert state_of(machine) is EngineState.IDLE


def test_unplugging_before_central_starts_the_supply_bills_nothing(clock: Clock) -> None:
    machine = make_machine(clock)
    machine.authorize(authorise(clock))
    machine.plug()
    ended = only(machine.unplug().events, CPSupplyEnded)
    assert isinstance(ended, CPSupplyEnded)
    assert (ended.kwh, ended.reason, ended.started_at) == (0.0, EndReason.UNPLUGGED, None)
