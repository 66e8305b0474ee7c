"""Central's session rules (EV_Central.session): pure, no database, bus or clock."""

from __future__ import annotations

import pytest

from EV_Central.authorisation import CPOffer, SupplyAsk, decide_supply
from EV_Central.session import EngineReport, Session, SessionStatus, Timers
from shared.bus import Topics
from shared.messages import (
    AuthorizeSupply,
    CPRequestDenied,
    CPTelemetry,
    DenialReason,
    DriverNotice,
    EndReason,
    EndSupply,
    RequestAccepted,
    RequestDenied,
    StartSupply,
    SupplyAuthorized,
    SupplyStarted,
    Ticket,
)

T0 = 1_000_000.0
TIMERS = Timers(
    authorization_ttl=60,
    end_grace=2,
    monitor_grace=6,
    telemetry_timeout=15,
    request_ttl=30,
    cp_answer_timeout=5,
)
OFFER = CPOffer("CP001", 0.35, 22.0, available=True)


def ask(sent_at: float = T0, driver: str = "user1", origin: str = "driver") -> SupplyAsk:
    return SupplyAsk("req-1", sent_at, driver, "CP001", origin)


def asked(balance: int = 10_000, origin: str = "driver") -> Session:
    """A request Central let through: the CP's engine is asked to authorise it."""
    session, _ = decide_supply(
        ask(origin=origin),
        OFFER,
        driver_known=True,
        driver_busy=False,
        balance_cents=balance,
        session_id="s1",
        now=T0,
        timers=TIMERS,
    )
    return session


def authorised(balance: int = 10_000) -> Session:
    session = asked(balance)
    session.engine_answered("CP001", True, "", T0 + 0.1)
    return session


def supplying(balance: int = 10_000) -> Session:
    session = authorised(balance)
    session.plugged("CP001", T0 + 1, T0 + 1)
    return session


def sample(seq: int, kwh: float, kw: float = 7.4) -> CPTelemetry:
    return CPTelemetry(
        cp_id="CP001", session_id="s1", seq=seq, kw=kw, kwh=kwh, amount_eur=round(kwh * 0.35, 2)
    )


def report(kwh: float, reason: EndReason = EndReason.UNPLUGGED) -> EngineReport:
    return EngineReport("CP001", kwh, reason, T0 + 1)


# --- requests ------------------------------------------------------------------------------


def test_a_request_central_lets_through_asks_the_engine_first() -> None:
    session, effects = decide_supply(
        ask(),
        OFFER,
        driver_known=True,
        driver_busy=False,
        balance_cents=350,
        session_id="s1",
        now=T0 + 2,
        timers=TIMERS,
    )
    assert session.status == SessionStatus.ASKED and session.status.active  # CP reserved
    assert session.expires_at == T0 + 62
    assert session.answer_deadline == T0 + 7
    kinds = [(send.topic, type(send.message)) for send in effects.publish]
    # Not "authorised" yet: only the engine can say that.
    assert kinds == [
        (Topics.DRIVER_UPDATES, RequestAccepted),
        (Topics.CP_COMMANDS, AuthorizeSupply),
    ]
    command = effects.publish[1].message
    assert isinstance(command, AuthorizeSupply)
    assert command.max_kwh == 10.0  # 3.50 € at 0.35 €/kWh
    assert effects.save and not effects.release


def test_the_driver_hears_authorised_only_when_the_engine_accepts() -> None:
    session = asked()
    effects = session.engine_answered("CP001", True, "", T0 + 1)
    assert (session.status, session.authorized_at) == (SessionStatus.AUTHORISED, T0 + 1)
    [send] = effects.publish
    assert isinstance(send.message, SupplyAuthorized)
    assert (send.topic, send.message.expires_at) == (Topics.DRIVER_UPDATES, T0 + 60)
    assert effects.save and not effects.release
    assert session.engine_answered("CP001", True, "", T0 + 2).publish == []  # redelivered


def test_an_engine_refusal_is_a_denial_with_its_reason_and_no_ticket() -> None:
    session = asked()
    effects = session.engine_answered("CP001", False, "busy with session abc", T0 + 1)
    assert (session.status, session.reason) == (SessionStatus.DENIED, "cp_refused")
    [send] = effects.publish
    assert isinstance(send.message, RequestDenied)
    assert send.message.reason == DenialReason.CP_REFUSED
    assert send.message.request_id == "req-1"
    assert "busy with session abc" in send.message.detail
    assert effects.release and effects.debit_cents == 0


