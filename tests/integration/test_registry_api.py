"""EV_Registry's REST API over HTTPS against a real Central (TLS too) and a real broker.

One Central and one registry serve the module: logins, every bad input (answered with a clear
error, changing nothing), registration, reads, enrolment tokens and their one use, and the
audit rows that name the HTTP caller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from registry_procs import Registry, central_with_registry

in_module_loop = pytest.mark.asyncio(loop_scope="module")
pytestmark = [pytest.mark.kafka, pytest.mark.e2e, in_module_loop]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def registry(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Registry]:
    async with central_with_registry(kafka_bootstrap, tmp_path_factory) as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def token(registry: Registry) -> str:
    return await registry.login()


async def cp_ids(registry: Registry, token: str) -> list[str]:
    status, cps = await registry.call("GET", "/cps", token=token)
    assert status == 200, cps
    return [cp["id"] for cp in cps]


async def test_logins_are_centrals_and_every_call_needs_an_admin(registry: Registry) -> None:
    status, answer = await registry.call(
        "POST", "/auth/login", {"username": "admin", "password": "wrong"}
    )
    assert status == 401 and "wrong user or password" in answer["detail"]
    assert (await registry.call("GET", "/cps"))[0] == 401
    assert (await registry.call("GET", "/cps", token="x" * 43))[0] == 401
    assert (await registry.call("GET", "/cps", token="bad token!"))[0] == 401
    driver = await registry.login("user1", "pass1")  # a driver's session at Central
    status, answer = await registry.call("GET", "/cps", token=driver)
    assert status == 403, answer
    status, spec = await registry.call("GET", "/openapi.json")
    assert status == 200 and "/cps/{cp_id}/enrolment" in spec["paths"]


BAD_CPS: list[tuple[Any, str]] = [
    ({"id": "CP100", "location": "x", "price_eur_kwh": -1, "max_kw": 22}, "price_eur_kwh"),
    ({"id": "CP100", "location": "x", "price_eur_kwh": 0.3, "max_kw": 0}, "max_kw"),
    ({"id": "CP 100", "location": "x", "price_eur_kwh": 0.3, "max_kw": 22}, "id"),
    ({"id": "CP100", "location": "", "price_eur_kwh": 0.3, "max_kw": 22}, "location"),
    ({"id": "CP100", "location": "x", "price_eur_kwh": 0.3}, "max_kw"),
    ({"id": "CP100", "location": "x", "price_eur_kwh": 0.3, "max_kw": 22, "x": 1}, "x"),
    (["CP100"], "body"),
]


async def test_bad_input_is_refused_with_a_clear_error_and_changes_nothing(
    registry: Registry, token: str
) -> None:
    before = await cp_ids(registry, token)
    for body, where in BAD_CPS:
        status, answer = await registry.call("POST", "/cps", body, token=token)
        assert status == 422 and where in answer["detail"], (body, answer)
    status, answer = await registry.call("POST", "/cps", raw=b"{not json", token=token)
    assert status == 422, answer
    huge = {"id": "CP100", "location": "x" * 20_000, "price_eur_kwh": 0.3, "max_kw": 22}
    status, answer = await registry.call("POST", "/cps", huge, token=token)
    assert status == 413 and "larger than" in answer["detail"]
    status, answer = await registry.call("POST", "/cps", BAD_CPS[0][0] | {"price_eur_kwh": 0.3})
    assert status == 401  # no token: not even checked against Central
    assert await cp_ids(registry, token) == before
    assert (await registry.call("GET", "/cps/NOPE", token=token))[0] == 404
    assert (await registry.call("DELETE", "/cps/NOPE", token=token))[0] == 404
    assert (await registry.call("POST", "/cps/NOPE/enrolment", token=token))[0] == 404
    status, answer = await registry.call("POST", "/cps/CP001/enrolment", {"ttl_s": 5}, token=token)
    assert status == 422 and "ttl_s" in answer["detail"]
    status, answer = await registry.call("POST", "/cps/CP001/enrol", {"token": "short"})
    assert status == 422 and "token" in answer["detail"]


async def test_register_read_enrol_once_and_deregister(registry: Registry, token: str) -> None:
    cp = {"id": "CP100", "location": "Alicante - Test", "price_eur_kwh": 0.31, "max_kw": 11}
    status, answer = await registry.call("POST", "/cps", cp, token=token)
    assert status == 201 and answer["id"] == "CP100" and len(answer["secret"]) >= 20
    status, answer = await registry.call("POST", "/cps", cp, token=token)
    assert status == 409 and "already registered" in answer["detail"]
    status, answer = await registry.call("GET", "/cps/CP100", token=token)
    assert status == 200 and answer["state"] == "DESCONECTADO" and answer["max_kw"] == 11

    status, issued = await registry.call("POST", "/cps/CP100/enrolment", token=token)
    assert status == 201 and issued["cp_id"] == "CP100", issued
    enrol = {"token": issued["token"]}
    assert (await registry.call("POST", "/cps/CP101/enrol", enrol))[0] == 403  # another CP's
    status, answer = await registry.call("POST", "/cps/CP100/enrol", enrol)
    assert status == 200 and answer["cp_id"] == "CP100" and answer["secret"], answer
    status, again = await registry.call("POST", "/cps/CP100/enrol", enrol)
    assert status == 403 and "used or expired" in again["detail"]
    stored = registry.central.query("SELECT COUNT(*) FROM enrolment_tokens")[0][0]
    assert stored == 0  # used up

    status, answer = await registry.call("DELETE", "/cps/CP100", token=token)
    assert status == 200 and answer == {"id": "CP100", "settled_session": None}
    assert (await registry.call("GET", "/cps/CP100", token=token))[0] == 404
    assert registry.central.query("SELECT id FROM charging_points WHERE id = 'CP100'") == []

    audit = await registry.central.api("/api/audit?limit=200")
    rows = {(row["action"], row["outcome"]): row for row in audit}
    for action in ("cp_registered", "enrolment_issued", "cps_listed", "cp_deregistered"):
        assert rows[(action, "ok")]["source"].startswith("127.0.0.1 via 127.0.0.1"), action
        assert rows[(action, "ok")]["actor"] == "admin"
    assert rows[("enrolment", "ok")]["actor"] == "CP100"
    assert rows[("enrolment", "failed")]["source"].startswith("127.0.0.1 via")
