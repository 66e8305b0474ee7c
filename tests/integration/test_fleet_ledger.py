"""The fleet simulator's ledger against a real Central, read as an auditor would.

Its simulated engines write what they metered (authorised, tick, ended) and its simulated
drivers what they received (ticket, denied). At the end of its run the simulator asks for no
new supply, ends every supply in progress as its driver unplugging and waits for the tickets:
so every supply authorised is ended on the ledger, and every supply ended has its ticket there,
for the energy the engine metered.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from EV_CP_E.machine import amount
from helpers import scaled
from procs import Deployment
from tools.fleet.accounts import Credentials, seed_database
from tools.fleet.sim import Fleet, FleetConfig, cp_ids, driver_ids

pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.slow]

CPS = 8
DRIVERS = 4
KW = 22.0
SAMPLE_KWH = KW / 3600  # one telemetry sample's energy (one a second)


def read_ledger(path: Path) -> list[dict[str, Any]]:
    raw = path.read_text().splitlines()
    assert all(line.startswith('{"event":"') and ", " not in line for line in raw), raw[:3]
    return [json.loads(line) for line in raw]


async def test_the_ledger_holds_every_supply_from_authorisation_to_ticket(
    system: Deployment, tmp_path: Path
) -> None:
    ids = cp_ids("SIM", CPS)
    drivers = driver_ids("SIM", DRIVERS)
    credentials = Credentials()
    system.prepare_db()
    seed_database(system.db_path, ids, drivers, credentials)
    central = await system.start_central()
    assert central.proc is not None
    ledger = tmp_path / "fleet-ledger.jsonl"
    config = FleetConfig(
        central=f"127.0.0.1:{system.central_port}",
        broker=system.broker,
        admin=f"127.0.0.1:{system.http_port}",
        cps=CPS,
        supplying=DRIVERS / CPS,
        warmup=2.0,
        duration=6.0,
        # A supply ends on its own after 4 s; the driver's next one is still going at the
        # stop, 8 s in: both kinds of end are on the ledger.
        supply_seconds=(4.0, 4.0),
        kw=KW,
        lose=0,
        central_pid=central.proc.pid,
        admin_password=system.admin_password,
        credentials=credentials,
        ledger=ledger,
        drain=scaled(20.0),
    )

    result = await Fleet(config).run()

    assert result["drivers_logged_in"] == DRIVERS, result
    assert result["supplies_completed"] >= 1, result  # ended on their own in the window
    assert result["supplies_ended_at_stop"] >= 1, result  # ended by the drain
    assert result["tickets_missing"] == 0, result
    lines = read_ledger(ledger)
    assert all(list(line)[-1] == "ts" for line in lines)
    by_event: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for index, line in enumerate(lines):
        by_event[line["event"]].append((index, line))
    assert set(by_event) <= {"authorised", "tick", "ended", "ticket", "denied"}, set(by_event)

    authorised = {line["session_id"]: line for _, line in by_event["authorised"]}
    ended = {line["session_id"]: (index, line) for index, line in by_event["ended"]}
    assert len(ended) == len(by_event["ended"]), "a supply ended twice"
    # Every supply the engines accepted was ended (none left running at the stop), and only
    # those were.
    assert authorised and set(ended) == set(authorised)
    for auth in authorised.values():
        assert auth["cp_id"] in ids and auth["driver_id"] in drivers
        assert auth["price_eur_kwh"] == 0.35
        assert auth["max_kwh"] is not None and auth["max_kwh"] > 1000  # a full balance

    ticks: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for index, line in by_event["tick"]:
        ticks[line["session_id"]].append((index, line))
    assert ticks, "no telemetry on the ledger"
    for session_id, samples in ticks.items():
        auth = authorised[session_id]
        end_index, end = ended[session_id]
        assert [line["seq"] for _, line in samples] == list(range(1, len(samples) + 1))
        assert all(index < end_index for index, _ in samples), "a tick after the end"
        for _, line in samples:
            assert (line["cp_id"], line["driver_id"]) == (auth["cp_id"], auth["driver_id"])
            assert line["amount_eur"] == amount(line["kwh"], 0.35)
        kwhs = [line["kwh"] for _, line in samples]
        assert kwhs == sorted(kwhs)
        assert end["kwh"] == kwhs[-1]  # the end reports what the last sample metered

    tickets: dict[str, dict[str, Any]] = {}
    for _, ticket in by_event["ticket"]:
        tickets.setdefault(ticket["session_id"], ticket)  # repeats: the first is enough
    for session_id, (_, end) in ended.items():
        assert (end["cp_id"], end["driver_id"]) == (
            authorised[session_id]["cp_id"],
            authorised[session_id]["driver_id"],
        )
        assert end["reason"] == "unplugged", end
        assert end["amount_eur"] == amount(end["kwh"], 0.35)
        ticket = tickets.get(session_id)
        assert ticket is not None, f"no ticket for the supply ended {end}"
        assert (ticket["driver_id"], ticket["cp_id"]) == (end["driver_id"], end["cp_id"])
        assert abs(ticket["kwh"] - end["kwh"]) <= SAMPLE_KWH + 1e-9, (ticket, end)
        assert ticket["reason"] == end["reason"]
        assert ticket["price_eur_kwh"] == 0.35 and ticket["revision"] >= 1
        assert ticket["amount_eur"] == amount(ticket["kwh"], ticket["price_eur_kwh"])

    for _, denial in by_event["denied"]:  # a request in flight at the stop, refused
        assert denial["driver_id"] in drivers and denial["cp_id"] in ids
        assert denial["request_id"] and denial["reason"]

    # Central agrees: nothing is left running, and it billed what the drivers were given.
    running = system.query(
        "SELECT id, status FROM sessions WHERE status IN ('ASKED', 'AUTHORISED', 'SUPPLYING',"
        " 'ENDING')"
    )
    assert running == []
    billed = dict(
        system.query(
            "SELECT id, kwh FROM sessions WHERE status = 'COMPLETED' AND driver_id LIKE 'SIM%'"
        )
    )
    assert billed == {session_id: ticket["kwh"] for session_id, ticket in tickets.items()}
