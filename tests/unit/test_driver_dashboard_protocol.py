"""The driver dashboard's browser protocol and views (EV_Driver.dashboard_protocol): pure."""

from __future__ import annotations

import json

import pytest

from EV_Driver.dashboard_config import parse_settings
from EV_Driver.dashboard_protocol import (
    MAX_COMMAND_BYTES,
    FileRun,
    RequestSupply,
    RunFile,
    RunItem,
    StopSupply,
    SupplyPanel,
    cp_view,
    cps_push,
    parse_command,
)
from EV_Driver.flow import (
    Accepted,
    Authorized,
    Denied,
    Failure,
    Following,
    Requested,
    Started,
    Telemetry,
    TicketKind,
    TicketShown,
)
from shared import messages as m
from shared.errors import MessageError

D = "user1"
NOW = 1_700_000_000.0


def ticket(session_id: str = "s1", **fields: object) -> m.TicketData:
    data: dict[str, object] = {
        "session_id": session_id,
        "cp_id": "CP001",
        "driver_id": D,
        "kwh": 0.5,
        "price_eur_kwh": 0.35,
        "amount_eur": 0.18,
        "reason": m.EndReason.DRIVER_STOP,
        "started_at": NOW,
        "ended_at": NOW + 60,
    }
    data.update(fields)
    return m.TicketData.model_validate(data)


# --- commands ---------------------------------------------------------------------------------


def test_valid_commands_parse_to_their_models() -> None:
    assert isinstance(parse_command('{"type":"request","cp_id":"CP001"}'), RequestSupply)
    assert isinstance(parse_command(b'{"type":"stop"}'), StopSupply)
    run = parse_command(json.dumps({"type": "run_file", "name": "a.txt", "text": "CP001\n"}))
    assert isinstance(run, RunFile) and run.text == "CP001\n"


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ("{", "message"),
        ("[]", "message"),
        ('{"type":"nope"}', "message"),
        ('{"type":"stop","extra":1}', "extra"),
        ('{"type":"request","cp_id":"CP 001"}', "cp_id"),
        ('{"type":"request","cp_id":""}', "cp_id"),
        # Logging in is not a /ws command: the connection comes with its session cookie.
        ('{"type":"login","driver_id":"user1","password":"pass1"}', "message"),
        ('{"type":"logout"}', "message"),
        ('{"type":"run_file","name":"a\\nb","text":"CP001"}', "name"),
    ],
)
def test_invalid_commands_raise_a_message_error_naming_the_field(raw: str, where: str) -> None:
    with pytest.raises(MessageError) as error:
        parse_command(raw)
    assert where in str(error.value)


def test_a_command_over_the_size_limit_is_refused_before_parsing() -> None:
    raw = json.dumps({"type": "run_file", "name": "x", "text": "C" * MAX_COMMAND_BYTES})
    with pytest.raises(MessageError, match="exceeds the maximum"):
        parse_command(raw)


def test_settings_mirror_environment_variables() -> None:
    settings = parse_settings([], {"EV_BROKER": "k:9092", "EV_HTTP_PORT": "9001"})
    assert (settings.broker, settings.http_port, settings.listen_host) == (
        "k:9092",
        9001,
        "0.0.0.0",
    )
    flags = parse_settings(["--broker", "h:1", "--http-port", "8001", "--pause", "0.5"], {})
    assert (flags.http_port, flags.pause) == (8001, 0.5)
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--broker", "nope"], {})
    assert exited.value.code == 2


# --- CP list ----------------------------------------------------------------------------------


def state(cp_id: str, st: m.CPState, driver_id: str | None = None) -> m.CPStateUpdate:
    return m.CPStateUpdate(
        cp_id=cp_id,
        state=st,
        location="<b>here</b>",
        price_eur_kwh=0.35,
        max_kw=22,
        driver_id=driver_id,
        kw=11 if driver_id else 0,
        kwh=3 if driver_id else 0,
    )


def test_cp_view_never_shows_another_drivers_supply() -> None:
    busy = state("CP001", m.CPState.SUMINISTRANDO, driver_id="user2")
    view = cp_view(busy, None)
    assert view["mine"] is False and view["available"] is False
    assert "user2" not in json.dumps(view)
    assert "kwh" not in view and "kw" not in view
    assert cp_view(busy, "CP001")["mine"] is True
    assert cp_view(state("CP002", m.CPState.ACTIVADO), D)["available"] is True
    assert cp_view(state("CP003", m.CPState.PARADO), D)["colour"] == "orange"


def test_a_reserved_cp_is_shown_as_such_and_not_offered() -> None:
    held = state("CP001", m.CPState.ACTIVADO).model_copy(update={"reserved": True})
    view = cp_view(held, None)
    assert (view["state"], view["reserved"], view["available"]) == ("ACTIVADO", True, False)


def test_cp_view_carries_the_cps_time_scale_for_the_supply_panel() -> None:
    assert cp_view(state("CP001", m.CPState.ACTIVADO), None)["speed"] == 1.0
    fast = state("CP002", m.CPState.SUMINISTRANDO).model_copy(update={"speed": 60.0})
    assert cp_view(fast, "CP002")["speed"] == 60.0


