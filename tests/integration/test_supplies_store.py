"""Central's supply lifecycle (EV_Central.supplies) writing to a real SQLite file.

The rules are tested without I/O in tests/unit/test_central_session*.py; these tests check
what the layer around them makes durable: the session row, the driver's balance, the handled
message ids and the messages queued in the outbox, including a ticket corrected after settling
and redelivered events. No broker: what is posted without waiting goes nowhere here.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from EV_Central.authorisation import SupplyAsk
from EV_Central.context import Context
from EV_Central.db import Database
from EV_Central.feed import Feed
from EV_Central.metrics import CentralStats
from EV_Central.registry import ChargingPoint, Registry
from EV_Central.session import Timers
from EV_Central.store import Store
from EV_Central.supplies import Supplies
from shared.bus import KafkaBus
from shared.messages import CPAuthorisation, CPPlugged, CPSupplyEnded, CPTelemetry, EndReason

PRICE = 0.35  # CP001's demo price
BALANCE = 15000  # user1's demo balance, in cents


@pytest.fixture
async def supplies(tmp_path: Path) -> AsyncIterator[tuple[Supplies, Store, Registry]]:
    db = Database(tmp_path / "central.db", demo=True)
    await db.start()
    store = Store(db)
    registry = Registry()
    for row in await store.registered_cps():
        registry.add(
            ChargingPoint(row.id, row.location, row.price_eur_kwh, row.max_kw, connected=True)
        )
    bus = KafkaBus("127.0.0.1:9", "test-supplies")  # never started: posts go nowhere
    context = Context(store, registry, bus, Feed(registry, bus), CentralStats())
    try:
        yield Supplies(context, Timers()), store, registry
    finally:
        await db.stop()


async def row(store: Store, session_id: str) -> dict[str, Any]:
    [found] = await store.db.read("SELECT * FROM sessions WHERE id = ?", (session_id,))
    return dict(found)


async def balance(store: Store) -> int:
    cents = await store.driver_balance("user1")
    assert cents is not None
    return cents


async def outbox(store: Store) -> list[dict[str, Any]]:
    rows = await store.db.read("SELECT topic, payload FROM outbox ORDER BY seq")
    return [json.loads(r["payload"]) | {"topic": r["topic"]} for r in rows]


async def asked(supplies: Supplies, registry: Registry, request_id: str = "req-1") -> str:
    """A request Central lets through: CP001's engine is asked to authorise it."""
    await supplies.request(SupplyAsk(request_id, time.time(), "user1", "CP001", "driver"))
    cp = registry.get("CP001")
    assert cp is not None and cp.session is not None
    return cp.session.session_id


def answer(session_id: str, accepted: bool = True, reason: str = "") -> CPAuthorisation:
    return CPAuthorisation(cp_id="CP001", session_id=session_id, accepted=accepted, reason=reason)


async def authorised(supplies: Supplies, registry: Registry) -> str:
    session_id = await asked(supplies, registry)
    await supplies.answered(answer(session_id))
    return session_id


def ended(session_id: str, kwh: float, reason: EndReason = EndReason.UNPLUGGED) -> CPSupplyEnded:
    return CPSupplyEnded(
        cp_id="CP001",
        session_id=session_id,
        kwh=kwh,
        amount_eur=round(kwh * PRICE, 2),
        reason=reason,
        started_at=time.time() - 10,
    )


async def test_a_supply_is_authorised_started_settled_and_billed(
    supplies: tuple[Supplies, Store, Registry],
) -> None:
    service, store, registry = supplies
    session_id = await asked(service, registry)
    assert (await row(store, session_id))["status"] == "ASKED"
    assert [m["type"] for m in await outbox(store)] == ["request_accepted", "authorize_supply"]
    await service.answered(answer(session_id))
    stored = await row(store, session_id)
    assert (stored["status"], stored["price_eur_kwh"], stored["request_id"]) == (
        "AUTHORISED",
        PRICE,
        "req-1",
    )
    assert [m["type"] for m in await outbox(store)] == [
        "request_accepted",
        "authorize_supply",
        "supply_authorized",
    ]

    await service.plugged(CPPlugged(cp_id="CP001", session_id=session_id))
    sample = CPTelemetry(
        cp_id="CP001", session_id=session_id, seq=1, kw=22.0, kwh=4.0, amount_eur=1.4
    )
    service.stage_telemetry(sample)
    await service.flush_telemetry()
    assert (await row(store, session_id))["kwh"] == 4.0

    await service.engine_ended(ended(session_id, 10.0))
    stored = await row(store, session_id)
    assert (stored["status"], stored["kwh"], stored["amount_cents"]) == ("COMPLETED", 10.0, 350)
    assert stored["ticket_revision"] == 1
    assert await balance(store) == BALANCE - 350
    ticket = (await outbox(store))[-1]
    assert ticket["type"] == "ticket"
    assert (ticket["ticket"]["amount_eur"], ticket["ticket"]["revision"]) == (3.5, 1)
    cp = registry.get("CP001")
    assert cp is not None and cp.session is None  # released


