"""The driver's request and session tracking (EV_Driver.flow): pure, no broker."""

from __future__ import annotations

import pytest

from EV_Driver.flow import (
    MAX_EARLY_UPDATES,
    Accepted,
    Authorized,
    Available,
    Denied,
    DriverFlow,
    Failure,
    Following,
    Notice,
    Outcome,
    Phase,
    Started,
    Telemetry,
    TicketKind,
    TicketShown,
    phase_of,
    update_driver_id,
)
from shared import messages as m

D = "D1"
NOW = 1_700_000_000.0


def cp(cp_id: str, state: m.CPState = m.CPState.ACTIVADO) -> m.CPSummary:
    return m.CPSummary(cp_id=cp_id, location=f"at {cp_id}", price_eur_kwh=0.35, state=state)


def ticket_data(
    session_id: str, cp_id: str = "CP001", revision: int = 1, **kw: object
) -> m.TicketData:
    fields: dict[str, object] = {
        "session_id": session_id,
        "cp_id": cp_id,
        "driver_id": D,
        "kwh": 0.0411,
        "price_eur_kwh": 0.35,
        "amount_eur": 0.01,
        "reason": m.EndReason.UNPLUGGED,
        "started_at": NOW - 60,
        "ended_at": NOW,
        "revision": revision,
    }
    fields.update(kw)
    return m.TicketData.model_validate(fields)


def ticket(session_id: str, cp_id: str = "CP001", revision: int = 1) -> m.Ticket:
    return m.Ticket(ticket=ticket_data(session_id, cp_id, revision))


def ready_flow(**status: object) -> DriverFlow:
    """A flow whose status query was answered (known driver, nothing pending)."""
    flow = DriverFlow(D)
    query = flow.status_query()
    flow.handle(m.DriverStatus(driver_id=D, request_id=query.id, known=True, **status))
    return flow


def accepted(flow: DriverFlow, session_id: str = "s1") -> m.RequestAccepted:
    assert flow.current is not None and flow.current.request_id is not None
    return m.RequestAccepted(
        driver_id=D,
        cp_id=flow.current.cp_id,
        request_id=flow.current.request_id,
        session_id=session_id,
    )


def authorized(session_id: str = "s1", cp_id: str = "CP001") -> m.SupplyAuthorized:
    return m.SupplyAuthorized(
        driver_id=D, cp_id=cp_id, session_id=session_id, price_eur_kwh=0.35, expires_at=NOW + 60
    )


def progress(session_id: str = "s1", kwh: float = 0.0123) -> m.SupplyProgress:
    return m.SupplyProgress(
        driver_id=D, cp_id="CP001", session_id=session_id, kw=7.4, kwh=kwh, amount_eur=0.0
    )


# --- status at start-up ---------------------------------------------------------------------


def test_unknown_driver() -> None:
    flow = DriverFlow(D)
    query = flow.status_query()
    reaction = flow.handle(m.DriverStatus(driver_id=D, request_id=query.id, known=False))
    assert flow.unknown_driver
    assert reaction.events == [Failure(D, "unknown driver ID D1")]
    assert not flow.busy


def test_status_reply_must_answer_one_of_our_queries() -> None:
    flow = DriverFlow(D)
    first = flow.status_query()
    second = flow.status_query()
    stray = m.DriverStatus(driver_id=D, request_id="someone-else", known=True)
    assert flow.handle(stray).events == []
    assert flow.status is None
    # Central was away; it answers the first query once it is back: good enough.
    reaction = flow.handle(m.DriverStatus(driver_id=D, request_id=first.id, known=True))
    assert reaction.relevant and flow.status is not None
    # The answer to the second query changes nothing.
    assert flow.handle(m.DriverStatus(driver_id=D, request_id=second.id, known=True)).events == []


def test_status_lists_available_cps_and_shows_unseen_tickets() -> None:
    flow = DriverFlow(D)
    query = flow.status_query()
    away = [ticket_data("old1"), ticket_data("old2", "CP002")]
    reaction = flow.handle(
        m.DriverStatus(
            driver_id=D,
            request_id=query.id,
            known=True,
            unseen_tickets=away,
            available_cps=[cp("CP001"), cp("CP002", m.CPState.PARADO), cp("CP003")],
        )
    )
    assert reaction.events[0] == Available(D, (cp("CP001"), cp("CP003")))
    assert reaction.events[1:] == [
        TicketShown(away[0], TicketKind.AWAY),
        TicketShown(away[1], TicketKind.AWAY),
    ]
    assert [(a.driver_id, a.session_id) for a in reaction.acks] == [(D, "old1"), (D, "old2")]
    assert not flow.busy