def test_no_answer_in_time_is_a_denial_and_the_engine_is_told_to_forget_it() -> None:
    session = asked()
    assert not session.answer_due(T0 + 4.9)
    assert session.answer_due(T0 + 5)
    effects = session.no_answer(TIMERS)
    assert (session.status, session.reason) == (SessionStatus.DENIED, "cp_no_answer")
    kinds = [(send.topic, type(send.message)) for send in effects.publish]
    assert kinds == [(Topics.DRIVER_UPDATES, RequestDenied), (Topics.CP_COMMANDS, EndSupply)]
    denied = effects.publish[0].message
    assert isinstance(denied, RequestDenied) and denied.reason == DenialReason.CP_NO_ANSWER
    assert "5 s" in denied.detail
    assert effects.release and not session.answer_due(T0 + 10)
    # Its acceptance arrives after all: the engine is told to stop, the driver hears nothing.
    late = session.engine_answered("CP001", True, "", T0 + 11)
    assert [(s.topic, type(s.message)) for s in late.publish] == [(Topics.CP_COMMANDS, EndSupply)]
    assert session.status == SessionStatus.DENIED


def test_an_engine_ending_an_asked_session_refused_it() -> None:
    session = asked()
    effects = session.engine_ended(report(0.0, EndReason.ENGINE_FAULT), 10_000, T0 + 1)
    assert (session.status, session.reason) == (SessionStatus.DENIED, "cp_refused")
    assert [type(s.message) for s in effects.publish] == [RequestDenied]
    assert effects.release and effects.debit_cents == 0


def test_ending_an_asked_session_denies_it() -> None:
    session = asked()
    effects = session.end(EndReason.STOPPED_BY_ADMIN, T0 + 1, TIMERS)
    assert (session.status, session.reason) == (SessionStatus.DENIED, "cp_unavailable")
    assert [type(s.message) for s in effects.publish] == [RequestDenied, EndSupply]
    assert effects.release and effects.save


def test_a_request_made_at_the_cp_hears_its_denial_at_the_cp() -> None:
    parado = CPOffer("CP001", 0.35, 22.0, available=False, unavailable_detail="CP001 is PARADO")
    _, effects = decide_supply(
        ask(origin="cp"),
        parado,
        driver_known=True,
        driver_busy=False,
        balance_cents=1000,
        session_id="s1",
        now=T0,
        timers=TIMERS,
    )
    kinds = [(send.topic, type(send.message)) for send in effects.publish]
    assert kinds == [(Topics.DRIVER_UPDATES, RequestDenied), (Topics.CP_COMMANDS, CPRequestDenied)]
    at_cp = effects.publish[1].message
    assert isinstance(at_cp, CPRequestDenied)
    assert (at_cp.driver_id, at_cp.reason, at_cp.detail) == (
        "user1",
        DenialReason.CP_UNAVAILABLE,
        "CP001 is PARADO",
    )
    no_answer = asked(origin="cp").no_answer(TIMERS)
    assert CPRequestDenied in [type(s.message) for s in no_answer.publish]


@pytest.mark.parametrize(
    ("known", "busy", "balance", "offer", "sent_at", "reason"),
    [
        (False, False, 1000, OFFER, T0, DenialReason.UNKNOWN_DRIVER),
        (True, True, 1000, OFFER, T0, DenialReason.DRIVER_BUSY),
        (True, False, 0, OFFER, T0, DenialReason.INSUFFICIENT_BALANCE),
        (True, False, 1000, None, T0, DenialReason.UNKNOWN_CP),
        (True, False, 1000, OFFER, T0 - 31, DenialReason.REQUEST_EXPIRED),
    ],
)
def test_a_denied_request_says_why_and_reserves_nothing(
    known: bool,
    busy: bool,
    balance: int,
    offer: CPOffer | None,
    sent_at: float,
    reason: DenialReason,
) -> None:
    session, effects = decide_supply(
        ask(sent_at),
        offer,
        driver_known=known,
        driver_busy=busy,
        balance_cents=balance,
        session_id="s1",
        now=T0,
        timers=TIMERS,
    )
    assert session.status == SessionStatus.DENIED
    assert session.reason == reason.value
    [send] = effects.publish
    assert isinstance(send.message, RequestDenied)
    assert send.message.reason == reason