async def test_later_figures_correct_the_ticket_and_the_balance_once(
    supplies: tuple[Supplies, Store, Registry],
) -> None:
    service, store, registry = supplies
    session_id = await authorised(service, registry)
    await service.plugged(CPPlugged(cp_id="CP001", session_id=session_id))
    await service.end(registry.cps["CP001"], EndReason.DRIVER_STOP)
    await service.settle_now(registry.cps["CP001"])  # the engine's figures did not come
    assert (await row(store, session_id))["status"] == "ABORTED"
    assert await balance(store) == BALANCE

    late = ended(session_id, 2.0, EndReason.DRIVER_STOP)
    await service.engine_ended(late)
    await service.engine_ended(late)  # delivered twice
    stored = await row(store, session_id)
    assert (stored["kwh"], stored["amount_cents"], stored["ticket_revision"]) == (2.0, 70, 2)
    assert await balance(store) == BALANCE - 70
    tickets = [m["ticket"] for m in await outbox(store) if m["type"] == "ticket"]
    assert [(t["revision"], t["amount_eur"]) for t in tickets] == [(1, 0.0), (2, 0.7)]


async def test_a_redelivered_request_creates_no_second_session(
    supplies: tuple[Supplies, Store, Registry],
) -> None:
    service, store, registry = supplies
    await authorised(service, registry)
    await service.request(SupplyAsk("req-1", time.time(), "user1", "CP001", "driver"))
    assert await store.sessions_by_status() == {"AUTHORISED": 1}
    await service.request(SupplyAsk("req-2", time.time(), "user1", "CP002", "driver"))
    assert await store.sessions_by_status() == {"AUTHORISED": 1, "DENIED": 1}
    denial = (await outbox(store))[-1]
    assert (denial["type"], denial["reason"]) == ("request_denied", "driver_busy")


async def test_an_engine_refusal_is_stored_as_a_denial_and_frees_the_cp(
    supplies: tuple[Supplies, Store, Registry],
) -> None:
    service, store, registry = supplies
    session_id = await asked(service, registry)
    await service.answered(answer(session_id, accepted=False, reason="engine KO"))
    await service.answered(answer(session_id, accepted=False, reason="engine KO"))  # again
    stored = await row(store, session_id)
    assert (stored["status"], stored["reason"], stored["amount_cents"]) == (
        "DENIED",
        "cp_refused",
        0,
    )
    assert await balance(store) == BALANCE
    sent = await outbox(store)
    assert [m["type"] for m in sent] == ["request_accepted", "authorize_supply", "request_denied"]
    assert sent[-1]["reason"] == "cp_refused" and "engine KO" in sent[-1]["detail"]
    cp = registry.get("CP001")
    assert cp is not None and cp.session is None and cp.available
    # The driver may ask again at once: the denied session does not hold them.
    assert await asked(service, registry, "req-2") != session_id


async def test_an_engine_that_never_answers_gets_the_request_denied_by_the_timer(
    supplies: tuple[Supplies, Store, Registry],
) -> None:
    service, store, registry = supplies
    session_id = await asked(service, registry)
    await service.check_timers(time.time() + 1)
    assert (await row(store, session_id))["status"] == "ASKED"
    await service.check_timers(time.time() + Timers().cp_answer_timeout + 1)
    stored = await row(store, session_id)
    assert (stored["status"], stored["reason"]) == ("DENIED", "cp_no_answer")
    sent = await outbox(store)
    assert [m["type"] for m in sent][-2:] == ["request_denied", "end_supply"]
    cp = registry.get("CP001")
    assert cp is not None and cp.session is None
    assert await balance(store) == BALANCE