def test_cps_push_is_sorted_by_id() -> None:
    states = {c: state(c, m.CPState.ACTIVADO) for c in ("CP010", "CP002", "CP001")}
    assert [c["cp_id"] for c in cps_push(states, D)["cps"]] == ["CP001", "CP002", "CP010"]


# --- supply panel -----------------------------------------------------------------------------


def test_supply_panel_follows_a_request_to_its_ticket() -> None:
    panel = SupplyPanel()
    pushes = panel.apply(Requested(D, "CP001", "r1"), NOW)
    assert pushes[0]["supply"]["phase"] == "requested"
    assert pushes[0]["supply"]["active"] is True
    panel.apply(Accepted(D, "CP001", "s1", "r1"), NOW + 1)
    (push,) = panel.apply(Authorized(D, "CP001", "s1", 0.35, NOW + 60), NOW + 2)
    assert push["supply"]["phase"] == "authorized" and push["supply"]["price_eur_kwh"] == 0.35
    (push,) = panel.apply(Started(D, "CP001", "s1"), NOW + 3)
    assert push["supply"]["started_at"] == NOW + 3
    (push,) = panel.apply(Telemetry(D, "CP001", "s1", 22.0, 0.1, 0.04), NOW + 4)
    assert push == {
        "type": "progress",
        "session_id": "s1",
        "kw": 22.0,
        "kwh": 0.1,
        "amount_eur": 0.04,
        "t": NOW + 4,
    }
    # Telemetry for another session is not shown.
    assert panel.apply(Telemetry(D, "CP001", "other", 1, 9, 9), NOW + 5) == []
    supply, ticket_push = panel.apply(TicketShown(ticket(), TicketKind.CURRENT), NOW + 6)
    assert supply["supply"]["phase"] == "ended" and supply["supply"]["active"] is False
    assert supply["supply"]["amount_eur"] == 0.18
    assert ticket_push["ticket"]["session_id"] == "s1" and ticket_push["kind"] == "current"
    assert panel.last_ticket == ticket_push
    assert [p[1] for p in panel.view.points] == [0.0, 0.1, 0.5]  # type: ignore[union-attr]


def test_supply_panel_shows_a_denial_and_a_failure() -> None:
    panel = SupplyPanel()
    panel.apply(Requested(D, "CP009", "r1"), NOW)
    (push,) = panel.apply(Denied(D, "CP009", "r1", "cp_unavailable", "DESCONECTADO"), NOW)
    assert push["supply"]["phase"] == "denied"
    assert push["supply"]["detail"] == "cp_unavailable: DESCONECTADO"
    panel.apply(Requested(D, "CP001", "r2"), NOW)
    pushes = panel.apply(Failure(D, "no answer", "CP001", None), NOW)
    assert pushes[0]["supply"]["phase"] == "failed"
    assert pushes[1] == {"type": "notice", "level": "error", "text": "no answer"}


def test_supply_panel_adopts_a_session_found_in_progress() -> None:
    panel = SupplyPanel()
    info = m.SessionInfo(session_id="s9", cp_id="CP002", status="SUPPLYING", kwh=1.5)
    (push,) = panel.apply(Following(D, info), NOW)
    assert push["supply"]["phase"] == "supplying"
    assert push["supply"]["kwh"] == 1.5 and push["supply"]["session_id"] == "s9"


def test_a_ticket_for_another_session_leaves_the_panel_alone() -> None:
    panel = SupplyPanel()
    panel.apply(Requested(D, "CP001", "r1"), NOW)
    panel.apply(Accepted(D, "CP001", "s1", "r1"), NOW)
    pushes = panel.apply(TicketShown(ticket("old"), TicketKind.AWAY), NOW)
    assert [p["type"] for p in pushes] == ["ticket"]
    assert panel.view is not None and panel.view.phase == "accepted"


# --- file runs --------------------------------------------------------------------------------


def test_file_run_items_follow_their_request_and_session() -> None:
    run = FileRun("f.txt", [RunItem("CP001"), RunItem("CP009")])
    run.items[0].status, run.items[0].request_id = "requested", "r1"
    assert run.apply(Accepted(D, "CP001", "s1", "r1"), NOW)
    assert run.apply(Started(D, "CP001", "s1"), NOW)
    assert run.items[0].status == "supplying"
    assert not run.apply(Telemetry(D, "CP001", "s1", 1, 0.2, 0.1), NOW)  # figures only
    assert run.apply(TicketShown(ticket()), NOW + 9)
    assert (run.items[0].status, run.items[0].done_at) == ("ticket", NOW + 9)
    run.items[1].status, run.items[1].request_id = "requested", "r2"
    assert run.apply(Denied(D, "CP009", "r2", "cp_unavailable", ""), NOW + 14)
    assert run.items[1].status == "denied" and run.items[1].detail == "cp_unavailable"
    assert not run.apply(Denied(D, "CP009", "unknown", "cp_unavailable", ""), NOW)


def test_cancelling_a_run_cancels_the_pending_items_only() -> None:
    run = FileRun("f.txt", [RunItem("CP001", status="supplying"), RunItem("CP002")])
    run.cancel()
    assert run.finished
    assert [i.status for i in run.items] == ["supplying", "cancelled"]
    assert run.as_push()["run"]["state"] == "cancelled"