def test_an_unavailable_cp_denial_carries_the_cps_state() -> None:
    busy = CPOffer("CP001", 0.35, 22.0, available=False, unavailable_detail="CP001 is PARADO")
    _, effects = decide_supply(
        ask(),
        busy,
        driver_known=True,
        driver_busy=False,
        balance_cents=1000,
        session_id="s1",
        now=T0,
        timers=TIMERS,
    )
    message = effects.publish[0].message
    assert isinstance(message, RequestDenied)
    assert (message.reason, message.detail) == (DenialReason.CP_UNAVAILABLE, "CP001 is PARADO")


# --- plug, telemetry -------------------------------------------------------------------------


def test_plugging_in_starts_the_supply_once() -> None:
    session = authorised()
    effects = session.plugged("CP001", T0 + 1, T0 + 1.5)
    assert session.status == SessionStatus.SUPPLYING
    assert session.started_at == T0 + 1
    # The engine gets Central's word to start metering; the driver hears it started.
    [go, started] = effects.publish
    assert isinstance(go.message, StartSupply)
    assert (go.topic, go.key, go.message.session_id) == (Topics.CP_COMMANDS, "CP001", "s1")
    assert isinstance(started.message, SupplyStarted)
    assert started.topic == Topics.DRIVER_UPDATES
    again = session.plugged("CP001", T0 + 2, T0 + 2)
    assert session.started_at == T0 + 1
    assert [type(s.message) for s in again.publish] == [EndSupply]


def test_a_plug_on_another_cp_is_stopped() -> None:
    session = authorised()
    effects = session.plugged("CP002", T0 + 1, T0 + 1)
    assert session.status == SessionStatus.AUTHORISED
    [send] = effects.publish
    assert isinstance(send.message, EndSupply)
    assert (send.topic, send.key, send.message.session_id) == (Topics.CP_COMMANDS, "CP002", "s1")
    assert send.message.reason == EndReason.AUTHORIZATION_EXPIRED


def test_telemetry_takes_newer_samples_and_never_lowers_energy() -> None:
    session = supplying()
    assert session.telemetry(sample(1, 0.5), T0 + 2)
    assert not session.telemetry(sample(1, 0.9), T0 + 3)  # a redelivery
    assert session.telemetry(sample(3, 0.4), T0 + 4)  # newer, but lower energy
    assert not session.telemetry(sample(2, 2.0), T0 + 5)  # older than one taken
    assert (session.kwh, session.last_seq, session.last_telemetry_at) == (0.5, 3, T0 + 4)


def test_the_balance_is_exhausted_when_the_energy_it_pays_for_is_delivered() -> None:
    session = supplying(balance=100)
    session.telemetry(sample(1, 2.8571), T0 + 2)  # what 1.00 € buys at 0.35 €/kWh
    assert session.balance_exhausted(100)
    assert not session.balance_exhausted(101)


def test_a_tiny_balance_buys_its_exact_energy_not_a_rounded_amount() -> None:
    session = authorised(balance=2)
    session.price_eur_kwh = 0.42
    session.plugged("CP001", T0 + 1, T0 + 1)
    session.telemetry(sample(1, 0.0417), T0 + 2)  # already rounds to 0.02 €
    assert not session.balance_exhausted(2)
    session.telemetry(sample(2, 0.0476), T0 + 3)  # 2 cents / 0.42 €/kWh
    assert session.balance_exhausted(2)
    session.engine_ended(report(0.0476, EndReason.BALANCE_EXHAUSTED), 2, T0 + 4)
    assert (session.kwh, session.amount_cents) == (0.0476, 2)


