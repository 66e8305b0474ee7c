"""The auditor: checks a chaos run's invariants from records nobody summarised for it.

What it trusts, and why each is independent of Central's own accounts:

- the **engines' ledgers** (`EV_CP_E --ledger`, and the fleet simulator's): what each engine
  metered for each supply, written before Central could hear of it;
- what each **driver** received: the real driver apps' JSON output (every ticket they showed)
  and the simulator's drivers' ticket lines;
- the **starting balances**, read before the first supply;
- Central's **database** only as the thing under test: its sessions and balances are compared
  with the above, never used to excuse them;
- the **fault log** (which CP an admin stopped, and when) and the audit chain's own check.

Pure: `audit(Evidence) -> list[Invariant]`; the runner gathers the evidence.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

# A ticket's kWh may be short of the engine's meter by one telemetry sample (an engine killed
# between writing its ledger and sending the sample); this much more is rounding.
SAMPLE_SECONDS = 1.0
EPSILON_KWH = 1e-6
# Central bills kWh rounded to four decimals.
ROUNDING_KWH = 0.00005 + 1e-9
ACTIVE = {"ASKED", "AUTHORISED", "SUPPLYING", "ENDING"}
SETTLED = {"COMPLETED", "ABORTED", "EXPIRED"}
# A stopped CP's supply ends within this long (Central's end grace and the engine's tick).
STOP_GRACE_S = 5.0


@dataclass
class Invariant:
    name: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)

    def fail(self, text: str) -> None:
        self.violations.append(text)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "checked": self.checked, "violations": self.violations}


@dataclass
class Evidence:
    ledger: list[dict[str, Any]]  # engines' and the simulator's lines, in file order
    driver_events: list[dict[str, Any]]  # the real driver apps' JSON lines
    sessions: list[dict[str, Any]]  # Central's sessions table
    balances_start: dict[str, int]  # cents, read before the run
    balances_end: dict[str, int]  # cents, after it
    max_kw: dict[str, float]  # each CP's power (kW)
    final_states: dict[str, str]  # each CP's state at the end, as Central shows it
    expected_states: dict[str, str]  # what it must be given which parts are alive
    stopped: list[tuple[str, float, float]]  # (cp_id, since, until): Central's clock ~ ours
    audit_ok: bool
    audit_output: str
    roles: list[tuple[float, list[str | None]]] = field(default_factory=list)  # --ha samples
    engine_shifts: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)


@dataclass
class Metered:
    cp_id: str
    driver_id: str
    kwh: float = 0.0
    ended: bool = False
    ticks: list[tuple[float | None, float]] = field(default_factory=list)  # (ts, kwh)
    authorised: int = 0


def metered(ledger: list[dict[str, Any]]) -> dict[str, Metered]:
    """Per session: the most energy its engine metered, from its ticks and its end."""
    found: dict[str, Metered] = {}
    for line in ledger:
        event, session = line.get("event"), line.get("session_id")
        if event not in ("authorised", "tick", "ended") or not isinstance(session, str):
            continue
        m = found.setdefault(session, Metered(str(line.get("cp_id")), str(line.get("driver_id"))))
        if event == "authorised":
            m.authorised += 1
            continue
        kwh = float(line.get("kwh") or 0.0)
        m.kwh = max(m.kwh, kwh)
        if event == "ended":
            m.ended = True
        else:
            ts = line.get("ts")
            m.ticks.append((float(ts) if isinstance(ts, int | float) else None, kwh))
    return found


def driver_tickets(evidence: Evidence) -> dict[str, list[dict[str, Any]]]:
    """Every ticket a driver received, by session (real apps' and simulated drivers')."""
    tickets: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in evidence.driver_events:
        if line.get("event") == "ticket" and isinstance(line.get("session_id"), str):
            tickets[line["session_id"]].append(line)
    for line in evidence.ledger:
        if line.get("event") == "ticket" and isinstance(line.get("session_id"), str):
            tickets[line["session_id"]].append(line)
    return tickets


def final_ticket(copies: list[dict[str, Any]]) -> dict[str, Any]:
    """The ticket a driver keeps: the highest revision (a corrected one replaces the first)."""
    return max(copies, key=lambda t: int(t.get("revision") or 1))


def audit(evidence: Evidence) -> list[Invariant]:
    meters = metered(evidence.ledger)
    tickets = driver_tickets(evidence)
    sessions = {str(s["id"]): s for s in evidence.sessions}
    one_ticket = Invariant("every supply that delivered energy has one ticket at its driver")
    in_central = Invariant("every supply that delivered energy is settled in Central")
    energy = Invariant("each ticket's kWh is the engine's metered energy (within one sample)")
    price = Invariant("each ticket's amount is kWh × price (capped by the balance)")
    balances = Invariant("each driver's balance is the start minus their tickets, never negative")
    open_sessions = Invariant("no session is left open")
    states = Invariant("every CP's final state matches whether its parts are alive")
    twice = Invariant("no request was authorised twice, no session authorised at two CPs")
    stopped = Invariant("no supply ran on a CP that Central had stopped")
    chain = Invariant("the audit chain verifies")
    checks = [one_ticket, in_central, energy, price, balances, open_sessions, states, twice]
    checks += [stopped, chain]

    for session_id, m in meters.items():
        if m.kwh <= EPSILON_KWH:
            continue
        one_ticket.checked += 1
        in_central.checked += 1
        row = sessions.get(session_id)
        copies = tickets.get(session_id, [])
        if not copies:
            one_ticket.fail(
                f"session {session_id} ({m.cp_id}, {m.driver_id}, {m.kwh:.4f} kWh "
                f"metered): no ticket reached the driver"
            )
        else:
            amounts = {(int(t.get("revision") or 1), round(float(t["kwh"]), 6)) for t in copies}
            if len({rev for rev, _ in amounts}) != len(amounts):
                one_ticket.fail(
                    f"session {session_id}: different tickets of one revision {sorted(amounts)}"
                )
        if row is None:
            in_central.fail(
                f"session {session_id} ({m.cp_id}): metered {m.kwh:.4f} kWh, unknown to Central"
            )
            continue
        if row["status"] not in SETTLED:
            in_central.fail(f"session {session_id} ({m.cp_id}): {row['status']}, not settled")
            continue
        energy.checked += 1
        # One sample short at most, each side rounded to four decimals.
        tolerance = evidence.max_kw.get(m.cp_id, 22.0) * SAMPLE_SECONDS / 3600 + 2 * ROUNDING_KWH
        billed = float(row["kwh"])
        capped = _capped(row, evidence)
        if billed > m.kwh + ROUNDING_KWH or (billed < m.kwh - tolerance and not capped):
            energy.fail(
                f"session {session_id} ({m.cp_id}): Central billed {billed:.4f} kWh, "
                f"the engine metered {m.kwh:.4f} kWh"
            )
        if copies:
            shown = final_ticket(copies)
            if abs(float(shown["kwh"]) - billed) > EPSILON_KWH:
                energy.fail(
                    f"session {session_id}: the driver's ticket says "
                    f"{float(shown['kwh']):.4f} kWh, Central {billed:.4f}"
                )
            if abs(round(float(shown["amount_eur"]) * 100) - int(row["amount_cents"])) > 0:
                price.fail(
                    f"session {session_id}: the driver's ticket says "
                    f"{shown['amount_eur']} €, Central {row['amount_cents']} cents"
                )

    for row in evidence.sessions:
        if row["status"] in SETTLED:
            price.checked += 1
            want = round(float(row["kwh"]) * float(row["price_eur_kwh"]) * 100)
            if abs(want - int(row["amount_cents"])) > 1:
                price.fail(
                    f"session {row['id']}: {row['kwh']:.4f} kWh × "
                    f"{row['price_eur_kwh']} €/kWh is {want} cents, billed "
                    f"{row['amount_cents']}"
                )
        open_sessions.checked += 1
        if row["status"] in ACTIVE:
            open_sessions.fail(f"session {row['id']} at {row['cp_id']} still {row['status']}")

    charged: dict[str, int] = defaultdict(int)
    charged_seen: dict[str, int] = defaultdict(int)
    for row in evidence.sessions:
        if row["status"] in SETTLED:
            charged[str(row["driver_id"])] += int(row["amount_cents"])
    for copies in tickets.values():
        shown = final_ticket(copies)
        charged_seen[str(shown["driver_id"])] += round(float(shown["amount_eur"]) * 100)
    for driver_id, start in sorted(evidence.balances_start.items()):
        if driver_id not in evidence.balances_end:
            continue
        balances.checked += 1
        end = evidence.balances_end[driver_id]
        if end < 0:
            balances.fail(f"{driver_id}: negative balance {end} cents")
        if end != start - charged[driver_id]:
            balances.fail(
                f"{driver_id}: started with {start} cents, Central's sessions charge "
                f"{charged[driver_id]}, the balance is {end}"
            )
        if driver_id in charged_seen and end != start - charged_seen[driver_id]:
            balances.fail(
                f"{driver_id}: started with {start} cents, the tickets the driver "
                f"got add up to {charged_seen[driver_id]}, the balance is {end}"
            )

    for cp_id, expected in sorted(evidence.expected_states.items()):
        states.checked += 1
        actual = evidence.final_states.get(cp_id)
        if actual != expected:
            states.fail(f"{cp_id}: {actual or 'not shown'} at the end, expected {expected}")

    requests: dict[str, list[str]] = defaultdict(list)
    for row in evidence.sessions:
        if row.get("authorized_at") is not None and row.get("request_id"):
            requests[str(row["request_id"])].append(str(row["id"]))
    for request_id, ids in requests.items():
        twice.checked += 1
        if len(ids) > 1:
            twice.fail(f"request {request_id} authorised as sessions {', '.join(ids)}")
    for session_id, m in meters.items():
        if m.authorised > 1:
            twice.fail(f"session {session_id} authorised {m.authorised} times at its engine")
        row = sessions.get(session_id)
        if row is not None and str(row["cp_id"]) != m.cp_id:
            twice.fail(f"session {session_id} of {row['cp_id']} supplied at {m.cp_id}")

    for cp_id, since, until in evidence.stopped:
        stopped.checked += 1
        for row in evidence.sessions:
            at = row.get("authorized_at")
            if row["cp_id"] == cp_id and at is not None and since + 0.5 < at < until:
                stopped.fail(f"{cp_id}: session {row['id']} authorised while it was stopped")
        for session_id, m in meters.items():
            if m.cp_id != cp_id:
                continue
            for ts, kwh in m.ticks:
                at = _unshifted(ts, evidence.engine_shifts.get(cp_id, []))
                if at is not None and since + STOP_GRACE_S < at < until:
                    stopped.fail(
                        f"{cp_id}: session {session_id} metered {kwh:.4f} kWh "
                        f"{at - since:.1f} s after the CP was stopped"
                    )
                    break

    chain.checked = 1
    if not evidence.audit_ok:
        chain.fail(evidence.audit_output.strip()[-500:] or "audit verify failed")

    if evidence.roles:
        dual = Invariant("never two active Centrals at once")
        dual.checked = len(evidence.roles)
        for at, roles in evidence.roles:
            if sum(1 for r in roles if r == "active") > 1:
                dual.fail(f"two active Centrals at {at:.1f} s")
        checks.append(dual)
    return checks


def _capped(row: dict[str, Any], evidence: Evidence) -> bool:
    """A ticket cut short by the balance: the driver has less left than a sample costs."""
    left = evidence.balances_end.get(str(row["driver_id"]), 0)
    sample = evidence.max_kw.get(str(row["cp_id"]), 22.0) / 3600 * float(row["price_eur_kwh"])
    return left <= sample * 100 + 1


def _unshifted(ts: float | None, shifts: list[tuple[float, float, float]]) -> float | None:
    """An engine's ledger time on the real clock: less the shift it ran with then."""
    if ts is None:
        return None
    for start, end, shift in shifts:
        if start <= ts - shift <= end:
            return ts - shift
    return ts
