"""Properties of Central's session rules (EV_Central.session), whatever the inputs' order.

A driver's two sessions (the second requested while the first may still be open) get random
sequences of engine events (its answer to the authorisation among them), ends, timer ticks and
repetitions of all of them, applied as EV_Central/supplies.py applies them. Whatever the
sequence: each session is settled once (one ticket of revision 1; corrections only revise it),
every ticket's amount is its kWh x price and within what the driver could pay, the balance never
goes negative, live energy never goes down, and once the timers have fired every session is
settled or denied (a denial has no ticket).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from EV_Central.authorisation import CPOffer, SupplyAsk, decide_supply
from EV_Central.pricing import amount_cents
from EV_Central.session import Effects, EngineReport, Session, SessionStatus, Timers
from shared.messages import CPTelemetry, EndReason, Ticket, TicketData

T0 = 1_000_000.0
TIMERS = Timers()
CPS = ("CP001", "CP002")
REASONS = st.sampled_from(list(EndReason))


@dataclass
class Driver:
    """What the database would hold: the balance, and every session with its tickets."""

    balance: int
    sessions: list[Session] = field(default_factory=list)
    tickets: dict[str, list[TicketData]] = field(default_factory=dict)
    debited: dict[str, int] = field(default_factory=dict)
    live: dict[str, Session] = field(default_factory=dict)  # cp_id -> its live session

    def apply(self, session: Session, effects: Effects) -> None:
        self.balance -= effects.debit_cents
        self.debited[session.session_id] = (
            self.debited.get(session.session_id, 0) + effects.debit_cents
        )
        for send in effects.publish:
            if isinstance(send.message, Ticket):
                self.tickets.setdefault(session.session_id, []).append(send.message.ticket)
        if effects.release and self.live.get(session.cp_id) is session:
            del self.live[session.cp_id]


actions = st.one_of(
    st.tuples(st.just("request"), st.integers(0, 1)),
    st.tuples(st.just("answer"), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("plug"), st.integers(0, 1), st.sampled_from(CPS)),
    st.tuples(st.just("telemetry"), st.integers(0, 1), st.integers(0, 30), st.floats(0, 80)),
    st.tuples(st.just("ended"), st.integers(0, 1), st.floats(0, 80), REASONS),
    st.tuples(st.just("end"), st.integers(0, 1), REASONS),
    st.tuples(st.just("tick"), st.floats(0, 40)),
)


def run(driver: Driver, script: list[tuple], price: float) -> float:
    now = T0
    for action in script:
        now += 0.5
        kind = action[0]
        if kind == "tick":
            now += action[1]
            tick(driver, now)
            continue
        index = action[1]
        if kind == "request":
            request(driver, index, now, price)
            continue
        if index >= len(driver.sessions):
            continue
        session = driver.sessions[index]
        before = session.kwh
        if kind == "answer":
            driver.apply(session, session.engine_answered(session.cp_id, action[2], "", now))
        elif kind == "plug":
            driver.apply(session, session.plugged(action[2], now - 0.2, now))
        elif kind == "telemetry":
            sample = CPTelemetry(
                cp_id=session.cp_id,
                session_id=session.session_id,
                seq=action[2],
                kw=7.4,
                kwh=action[3],
                amount_eur=0.0,
            )
            if driver.live.get(session.cp_id) is session and session.telemetry(sample, now):
                assert session.kwh >= before  # live energy never goes down
                if session.balance_exhausted(driver.balance):
                    driver.apply(session, session.end(EndReason.BALANCE_EXHAUSTED, now, TIMERS))
        elif kind == "ended":
            report = EngineReport(session.cp_id, action[2], action[3], now - 5)
            driver.apply(session, session.engine_ended(report, driver.balance, now))
        elif kind == "end" and driver.live.get(session.cp_id) is session:
            driver.apply(session, session.end(action[2], now, TIMERS))
        assert driver.balance >= 0
    return now


def request(driver: Driver, index: int, now: float, price: float) -> None:
    if index != len(driver.sessions):
        return  # sessions are requested in order; a repeated request is a redelivery
    cp_id = CPS[index]
    offer = CPOffer(cp_id, price, 22.0, available=cp_id not in driver.live)
    session, effects = decide_supply(
        SupplyAsk(f"r{index}", now, "user1", cp_id, "driver"),
        offer,
        driver_known=True,
        driver_busy=any(s.status.active for s in driver.sessions),
        balance_cents=driver.balance,
        session_id=f"s{index}",
        now=now,
        timers=TIMERS,
    )
    driver.sessions.append(session)
    if session.status.active:
        driver.live[cp_id] = session
    driver.apply(session, effects)


def tick(driver: Driver, now: float) -> None:
    """Central's timers, as EV_Central/supplies.py runs them."""
    for session in list(driver.live.values()):
        if session.answer_due(now):
            driver.apply(session, session.no_answer(TIMERS))
        elif session.settle_due(now):
            driver.apply(session, session.settle_now(driver.balance, now))
        elif (reason := session.end_due(now, TIMERS)) is not None:
            driver.apply(session, session.end(reason, now, TIMERS))


@settings(max_examples=400, deadline=None)
@given(
    balance=st.integers(0, 3000),
    price=st.sampled_from([0.0, 0.30, 0.35, 0.45]),
    script=st.lists(actions, max_size=40),
    repeats=st.lists(st.integers(0, 39), max_size=10),
)
def test_every_session_is_settled_once_and_billed_right(
    balance: int, price: float, script: list[tuple], repeats: list[int]
) -> None:
    # Kafka delivers at least once: any input may come again, later.
    script = script + [script[i] for i in repeats if i < len(script)]
    driver = Driver(balance)
    now = run(driver, script, price)
    for _ in range(3):  # the timers fire: authorisations expire, silent engines are lost
        now += 1000
        tick(driver, now)
    assert driver.balance >= 0
    assert driver.balance == balance - sum(driver.debited.values())
    for session in driver.sessions:
        tickets = driver.tickets.get(session.session_id, [])
        if session.status == SessionStatus.DENIED:
            assert tickets == [] and driver.debited.get(session.session_id, 0) == 0
            continue
        assert session.status.settled, session
        assert [t.revision for t in tickets] == list(range(1, len(tickets) + 1))
        assert [t.kwh for t in tickets] == sorted(t.kwh for t in tickets)
        last = tickets[-1]
        assert round(last.amount_eur * 100) == amount_cents(last.kwh, price)
        assert round(last.amount_eur * 100) == session.amount_cents
        assert driver.debited[session.session_id] == session.amount_cents