# --- ending and settling -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (EndReason.UNPLUGGED, SessionStatus.COMPLETED),
        (EndReason.DRIVER_STOP, SessionStatus.ABORTED),
        (EndReason.ENGINE_FAULT, SessionStatus.ABORTED),
        (EndReason.AUTHORIZATION_EXPIRED, SessionStatus.EXPIRED),
    ],
)
def test_the_engines_figures_settle_with_a_status_per_reason(
    reason: EndReason, status: SessionStatus
) -> None:
    session = supplying()
    effects = session.engine_ended(report(2.0, reason), 10_000, T0 + 30)
    assert session.status == status
    assert (session.kwh, session.amount_cents, effects.debit_cents) == (2.0, 70, 70)
    [send] = effects.publish
    assert isinstance(send.message, Ticket)
    assert send.message.ticket.revision == 1
    assert effects.release


def test_a_ticket_is_capped_by_the_balance() -> None:
    session = supplying(balance=100)
    effects = session.engine_ended(report(10.0), 100, T0 + 30)
    assert effects.debit_cents <= 100
    assert session.amount_cents == effects.debit_cents == 100
    assert session.kwh == pytest.approx(2.8571)


def test_a_session_never_plugged_in_costs_nothing() -> None:
    session = authorised()
    effects = session.engine_ended(report(3.0, EndReason.AUTHORIZATION_EXPIRED), 10_000, T0 + 70)
    assert (session.status, session.kwh, effects.debit_cents) == (SessionStatus.EXPIRED, 0, 0)


def test_later_figures_correct_the_ticket_and_bill_only_the_difference() -> None:
    session = supplying()
    session.engine_ended(report(2.0), 10_000, T0 + 30)
    effects = session.engine_ended(report(3.0), 10_000 - 70, T0 + 31)
    assert (session.kwh, session.amount_cents, effects.debit_cents) == (3.0, 105, 35)
    assert isinstance(effects.publish[0].message, Ticket)
    assert effects.publish[0].message.ticket.revision == session.ticket_revision == 2
    same = session.engine_ended(report(3.00001), 10_000 - 105, T0 + 32)
    assert same.publish == [] and same.debit_cents == 0


def test_ending_a_supply_tells_the_engine_and_the_driver() -> None:
    session = supplying()
    effects = session.end(EndReason.STOPPED_BY_ADMIN, T0 + 5, TIMERS)
    assert session.status == SessionStatus.ENDING
    assert session.settle_deadline == T0 + 7  # the end grace
    assert [type(s.message) for s in effects.post] == [EndSupply, DriverNotice]
    assert session.end(EndReason.DRIVER_STOP, T0 + 6, TIMERS).save is False  # once


def test_a_lost_monitor_waits_longer_and_leaves_a_supplying_engine_alone() -> None:
    session = supplying()
    effects = session.end(EndReason.MONITOR_LOST, T0 + 5, TIMERS)
    assert session.settle_deadline == T0 + 11  # the monitor grace
    assert [type(s.message) for s in effects.post] == [DriverNotice]


def test_an_authorised_session_ending_settles_at_once_with_no_energy() -> None:
    session = authorised()
    effects = session.end(EndReason.MONITOR_LOST, T0 + 5, TIMERS)
    assert [type(s.message) for s in effects.post] == [EndSupply]
    assert session.settle_due(T0 + 5)


# --- timers ----------------------------------------------------------------------------------


def test_an_authorisation_expires_after_its_ttl() -> None:
    session = authorised()
    assert session.end_due(T0 + 60, TIMERS) is None
    assert session.end_due(T0 + 60.1, TIMERS) == EndReason.AUTHORIZATION_EXPIRED


def test_a_silent_engine_is_lost_after_the_telemetry_timeout() -> None:
    session = supplying()
    session.telemetry(sample(1, 0.5), T0 + 10)
    assert session.end_due(T0 + 25, TIMERS) is None
    assert session.end_due(T0 + 25.1, TIMERS) == EndReason.ENGINE_LOST


def test_an_ending_session_settles_with_its_last_figures_after_the_grace() -> None:
    session = supplying()
    session.telemetry(sample(1, 1.0), T0 + 2)
    session.end(EndReason.DRIVER_STOP, T0 + 3, TIMERS)
    assert not session.settle_due(T0 + 4.9)
    assert session.settle_due(T0 + 5)
    effects = session.settle_now(10_000, T0 + 5)
    assert (session.status, session.reason, effects.debit_cents) == (
        SessionStatus.ABORTED,
        "driver_stop",
        35,
    )
    assert session.settle_now(10_000, T0 + 6).publish == []  # settled once
