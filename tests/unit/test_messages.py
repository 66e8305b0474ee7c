"""The message models (shared.messages): every model round-trips; bad input is refused."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from shared import messages as m
from shared.errors import MessageError

NOW = 1_700_000_000.0

TICKET = m.TicketData(
    session_id="s1",
    cp_id="CP001",
    driver_id="D1",
    kwh=1.25,
    price_eur_kwh=0.35,
    amount_eur=0.44,
    reason=m.EndReason.UNPLUGGED,
    started_at=NOW - 60,
    ended_at=NOW,
    revision=2,
)

KEY = "A" * 43 + "="  # 32 bytes in base64

# One valid instance of every concrete message model, with every optional field set.
SAMPLES: list[m.Message] = [
    m.MonitorAuth(cp_id="CP001", secret="s3cret"),
    m.AuthResult(
        cp_id="CP001",
        accepted=True,
        reason="ok",
        location="Calle Mayor 1",
        price_eur_kwh=0.35,
        max_kw=22.0,
        key_id="0123456789abcdef",
        key=KEY,
    ),
    m.Heartbeat(cp_id="CP001", engine_ok=True, seq=7),
    m.FaultReport(cp_id="CP001", detail="engine KO"),
    m.RecoveryReport(cp_id="CP001"),
    m.CPStatusNotice(cp_id="CP001", state=m.CPState.PARADO),
    m.CPRemoved(cp_id="CP001", reason="deregistered by an admin"),
    m.ClockProbe(cp_id="CP001", your_offset_s=-0.25),
    m.EngineChallenge(nonce="0123456789abcdef0123456789abcdef"),
    m.EngineHello(cp_id="CP001"),
    m.HealthCheck(seq=3, central_ok=False, cp_state=m.CPState.SUMINISTRANDO),
    m.HealthReport(seq=3, ok=True, engine_state="IDLE"),
    m.EngineKey(cp_id="CP001", key_id="0123456789abcdef", key=KEY),
    m.LoginRequest(
        driver_id="D1", client_key=KEY, nonce="AAAAAAAAAAAAAAAA", sealed_password="c2Vj"
    ),
    m.IdentityQuery(driver_id="D1"),
    m.SupplyRequest(driver_id="D1", cp_id="CP001", origin="cp"),
    m.StopRequest(driver_id="D1", session_id="s1"),
    m.StatusQuery(driver_id="D1"),
    m.HistoryQuery(driver_id="D1", limit=10),
    m.TicketAck(driver_id="D1", session_id="s1"),
    m.LoginResult(
        driver_id="D1",
        request_id="r1",
        ok=True,
        reason=None,
        retry_after=None,
        key_id="0123456789abcdef",
        expires_at=NOW,
        nonce="AAAAAAAAAAAAAAAA",
        sealed="c2Vj",
    ),
    m.CentralIdentity(
        driver_id="D1", request_id="q0", public_key=KEY, fingerprint="0000:1111:2222:3333"
    ),
    m.RequestAccepted(driver_id="D1", cp_id="CP001", request_id="r1", session_id="s1"),
    m.RequestDenied(
        driver_id="D1",
        cp_id="CP001",
        request_id="r1",
        reason=m.DenialReason.DRIVER_BUSY,
        detail="already supplying",
    ),
    m.SupplyAuthorized(
        driver_id="D1", cp_id="CP001", session_id="s1", price_eur_kwh=0.35, expires_at=NOW
    ),
    m.SupplyStarted(driver_id="D1", cp_id="CP001", session_id="s1"),
    m.SupplyProgress(
        driver_id="D1", cp_id="CP001", session_id="s1", kw=7.4, kwh=0.5, amount_eur=0.18
    ),
    m.Ticket(ticket=TICKET),
    m.DriverHistory(driver_id="D1", request_id="q2", known=True, balance_eur=12.5, tickets=[]),
    m.DriverStatus(
        driver_id="D1",
        request_id="q1",
        known=True,
        balance_eur=20.0,
        active_session=m.SessionInfo(
            session_id="s2", cp_id="CP002", status="SUPPLYING", kw=7.4, kwh=0.1, amount_eur=0.04
        ),
        unseen_tickets=[TICKET],
        available_cps=[
            m.CPSummary(
                cp_id="CP001",
                location="Calle Mayor 1",
                price_eur_kwh=0.35,
                state=m.CPState.ACTIVADO,
            )
        ],
    ),
    m.DriverNotice(driver_id="D1", level="error", text="no supply to stop"),
    m.AuthorizeSupply(
        cp_id="CP001",
        session_id="s1",
        driver_id="D1",
        price_eur_kwh=0.35,
        max_kw=22.0,
        max_kwh=10.0,
        expires_at=NOW,
    ),
    m.StartSupply(cp_id="CP001", session_id="s1"),
    m.EndSupply(cp_id="CP001", session_id="s1", reason=m.EndReason.STOPPED_BY_ADMIN),
    m.SetService(cp_id="CP001", in_service=False),
    m.CPRequestDenied(
        cp_id="CP001",
        driver_id="D1",
        request_id="r1",
        reason=m.DenialReason.CP_UNAVAILABLE,
        detail="CP001 is PARADO",
    ),
    m.CPAuthorisation(cp_id="CP001", session_id="s1", accepted=False, reason="engine KO"),
    m.CPPlugged(cp_id="CP001", session_id="s1"),
    m.CPTelemetry(cp_id="CP001", session_id="s1", seq=4, kw=7.4, kwh=0.5, amount_eur=0.18),
    m.CPSupplyEnded(
        cp_id="CP001",
        session_id="s1",
        kwh=0.5,
        amount_eur=0.18,
        reason=m.EndReason.ENGINE_FAULT,
        started_at=NOW - 60,
    ),
    m.CPRequest(cp_id="CP001", driver_id="D1"),
    m.CPStateUpdate(
        cp_id="CP001",
        state=m.CPState.SUMINISTRANDO,
        location="Calle Mayor 1",
        price_eur_kwh=0.35,
        max_kw=22.0,
        driver_id="D1",
        session_id="s1",
        kw=7.4,
        kwh=0.5,
        amount_eur=0.18,
    ),
    m.HealthSample(cp_id="CP001", engine_ok=True, central_ok=True, rtt_ms=1.5),
]

# Each channel's union, with its module-level adapter.
CHANNELS: dict[str, tuple[Any, TypeAdapter[Any]]] = {
    "MONITOR_TO_CENTRAL": (m.MonitorToCentral, m.MONITOR_TO_CENTRAL),
    "CENTRAL_TO_MONITOR": (m.CentralToMonitor, m.CENTRAL_TO_MONITOR),
    "MONITOR_TO_ENGINE": (m.MonitorToEngine, m.MONITOR_TO_ENGINE),
    "ENGINE_TO_MONITOR": (m.EngineToMonitor, m.ENGINE_TO_MONITOR),
    "DRIVER_REQUESTS": (m.DriverRequest, m.DRIVER_REQUESTS),
    "DRIVER_UPDATES": (m.DriverUpdate, m.DRIVER_UPDATES),
    "CP_COMMANDS": (m.CPCommand, m.CP_COMMANDS),
    "CP_EVENTS": (m.CPEvent, m.CP_EVENTS),
    "CP_STATE": (m.CPStateMessage, m.CP_STATE),
    "CP_HEALTH": (m.CPHealthMessage, m.CP_HEALTH),
}


def members(union: Any) -> tuple[type[BaseModel], ...]:
    """The models of an Annotated discriminated union (or of a single-model channel)."""
    inner = typing.get_args(union)[0]
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        return typing.get_args(inner)
    return (inner,)


def all_message_models() -> set[type[m.Message]]:
    found: set[type[m.Message]] = set()
    pending = list(m.Message.__subclasses__())
    while pending:
        cls = pending.pop()
        found.add(cls)
        pending += cls.__subclasses__()
    return {cls for cls in found if cls.__module__ == m.__name__}


def channel_of(model: type[BaseModel]) -> list[str]:
    return [name for name, (union, _) in CHANNELS.items() if model in members(union)]


def test_every_adapter_is_covered() -> None:
    adapters = {name for name, value in vars(m).items() if isinstance(value, TypeAdapter)}
    assert adapters == set(CHANNELS), "a new channel adapter needs an entry in CHANNELS"


def test_every_model_has_a_sample_and_a_channel() -> None:
    in_unions = {model for union, _ in CHANNELS.values() for model in members(union)}
    sampled = {type(sample) for sample in SAMPLES}
    assert in_unions == sampled, "every union member needs exactly one sample here"
    assert all_message_models() == in_unions, "every Message model must belong to a channel"
    assert len(SAMPLES) == len(sampled)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.type)
def test_round_trip_through_its_channel(sample: m.Message) -> None:
    (channel,) = channel_of(type(sample))
    _, adapter = CHANNELS[channel]
    data = m.encode(sample)
    assert isinstance(data, bytes)
    decoded = m.decode(adapter, data)
    assert type(decoded) is type(sample)
    assert decoded == sample
    assert json.loads(data)["type"] == getattr(sample, "type")  # noqa: B009


def test_envelope_defaults_are_unique_and_current() -> None:
    a, b = m.StatusQuery(driver_id="D1"), m.StatusQuery(driver_id="D1")
    assert a.id != b.id
    assert a.v == m.SCHEMA_VERSION == 1
    assert a.ts > 0


def test_models_are_frozen() -> None:
    query = m.StatusQuery(driver_id="D1")
    with pytest.raises(ValueError, match="frozen"):
        query.driver_id = "D2"  # type: ignore[misc]


def _heartbeat(**changes: Any) -> bytes:
    body = json.loads(m.encode(m.Heartbeat(cp_id="CP001", engine_ok=True)))
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def test_valid_raw_payload_decodes() -> None:
    message = m.decode(m.MONITOR_TO_CENTRAL, _heartbeat())
    assert isinstance(message, m.Heartbeat)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{not json", "invalid message"),
        (b"\xff\xfe", "invalid message"),
        (b"[]", "invalid message"),
        (_heartbeat(type="warp_drive"), "warp_drive"),
        (_heartbeat(cp_id=...), "cp_id"),
        (_heartbeat(colour="blue"), "colour"),
        (_heartbeat(cp_id="CP 001"), "cp_id"),
        (_heartbeat(cp_id="x" * 33), "cp_id"),
        (_heartbeat(v=2), "v"),
        (_heartbeat(engine_ok="perhaps"), "engine_ok"),
    ],
    ids=[
        "invalid-json",
        "not-utf8",
        "not-an-object",
        "unknown-type",
        "missing-field",
        "extra-field",
        "bad-identifier",
        "long-identifier",
        "wrong-version",
        "wrong-field-type",
    ],
)
def test_bad_payloads_raise_message_error(data: bytes, expected: str) -> None:
    with pytest.raises(MessageError, match="invalid message") as caught:
        m.decode(m.MONITOR_TO_CENTRAL, data)
    assert expected in str(caught.value)


def test_message_of_another_channel_is_refused() -> None:
    with pytest.raises(MessageError, match="invalid message"):
        m.decode(m.MONITOR_TO_CENTRAL, m.encode(m.StatusQuery(driver_id="D1")))


def test_oversized_payload_is_refused_before_parsing() -> None:
    data = b" " * (m.MAX_MESSAGE_BYTES + 1)
    with pytest.raises(MessageError, match="exceeds the maximum"):
        m.decode(m.MONITOR_TO_CENTRAL, data)
    with pytest.raises(MessageError, match="100 bytes exceeds the maximum of 99"):
        m.decode(m.MONITOR_TO_CENTRAL, b"x" * 100, max_bytes=99)


def test_bad_identifier_refused_when_building_a_model() -> None:
    with pytest.raises(ValueError, match="pattern"):
        m.StatusQuery(driver_id="no spaces")
