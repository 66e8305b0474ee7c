"""One driver's room on the dashboard (EV_Driver.dashboard_room), with no broker.

The room publishes through a callable: here it records what would go to Kafka, and the test
plays Central by handing the room the updates Central would send.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from EV_Driver.dashboard_room import DriverRoom
from helpers import wait_for
from shared import messages as m
from shared.bus import BusError

D = "user1"


class Browser:
    def __init__(self) -> None:
        self.pushes: list[dict[str, Any]] = []

    def send_text(self, text: str) -> None:
        self.pushes.append(json.loads(text))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [p for p in self.pushes if p["type"] == kind]


class Kafka:
    def __init__(self) -> None:
        self.sent: list[m.Message] = []
        self.down = False

    async def publish(self, message: m.Message) -> None:
        if self.down:
            raise BusError("cannot publish")
        self.sent.append(message)

    def of(self, kind: type[m.Message]) -> list[Any]:
        return [s for s in self.sent if isinstance(s, kind)]

    async def wait(self, kind: type[m.Message], count: int = 1) -> list[Any]:
        await wait_for(lambda: len(self.of(kind)) >= count, 5, interval=0.01)
        return self.of(kind)


@pytest.fixture
async def kafka() -> Kafka:
    return Kafka()


@pytest.fixture
async def room(kafka: Kafka) -> AsyncIterator[DriverRoom]:
    r = DriverRoom(D, kafka.publish, pause=0.3, answer_timeout=1.0, balance_eur=150.0)
    r.start()
    try:
        yield r
    finally:
        await r.close()


def ticket(session_id: str, cp_id: str = "CP001", revision: int = 1) -> m.Ticket:
    return m.Ticket(
        ticket=m.TicketData(
            session_id=session_id,
            cp_id=cp_id,
            driver_id=D,
            kwh=0.5,
            price_eur_kwh=0.35,
            amount_eur=0.18,
            reason=m.EndReason.UNPLUGGED,
            started_at=1.0,
            ended_at=2.0,
            revision=revision,
        )
    )


async def test_start_asks_for_status_and_history_and_shows_unseen_tickets(
    room: DriverRoom, kafka: Kafka
) -> None:
    browser = Browser()
    room.attach(browser)
    assert browser.of("balance") == [{"type": "balance", "balance_eur": 150.0}]
    (status_query,) = await kafka.wait(m.StatusQuery)
    (history_query,) = await kafka.wait(m.HistoryQuery)
    # Another app's status answer is not ours.
    room.handle(m.DriverStatus(driver_id=D, request_id="someone-else", known=True, balance_eur=1))
    assert browser.of("balance")[-1]["balance_eur"] == 150.0
    room.handle(
        m.DriverStatus(
            driver_id=D,
            request_id=status_query.id,
            known=True,
            balance_eur=149.5,
            unseen_tickets=[ticket("away").ticket],
        )
    )
    assert browser.of("balance")[-1]["balance_eur"] == 149.5
    assert browser.of("ticket")[-1]["kind"] == "away"
    (ack,) = await kafka.wait(m.TicketAck)
    assert ack.session_id == "away"
    room.handle(
        m.DriverHistory(
            driver_id=D,
            request_id=history_query.id,
            known=True,
            balance_eur=149.5,
            tickets=[ticket("away").ticket],
        )
    )
    assert browser.of("history")[-1]["tickets"][0]["session_id"] == "away"


async def test_a_supply_is_followed_to_its_ticket_and_every_tab_sees_it(
    room: DriverRoom, kafka: Kafka
) -> None:
    tabs = [Browser(), Browser()]
    for tab in tabs:
        room.attach(tab)
    assert room.request_supply("CP001") is None
    assert room.request_supply("CP002") == (
        "a supply is already in progress; stop it or wait for its ticket"
    )
    (request,) = await kafka.wait(m.SupplyRequest)
    assert request.cp_id == "CP001"
    room.handle(
        m.RequestAccepted(driver_id=D, cp_id="CP001", request_id=request.id, session_id="s1")
    )
    room.handle(m.SupplyStarted(driver_id=D, cp_id="CP001", session_id="s1"))
    room.handle(
        m.SupplyProgress(
            driver_id=D, cp_id="CP001", session_id="s1", kw=22, kwh=0.1, amount_eur=0.04
        )
    )
    assert room.stop_supply() is None
    (stop,) = await kafka.wait(m.StopRequest)
    assert stop.session_id == "s1"
    room.handle(ticket("s1"))
    for tab in tabs:
        assert [p["supply"]["phase"] for p in tab.of("supply") if p["supply"]][-1] == "ended"
        assert tab.of("progress")[-1]["kwh"] == 0.1
        assert tab.of("ticket")[-1]["ticket"]["session_id"] == "s1"
    await kafka.wait(m.TicketAck)
    await kafka.wait(m.HistoryQuery, 2)  # refreshed after the ticket
    assert not room.flow.busy
    assert room.stop_supply() == "no supply in progress"


async def test_no_answer_from_central_gives_up_after_the_answer_timeout(
    room: DriverRoom, kafka: Kafka
) -> None:
    browser = Browser()
    room.attach(browser)
    room.request_supply("CP001")
    await wait_for(lambda: not room.flow.busy, 5, interval=0.05)
    assert browser.of("supply")[-1]["supply"]["phase"] == "failed"
    assert "no answer from Central" in browser.of("notice")[-1]["text"]


async def test_a_file_runs_one_request_at_a_time_with_the_pause_between(
    room: DriverRoom, kafka: Kafka
) -> None:
    browser = Browser()
    room.attach(browser)
    assert room.start_run("f.txt", "# two\nCP001\nbad id!\nCP009\n") is None
    assert room.start_run("g.txt", "CP001") == (
        "a file of requests is already running; cancel it first"
    )
    assert room.request_supply("CP003") == "a file of requests is running; cancel it first"
    loop = asyncio.get_running_loop()
    (first,) = await kafka.wait(m.SupplyRequest)
    room.handle(
        m.RequestDenied(
            driver_id=D, cp_id="CP001", request_id=first.id, reason=m.DenialReason.DRIVER_BUSY
        )
    )
    denied_at = loop.time()
    second = (await kafka.wait(m.SupplyRequest, 2))[1]
    assert loop.time() - denied_at >= 0.3 - 0.02
    assert second.cp_id == "CP009"
    room.handle(
        m.RequestAccepted(driver_id=D, cp_id="CP009", request_id=second.id, session_id="s2")
    )
    room.handle(ticket("s2", "CP009"))
    await wait_for(lambda: room.run is not None and room.run.finished, 5, interval=0.02)
    run = browser.of("run")[-1]["run"]
    assert run["state"] == "done"
    assert [i["status"] for i in run["items"]] == ["denied", "ticket"]
    assert run["problems"] and "line 3" in run["problems"][0]


async def test_cancel_stops_the_queue_but_follows_the_supply_in_progress(
    room: DriverRoom, kafka: Kafka
) -> None:
    browser = Browser()
    room.attach(browser)
    room.start_run("f.txt", "CP001\nCP002\n")
    (first,) = await kafka.wait(m.SupplyRequest)
    room.handle(m.RequestAccepted(driver_id=D, cp_id="CP001", request_id=first.id, session_id="s1"))
    assert room.cancel_run() is None
    assert room.cancel_run() == "no file of requests is running"
    room.handle(ticket("s1"))
    await asyncio.sleep(0.5)  # longer than the pause: nothing more is asked
    assert len(kafka.of(m.SupplyRequest)) == 1
    run = browser.of("run")[-1]["run"]
    assert [i["status"] for i in run["items"]] == ["ticket", "cancelled"]


async def test_a_bad_file_is_refused_with_the_reason(room: DriverRoom) -> None:
    assert (
        room.start_run("f.txt", "# nothing\n\n")
        == "f.txt: no CP ids (only blank lines or comments)"
    )
    assert "no valid CP id" in (room.start_run("f.txt", "not valid!\n") or "")
    assert room.run is None


async def test_a_session_started_elsewhere_is_adopted(room: DriverRoom) -> None:
    browser = Browser()
    room.attach(browser)
    room.handle(
        m.SupplyProgress(
            driver_id=D, cp_id="CP004", session_id="menu", kw=7.4, kwh=0.2, amount_eur=0.06
        )
    )
    assert room.flow.busy
    assert browser.of("supply")[-1]["supply"]["cp_id"] == "CP004"
    room.handle(ticket("menu", "CP004"))
    assert not room.flow.busy
    # A late duplicate of its telemetry does not bring it back.
    room.handle(
        m.SupplyProgress(
            driver_id=D, cp_id="CP004", session_id="menu", kw=7.4, kwh=0.2, amount_eur=0.06
        )
    )
    assert not room.flow.busy


async def test_kafka_down_fails_the_request_with_a_clear_notice(
    room: DriverRoom, kafka: Kafka
) -> None:
    browser = Browser()
    room.attach(browser)
    await kafka.wait(m.HistoryQuery)
    kafka.down = True
    room.request_supply("CP001")
    await wait_for(lambda: not room.flow.busy, 10, interval=0.05)
    texts = [n["text"] for n in browser.of("notice")]
    assert "cannot reach Kafka" in texts
    assert browser.of("supply")[-1]["supply"]["phase"] == "failed"