def test_active_session_is_followed_to_its_ticket() -> None:
    session = m.SessionInfo(session_id="s9", cp_id="CP004", status="SUPPLYING", kw=7.4, kwh=1.0)
    flow = ready_flow(active_session=session)
    assert flow.busy and not flow.awaiting_answer
    assert flow.current is not None and flow.current.phase is Phase.SUPPLYING
    with pytest.raises(RuntimeError):
        flow.request("CP001")
    reaction = flow.handle(progress("s9", kwh=1.1))
    assert isinstance(reaction.events[0], Telemetry) and reaction.relevant
    reaction = flow.handle(ticket("s9", "CP004"))
    assert [type(e) for e in reaction.events] == [TicketShown]
    assert [a.session_id for a in reaction.acks] == ["s9"]
    assert not flow.busy
    assert flow.outcomes == []  # not one of this run's requests


def test_active_session_event_is_reported() -> None:
    flow = DriverFlow(D)
    query = flow.status_query()
    session = m.SessionInfo(session_id="s9", cp_id="CP004", status="AUTHORISED")
    reaction = flow.handle(
        m.DriverStatus(driver_id=D, request_id=query.id, known=True, active_session=session)
    )
    assert reaction.events[-1] == Following(D, session)


def test_active_session_whose_ticket_is_already_shown_is_not_followed() -> None:
    flow = DriverFlow(D)
    query = flow.status_query()
    flow.handle(ticket("s9"))  # arrived just before the status answer
    session = m.SessionInfo(session_id="s9", cp_id="CP001", status="SUPPLYING")
    flow.handle(
        m.DriverStatus(driver_id=D, request_id=query.id, known=True, active_session=session)
    )
    assert not flow.busy


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ("SUPPLYING", Phase.SUPPLYING),
        ("supplying", Phase.SUPPLYING),
        ("AUTHORISED", Phase.AUTHORIZED),
        ("AUTHORIZED", Phase.AUTHORIZED),
        ("REQUESTED", Phase.ACCEPTED),
        ("", Phase.ACCEPTED),
    ],
)
def test_phase_of_central_status(status: str, phase: Phase) -> None:
    assert phase_of(m.SessionInfo(session_id="s", cp_id="c", status=status)) is phase


# --- one request ------------------------------------------------------------------------------


def test_full_supply() -> None:
    flow = ready_flow()
    request = flow.request("CP001")
    assert (request.driver_id, request.cp_id) == (D, "CP001")
    assert flow.busy and flow.awaiting_answer

    reaction = flow.handle(accepted(flow))
    assert reaction.events == [Accepted(D, "CP001", "s1", request.id)]
    assert not flow.awaiting_answer

    assert flow.handle(authorized()).events == [Authorized(D, "CP001", "s1", 0.35, NOW + 60)]
    started = m.SupplyStarted(driver_id=D, cp_id="CP001", session_id="s1")
    assert flow.handle(started).events == [Started(D, "CP001", "s1")]
    assert flow.handle(progress()).events == [Telemetry(D, "CP001", "s1", 7.4, 0.0123, 0.0)]
    assert flow.current is not None and flow.current.phase is Phase.SUPPLYING

    reaction = flow.handle(ticket("s1"))
    assert reaction.events == [TicketShown(ticket_data("s1"), TicketKind.CURRENT)]
    assert [(a.driver_id, a.session_id) for a in reaction.acks] == [(D, "s1")]
    assert not flow.busy
    assert flow.outcomes == [Outcome.TICKET]

    # The next request can start; late updates of the finished session change nothing.
    assert flow.handle(progress()).events == []
    flow.request("CP002")
    assert flow.busy


def test_denied() -> None:
    flow = ready_flow()
    request = flow.request("CP002")
    denial = m.RequestDenied(
        driver_id=D,
        cp_id="CP002",
        request_id=request.id,
        reason=m.DenialReason.CP_UNAVAILABLE,
        detail="CP002 is PARADO",
    )
    reaction = flow.handle(denial)
    assert reaction.events == [Denied(D, "CP002", request.id, "cp_unavailable", "CP002 is PARADO")]
    assert not flow.busy
    assert flow.outcomes == [Outcome.DENIED]


def test_answers_to_other_requests_are_ignored() -> None:
    flow = ready_flow()
    flow.request("CP001")
    other = m.RequestAccepted(driver_id=D, cp_id="CP001", request_id="old", session_id="sX")
    denial = m.RequestDenied(
        driver_id=D, cp_id="CP001", request_id="old", reason=m.DenialReason.DRIVER_BUSY
    )
    for update in (other, denial):
        reaction = flow.handle(update)
        assert reaction.events == [] and not reaction.relevant
    assert flow.awaiting_answer


def test_updates_of_other_sessions_are_ignored() -> None:
    flow = ready_flow()
    flow.request("CP001")
    flow.handle(accepted(flow, "s1"))
    for update in (authorized("s2"), progress("s2")):
        reaction = flow.handle(update)
        assert reaction.events == [] and not reaction.relevant
    assert flow.current is not None and flow.current.phase is Phase.ACCEPTED


