"""The CP authorises, then the driver hears it: real Central, engine, monitor and driver app.

Central checks a request, then asks the CP's engine; the driver is told "authorised" only
once the engine accepts. An engine that refuses, or does not answer in time, turns the
request into a denial with its reason and no ticket. Central is given a long heartbeat
timeout here, so that it still sees the CP as ready while its engine cannot supply: the
window in which Central and the engine disagree, made wide enough to test.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from helpers import free_port
from procs import Deployment, ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.slow]


@contextmanager
def paused(*processes: ServiceProcess) -> Iterator[None]:
    """Stop processes (SIGSTOP, as a stalled PC would) for the block, then let them go on."""
    for process in processes:
        assert process.proc is not None
        process.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for process in processes:
            assert process.proc is not None
            process.proc.send_signal(signal.SIGCONT)


def events(driver: ServiceProcess, kind: str) -> list[dict]:
    return [e for e in driver.json_events() if e["event"] == kind]


def session_row(system: Deployment, driver_id: str) -> tuple:
    [row] = system.query(
        "SELECT status, reason, kwh, amount_cents FROM sessions WHERE driver_id = ?", driver_id
    )
    return row


async def test_a_cp_that_refuses_turns_the_request_into_a_denial(system: Deployment) -> None:
    system.central_flags["heartbeat_timeout"] = 30
    await system.start_central()
    await system.start_cp("CP001", "--auto-plug", "1")
    engine, monitor = system.engines["CP001"], system.monitors["CP001"]
    with paused(monitor):
        # The engine stops supplying without its monitor; Central does not know it yet.
        await engine.wait_output("monitor lost: refusing supplies", 15)
        driver = system.start_driver("user1", "--cp", "CP001")
        assert await driver.wait_exit(30) == 3, driver.output
    [denied] = events(driver, "denied")
    assert denied["reason"] == "cp_refused"
    assert "monitor lost" in denied["detail"]
    assert events(driver, "authorized") == [] and events(driver, "ticket") == []
    assert session_row(system, "user1") == ("DENIED", "cp_refused", 0.0, 0)
    assert system.balance("user1") == 15000
    await system.wait_state("CP001", "ACTIVADO")  # free again for the next driver


async def test_a_cp_that_does_not_answer_in_time_denies_the_request(
    system: Deployment,
) -> None:
    system.central_flags.update(heartbeat_timeout=30, cp_answer_timeout=2)
    await system.start_central()
    await system.start_cp("CP002", "--auto-plug", "1")
    balance = system.balance("user2")
    engine, monitor = system.engines["CP002"], system.monitors["CP002"]
    with paused(engine, monitor):
        driver = system.start_driver("user2", "--cp", "CP002")
        assert await driver.wait_exit(30) == 3, driver.output
    [denied] = events(driver, "denied")
    assert denied["reason"] == "cp_no_answer"
    assert events(driver, "authorized") == [] and events(driver, "ticket") == []
    assert session_row(system, "user2")[:2] == ("DENIED", "cp_no_answer")
    # Woken up, the engine may still take the old authorisation: Central tells it to forget
    # it, and the CP is ready again, with nothing billed.
    await system.wait_state("CP002", "ACTIVADO")
    start = len(engine.output)
    engine.send("s")
    await engine.wait_output(r"IDLE \(ready\)", 20, start)
    assert system.balance("user2") == balance
    assert [s["status"] for s in await system.api("/api/sessions")] == ["DENIED"]


async def test_an_accepted_request_is_authorised_after_the_engine_answers(
    system: Deployment,
) -> None:
    await system.start_central()
    await system.start_cp("CP003", "--auto-plug", "1", "--auto-unplug", "2")
    driver = system.start_driver("user3", "--cp", "CP003")
    assert await driver.wait_exit(30) == 0, driver.output
    kinds = [e["event"] for e in driver.json_events() if e["event"] != "telemetry"]
    assert kinds.index("accepted") < kinds.index("authorized") < kinds.index("ticket")
    central = system.central
    assert central is not None
    asked = central.output.index("CP003: asking the CP to authorise a supply for user3")
    assert asked < central.output.index("CP003: supply authorised for user3")


async def test_the_cps_menu_shows_what_central_decided(system: Deployment) -> None:
    await system.start_central()
    await system.start_cp("CP004")
    engine = system.engines["CP004"]
    engine.send("r ghost")
    await engine.wait_output("Central denied the supply for driver ghost: unknown_driver", 15)
    engine.send("r user4")
    await engine.wait_output("authorised session .* for driver user4", 15)
    # Reserved for user4, who has not plugged in: a second driver hears so, without a name.
    other = system.start_driver("user5", "--cp", "CP004")
    assert await other.wait_exit(30) == 3
    [denied] = events(other, "denied")
    assert (denied["reason"], denied["detail"]) == (
        "cp_unavailable",
        "CP004 is reserved for another driver",
    )
    [cp] = [cp for cp in await system.api("/api/cps") if cp["id"] == "CP004"]
    assert (cp["state"], cp["reserved"]) == ("ACTIVADO", True)


async def test_a_starting_engine_is_no_fault(system: Deployment) -> None:
    await system.start_central()
    # Engine and monitor together, as `make run` and the compose files start them, and a
    # monitor started well before its engine.
    await system.start_cp("CP001")
    system.engine_ports["CP002"] = free_port()  # where the engine will listen
    system.start_monitor("CP002", *system.tls_flags())
    await asyncio.sleep(1.5)
    assert (await system.cp_states())["CP002"] == "DESCONECTADO"
    system.start_engine("CP002")
    await system.wait_state("CP002", "ACTIVADO", timeout=30)
    central = system.central
    assert central is not None
    assert "AVERIADO" not in central.output, central.output[-3000:]