def test_updates_for_another_driver_are_ignored() -> None:
    flow = ready_flow()
    request = flow.request("CP001")
    foreign = m.RequestAccepted(
        driver_id="D2", cp_id="CP001", request_id=request.id, session_id="s"
    )
    assert flow.handle(foreign).events == []
    foreign_ticket = m.Ticket(ticket=ticket_data("s").model_copy(update={"driver_id": "D2"}))
    assert flow.handle(foreign_ticket).acks == []
    assert flow.awaiting_answer


def test_session_updates_before_acceptance_are_replayed() -> None:
    flow = ready_flow()
    flow.request("CP001")
    assert flow.handle(authorized("s1")).events == []
    assert flow.handle(authorized("s7", cp_id="CP009")).events == []  # another CP: dropped
    reaction = flow.handle(accepted(flow, "s1"))
    assert [type(e) for e in reaction.events] == [Accepted, Authorized]
    assert flow.current is not None and flow.current.phase is Phase.AUTHORIZED


def test_early_updates_are_bounded() -> None:
    flow = ready_flow()
    flow.request("CP001")
    for i in range(MAX_EARLY_UPDATES + 50):
        flow.handle(progress("s1", kwh=i))
    reaction = flow.handle(accepted(flow, "s1"))
    assert len(reaction.events) == 1 + MAX_EARLY_UPDATES


def test_ticket_before_acceptance_finishes_the_request() -> None:
    flow = ready_flow()
    flow.request("CP001")
    reaction = flow.handle(ticket("s1"))
    assert [e.kind for e in reaction.events if isinstance(e, TicketShown)] == [TicketKind.OTHER]
    flow.handle(accepted(flow, "s1"))
    assert not flow.busy
    assert flow.outcomes == [Outcome.TICKET]


def test_repeated_ticket_is_acknowledged_but_shown_once() -> None:
    flow = ready_flow()
    flow.request("CP001")
    flow.handle(accepted(flow))
    assert len(flow.handle(ticket("s1")).events) == 1
    again = flow.handle(ticket("s1"))
    assert again.events == [] and [a.session_id for a in again.acks] == ["s1"]


def test_corrected_ticket_is_shown() -> None:
    flow = ready_flow()
    flow.request("CP001")
    flow.handle(accepted(flow))
    flow.handle(ticket("s1"))
    correction = flow.handle(ticket("s1", revision=2))
    assert correction.events == [TicketShown(ticket_data("s1", revision=2), TicketKind.CORRECTION)]
    assert flow.handle(ticket("s1", revision=1)).events == []  # an older revision: no


def test_correction_for_a_session_never_seen() -> None:
    flow = ready_flow()
    reaction = flow.handle(ticket("old", revision=3))
    assert [e.kind for e in reaction.events if isinstance(e, TicketShown)] == [
        TicketKind.CORRECTION
    ]


def test_ticket_of_an_unfollowed_session_is_shown_while_another_runs() -> None:
    flow = ready_flow()
    flow.request("CP001")
    flow.handle(accepted(flow, "s1"))
    reaction = flow.handle(ticket("sCP", "CP007"))
    assert [e.kind for e in reaction.events if isinstance(e, TicketShown)] == [TicketKind.OTHER]
    assert not reaction.relevant and flow.busy


def test_give_up_when_central_never_answers() -> None:
    flow = ready_flow()
    request = flow.request("CP001")
    reaction = flow.give_up("no answer")
    assert reaction.events == [Failure(D, "no answer", "CP001", None)]
    assert flow.outcomes == [Outcome.ERROR] and not flow.busy
    # A late answer to the abandoned request is ignored.
    late = m.RequestAccepted(driver_id=D, cp_id="CP001", request_id=request.id, session_id="s1")
    assert flow.handle(late).events == []
    assert flow.give_up("again").events == []


def test_notice_carries_the_current_context() -> None:
    flow = ready_flow()
    notice = m.DriverNotice(driver_id=D, level="error", text="CP001 stopped by Central")
    assert flow.handle(notice).events == [Notice(D, "CP001 stopped by Central", "error")]
    flow.request("CP001")
    flow.handle(accepted(flow, "s1"))
    reaction = flow.handle(notice)
    assert reaction.events == [Notice(D, "CP001 stopped by Central", "error", "CP001", "s1")]


def test_login_result_is_ignored() -> None:
    flow = ready_flow()
    result = m.LoginResult(driver_id=D, request_id="r", ok=True)
    assert flow.handle(result).events == []


def test_update_driver_id() -> None:
    assert update_driver_id(ticket("s")) == D
    assert update_driver_id(progress()) == D


def test_a_history_answer_is_ignored_by_the_command_line_flow() -> None:
    """Regression: a driver_history update (meant for the dashboard) must not crash the flow."""
    from EV_Driver.flow import DriverFlow
    from shared.messages import DriverHistory

    flow = DriverFlow("user1")
    reaction = flow.handle(DriverHistory(driver_id="user1", request_id="q1", known=True))
    assert reaction.events == []
