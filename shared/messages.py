"""Every message the services exchange, one pydantic model each.

Each message carries a `type` literal, a unique `id`, a timestamp `ts` (seconds since the
epoch, UTC) and a schema version `v`. Models are grouped in discriminated unions, one per
channel, and validated once where they enter a service with the module-level adapters below.
docs/protocol.md shows an example of each.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from shared.errors import MessageError

SCHEMA_VERSION: Literal[1] = 1
MAX_MESSAGE_BYTES = 64 * 1024

Identifier = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
Money = Annotated[float, Field(ge=0, le=1_000_000)]
Energy = Annotated[float, Field(ge=0, le=1_000_000)]
Power = Annotated[float, Field(ge=0, le=10_000)]
Text = Annotated[str, Field(max_length=500)]
# How many times faster than real time an engine's simulated clock runs (1: real time). A demo
# engine with --speed 60 supplies a minute's energy every second; the screens say so.
MAX_SPEED = 3600.0
TimeScale = Annotated[float, Field(gt=0, le=MAX_SPEED)]
# A time or an offset in seconds: finite, and no further from 0 than ~300 years.
Seconds = Annotated[float, Field(allow_inf_nan=False, ge=-1e10, le=1e10)]


def new_id() -> str:
    return uuid.uuid4().hex


class CPState(StrEnum):
    """The five states of a charging point, as Central sees it."""

    ACTIVADO = "ACTIVADO"
    SUMINISTRANDO = "SUMINISTRANDO"
    PARADO = "PARADO"
    AVERIADO = "AVERIADO"
    DESCONECTADO = "DESCONECTADO"


STATE_COLOURS: dict[CPState, str] = {
    CPState.ACTIVADO: "green",
    CPState.SUMINISTRANDO: "green",
    CPState.PARADO: "orange",
    CPState.AVERIADO: "red",
    CPState.DESCONECTADO: "grey",
}


class DenialReason(StrEnum):
    UNKNOWN_DRIVER = "unknown_driver"
    UNKNOWN_CP = "unknown_cp"
    CP_UNAVAILABLE = "cp_unavailable"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    DRIVER_BUSY = "driver_busy"
    REQUEST_EXPIRED = "request_expired"
    CP_REFUSED = "cp_refused"  # the engine refused Central's authorisation
    CP_NO_ANSWER = "cp_no_answer"  # the engine did not answer it in time


class EndReason(StrEnum):
    UNPLUGGED = "unplugged"
    ENGINE_FAULT = "engine_fault"
    ENGINE_LOST = "engine_lost"
    MONITOR_LOST = "monitor_lost"
    STOPPED_BY_ADMIN = "stopped_by_admin"
    DRIVER_STOP = "driver_stop"
    BALANCE_EXHAUSTED = "balance_exhausted"
    AUTHORIZATION_EXPIRED = "authorization_expired"
    WEATHER = "weather"  # Central put the CP out of service for frost (EV_W, docs/weather.md)


class Message(BaseModel):
    """Envelope fields every message has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(min_length=1, max_length=64)] = Field(default_factory=new_id)
    ts: float = Field(default_factory=time.time)
    v: Literal[1] = SCHEMA_VERSION


# --- socket frames: monitor <-> Central (:5000) -------------------------------------------


class MonitorAuth(Message):
    type: Literal["auth"] = "auth"
    cp_id: Identifier
    secret: Annotated[str, Field(max_length=256)] | None = None


KeyText = Annotated[str, Field(min_length=44, max_length=44)]  # 32 bytes in base64
KeyId = Annotated[str, Field(min_length=8, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]
B64Text = Annotated[str, Field(max_length=4096)]


class AuthResult(Message):
    """Central's answer to a monitor; on success it carries the CP's fresh key (base64)."""

    type: Literal["auth_result"] = "auth_result"
    cp_id: Identifier
    accepted: bool
    reason: Text | None = None
    location: Text | None = None
    price_eur_kwh: Money | None = None
    max_kw: Power | None = None
    key_id: KeyId | None = None
    key: KeyText | None = None
    # A standby Central's refusal names the active one (HOST:PORT), when it knows it.
    active_central: Text | None = None
    # Central's clock minus the network's, as Central measures it (docs/operations.md).
    central_offset_s: Seconds | None = None


class Heartbeat(Message):
    type: Literal["heartbeat"] = "heartbeat"
    cp_id: Identifier
    engine_ok: bool
    seq: Annotated[int, Field(ge=0)] = 0
    speed: TimeScale = 1.0  # the engine's time scale, as its last health report said
    # Clocks (docs/operations.md): the last ClockProbe this heartbeat answers (its `ts`, and
    # when the monitor got it, on the monitor's clock), and the monitor's measurement of its
    # engine's clock (engine minus monitor) with the round trip it took.
    probe_ts: Seconds | None = None
    probe_rx: Seconds | None = None
    engine_offset_s: Seconds | None = None
    engine_trip_s: Seconds | None = None


class FaultReport(Message):
    type: Literal["fault"] = "fault"
    cp_id: Identifier
    detail: Text = ""


class RecoveryReport(Message):
    type: Literal["recovered"] = "recovered"
    cp_id: Identifier


class ClockProbe(Message):
    """Central's clock (`ts`), which the monitor answers in its next heartbeat, as NTP does;
    with how far the monitor's clock is from the network's, as Central last measured it."""

    type: Literal["clock"] = "clock"
    cp_id: Identifier
    your_offset_s: Seconds | None = None
    central_offset_s: Seconds | None = None  # Central's clock minus the network's


class CPStatusNotice(Message):
    """Central tells a monitor the state it shows for its CP (for the monitor's screen)."""

    type: Literal["cp_status"] = "cp_status"
    cp_id: Identifier
    state: CPState


class CPRemoved(Message):
    """Central tells an authenticated monitor that its CP was deregistered: from now on Central
    refuses it, so the monitor stops trying (its retries would get its PC's address blocked)."""

    type: Literal["cp_removed"] = "cp_removed"
    cp_id: Identifier
    reason: Annotated[str, Field(max_length=200)] = ""


MonitorToCentral = Annotated[
    MonitorAuth | Heartbeat | FaultReport | RecoveryReport, Field(discriminator="type")
]
CentralToMonitor = Annotated[
    AuthResult | CPStatusNotice | ClockProbe | CPRemoved, Field(discriminator="type")
]


# --- socket frames: monitor <-> engine ----------------------------------------------------


class EngineChallenge(Message):
    """The engine's first frame on a new connection: a fresh nonce that the monitor's proof
    must cover, so that a hello recorded once is worth nothing later (no clock involved)."""

    type: Literal["challenge"] = "challenge"
    nonce: Annotated[str, Field(min_length=32, max_length=32, pattern=r"^[0-9a-f]+$")]


class EngineHello(Message):
    """The monitor tells its engine which CP it is, proving it knows the CP's secret
    (`proof`: see shared.sealing.hello_proof, over the engine's challenge) when the engine was
    given the secret too."""

    type: Literal["hello"] = "hello"
    cp_id: Identifier
    proof: Annotated[str, Field(min_length=64, max_length=64)] | None = None


class HealthCheck(Message):
    type: Literal["health_check"] = "health_check"
    seq: Annotated[int, Field(ge=0)]
    central_ok: bool
    cp_state: CPState | None = None
    # Central's clock minus the network's, as Central last told the monitor: the engine reads
    # the `ts` Central writes in its commands with it (a replayed old command is refused).
    central_offset_s: Seconds | None = None


class HealthReport(Message):
    type: Literal["health_report"] = "health_report"
    seq: Annotated[int, Field(ge=0)]
    ok: bool
    engine_state: Text = ""
    # Still starting (not listening to Central's commands yet): not ready, but no fault.
    starting: bool = False
    speed: TimeScale = 1.0  # the engine's --speed


class EngineKey(Message):
    """The monitor hands its engine the key Central issued at authentication (or None when
    Central revoked it): the engine seals its events and opens Central's commands with it."""

    type: Literal["key"] = "key"
    cp_id: Identifier
    key_id: KeyId | None = None
    key: KeyText | None = None


MonitorToEngine = Annotated[EngineHello | HealthCheck | EngineKey, Field(discriminator="type")]
EngineToMonitor = Annotated[HealthReport | EngineChallenge, Field(discriminator="type")]


# --- Kafka: driver requests (Driver -> Central), key = driver id --------------------------


class LoginRequest(Message):
    """A driver's login: the password is encrypted to Central's identity key (X25519 +
    AES-GCM, see shared/sealing.py), so only Central can read it."""

    type: Literal["login"] = "login"
    driver_id: Identifier
    client_key: KeyText
    nonce: Annotated[str, Field(min_length=16, max_length=16)]
    sealed_password: B64Text


class IdentityQuery(Message):
    """Ask Central for its identity (public) key, when the driver has none pinned."""

    type: Literal["identity_query"] = "identity_query"
    driver_id: Identifier


class SupplyRequest(Message):
    """A driver asks for a supply; `origin` says whether it came from the CP's own menu."""

    type: Literal["supply_request"] = "supply_request"
    driver_id: Identifier
    cp_id: Identifier
    origin: Literal["driver", "cp"] = "driver"


class StopRequest(Message):
    type: Literal["stop_request"] = "stop_request"
    driver_id: Identifier
    session_id: Identifier | None = None


class StatusQuery(Message):
    type: Literal["status_query"] = "status_query"
    driver_id: Identifier


class TicketAck(Message):
    """The driver has shown a ticket (that revision); Central stops offering it as unseen. A
    correction made after the revision shown stays unseen until it is shown too."""

    type: Literal["ticket_ack"] = "ticket_ack"
    driver_id: Identifier
    session_id: Identifier
    revision: Annotated[int, Field(ge=1)] = 1


class HistoryQuery(Message):
    """The driver's balance and latest tickets (for the dashboard's history)."""

    type: Literal["history_query"] = "history_query"
    driver_id: Identifier
    limit: Annotated[int, Field(ge=1, le=100)] = 20


DriverRequest = Annotated[
    LoginRequest
    | IdentityQuery
    | SupplyRequest
    | StopRequest
    | StatusQuery
    | TicketAck
    | HistoryQuery,
    Field(discriminator="type"),
]


# --- Kafka: driver updates (Central -> Driver), key = driver id ---------------------------


class TicketData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: Identifier
    cp_id: Identifier
    driver_id: Identifier
    kwh: Energy
    price_eur_kwh: Money
    amount_eur: Money
    reason: EndReason
    started_at: float | None
    ended_at: float
    revision: Annotated[int, Field(ge=1)] = 1


class SessionInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: Identifier
    cp_id: Identifier
    status: Text
    kw: Power = 0.0
    kwh: Energy = 0.0
    amount_eur: Money = 0.0


class CPSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cp_id: Identifier
    location: Text
    price_eur_kwh: Money
    state: CPState


class LoginResult(Message):
    """Central's answer to a login. On success `sealed` holds, encrypted for the requester only,
    the session key (JSON: key, balance_eur); `key_id` names it, `expires_at` ends it."""

    type: Literal["login_result"] = "login_result"
    driver_id: Identifier
    request_id: Identifier
    ok: bool
    reason: Text | None = None
    retry_after: Annotated[float, Field(ge=0)] | None = None
    key_id: KeyId | None = None
    expires_at: float | None = None
    nonce: Annotated[str, Field(min_length=16, max_length=16)] | None = None
    sealed: B64Text | None = None


class CentralIdentity(Message):
    """Central's identity public key (X25519, base64) and its fingerprint."""

    type: Literal["central_identity"] = "central_identity"
    driver_id: Identifier
    request_id: Identifier
    public_key: KeyText
    fingerprint: Text


class RequestAccepted(Message):
    type: Literal["request_accepted"] = "request_accepted"
    driver_id: Identifier
    cp_id: Identifier
    request_id: Identifier
    session_id: Identifier


class RequestDenied(Message):
    type: Literal["request_denied"] = "request_denied"
    driver_id: Identifier
    cp_id: Identifier
    request_id: Identifier
    reason: DenialReason
    detail: Text = ""


class SupplyAuthorized(Message):
    type: Literal["supply_authorized"] = "supply_authorized"
    driver_id: Identifier
    cp_id: Identifier
    session_id: Identifier
    price_eur_kwh: Money
    expires_at: float


class SupplyStarted(Message):
    type: Literal["supply_started"] = "supply_started"
    driver_id: Identifier
    cp_id: Identifier
    session_id: Identifier


class SupplyProgress(Message):
    type: Literal["supply_progress"] = "supply_progress"
    driver_id: Identifier
    cp_id: Identifier
    session_id: Identifier
    kw: Power
    kwh: Energy
    amount_eur: Money


class Ticket(Message):
    type: Literal["ticket"] = "ticket"
    ticket: TicketData


class DriverStatus(Message):
    type: Literal["driver_status"] = "driver_status"
    driver_id: Identifier
    request_id: Identifier
    known: bool
    balance_eur: Money | None = None
    active_session: SessionInfo | None = None
    unseen_tickets: list[TicketData] = Field(default_factory=list, max_length=50)
    available_cps: list[CPSummary] = Field(default_factory=list, max_length=20_000)


class DriverHistory(Message):
    type: Literal["driver_history"] = "driver_history"
    driver_id: Identifier
    request_id: Identifier
    known: bool
    balance_eur: Money | None = None
    tickets: list[TicketData] = Field(default_factory=list, max_length=100)


class DriverNotice(Message):
    """Anything else a driver should see, e.g. a stop request for no supply."""

    type: Literal["notice"] = "notice"
    driver_id: Identifier
    level: Literal["info", "error"] = "info"
    text: Text


DriverUpdate = Annotated[
    LoginResult
    | CentralIdentity
    | RequestAccepted
    | RequestDenied
    | SupplyAuthorized
    | SupplyStarted
    | SupplyProgress
    | Ticket
    | DriverStatus
    | DriverHistory
    | DriverNotice,
    Field(discriminator="type"),
]


# --- Kafka: CP commands (Central -> Engine), key = cp id -----------------------------------


class AuthorizeSupply(Message):
    type: Literal["authorize_supply"] = "authorize_supply"
    cp_id: Identifier
    session_id: Identifier
    driver_id: Identifier
    price_eur_kwh: Money
    max_kw: Power
    max_kwh: Energy | None = None
    expires_at: float


class EndSupply(Message):
    type: Literal["end_supply"] = "end_supply"
    cp_id: Identifier
    session_id: Identifier
    reason: EndReason


class StartSupply(Message):
    """Central's word that a plugged-in supply may begin: the session is SUPPLYING at Central.

    An engine meters no energy before it, so that a supply Central no longer stands behind (an
    authorisation it withdrew, one that expired) never delivers energy that no ticket bills.
    """

    type: Literal["start_supply"] = "start_supply"
    cp_id: Identifier
    session_id: Identifier


class SetService(Message):
    """Central stops (PARADO) or resumes a CP."""

    type: Literal["set_service"] = "set_service"
    cp_id: Identifier
    in_service: bool


class CPRequestDenied(Message):
    """A request made at the CP's own menu that Central denied (so the CP can show why)."""

    type: Literal["cp_request_denied"] = "cp_request_denied"
    cp_id: Identifier
    driver_id: Identifier
    request_id: Identifier
    reason: DenialReason
    detail: Text = ""


CPCommand = Annotated[
    AuthorizeSupply | StartSupply | EndSupply | SetService | CPRequestDenied,
    Field(discriminator="type"),
]


# --- Kafka: CP events (Engine -> Central), key = cp id -------------------------------------


class CPPlugged(Message):
    type: Literal["cp_plugged"] = "cp_plugged"
    cp_id: Identifier
    session_id: Identifier


class CPTelemetry(Message):
    type: Literal["cp_telemetry"] = "cp_telemetry"
    cp_id: Identifier
    session_id: Identifier
    seq: Annotated[int, Field(ge=0)]
    kw: Power
    kwh: Energy
    amount_eur: Money


class CPSupplyEnded(Message):
    type: Literal["cp_supply_ended"] = "cp_supply_ended"
    cp_id: Identifier
    session_id: Identifier
    kwh: Energy
    amount_eur: Money
    reason: EndReason
    started_at: float | None = None


class CPAuthorisation(Message):
    """The engine's answer to an authorisation: accepted, or refused with the reason."""

    type: Literal["cp_authorisation"] = "cp_authorisation"
    cp_id: Identifier
    session_id: Identifier
    accepted: bool
    reason: Text = ""


class CPRequest(Message):
    """A supply asked for at the CP's own menu, on behalf of a driver."""

    type: Literal["cp_request"] = "cp_request"
    cp_id: Identifier
    driver_id: Identifier


CPEvent = Annotated[
    CPAuthorisation | CPPlugged | CPTelemetry | CPSupplyEnded | CPRequest,
    Field(discriminator="type"),
]


# --- Kafka: CP state (Central -> all, compacted) and CP health (Monitor -> dashboards) ----


class CPStateUpdate(Message):
    type: Literal["cp_state"] = "cp_state"
    cp_id: Identifier
    state: CPState
    # ACTIVADO but held for a driver who has not plugged in yet (who is not said).
    reserved: bool = False
    location: Text
    price_eur_kwh: Money
    max_kw: Power
    driver_id: Identifier | None = None
    session_id: Identifier | None = None
    kw: Power = 0.0
    kwh: Energy = 0.0
    amount_eur: Money = 0.0
    speed: TimeScale = 1.0  # the engine's time scale, as its monitor reports it
    # Why a PARADO CP is out of service ("stopped by an admin", "weather: -2.0 °C at …").
    stop_reason: Text = ""


class HealthSample(Message):
    """One health check as the monitor saw it (published after every check)."""

    type: Literal["health_sample"] = "health_sample"
    cp_id: Identifier
    engine_ok: bool
    central_ok: bool
    rtt_ms: Annotated[float, Field(ge=0)] | None = None
    # What the monitor saw when the check failed (the same text as its FaultReport).
    detail: Text = ""
    # The state Central last told the monitor for this CP (None while Central is unreachable).
    cp_state: CPState | None = None
    # The monitor's sample counter (restarts at 0 with the monitor) and its check period.
    seq: Annotated[int, Field(ge=0)] = 0
    interval_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    # The engine's time scale, from its last health report.
    speed: TimeScale = 1.0
    # The monitor's and the engine's clocks minus the network's (None until measured).
    monitor_offset_s: Seconds | None = None
    engine_offset_s: Seconds | None = None


CPStateMessage = Annotated[CPStateUpdate, Field(discriminator="type")]
CPHealthMessage = Annotated[HealthSample, Field(discriminator="type")]


# --- adapters and codec ---------------------------------------------------------------------

MONITOR_TO_CENTRAL: TypeAdapter[MonitorToCentral] = TypeAdapter(MonitorToCentral)
CENTRAL_TO_MONITOR: TypeAdapter[CentralToMonitor] = TypeAdapter(CentralToMonitor)
MONITOR_TO_ENGINE: TypeAdapter[MonitorToEngine] = TypeAdapter(MonitorToEngine)
ENGINE_TO_MONITOR: TypeAdapter[EngineToMonitor] = TypeAdapter(EngineToMonitor)
DRIVER_REQUESTS: TypeAdapter[DriverRequest] = TypeAdapter(DriverRequest)
DRIVER_UPDATES: TypeAdapter[DriverUpdate] = TypeAdapter(DriverUpdate)
CP_COMMANDS: TypeAdapter[CPCommand] = TypeAdapter(CPCommand)
CP_EVENTS: TypeAdapter[CPEvent] = TypeAdapter(CPEvent)
CP_STATE: TypeAdapter[CPStateMessage] = TypeAdapter(CPStateMessage)
CP_HEALTH: TypeAdapter[CPHealthMessage] = TypeAdapter(CPHealthMessage)

T = TypeVar("T")


def encode(message: Message) -> bytes:
    """Serialise a message to compact UTF-8 JSON."""
    return message.model_dump_json().encode("utf-8")


def decode(adapter: TypeAdapter[T], data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> T:
    """Validate raw bytes against a channel's union; raise MessageError with a clear reason."""
    if len(data) > max_bytes:
        raise MessageError(f"message of {len(data)} bytes exceeds the maximum of {max_bytes}")
    try:
        return adapter.validate_json(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if not errors:
            raise MessageError(f"invalid message: {exc}") from None
        where = ".".join(str(p) for p in errors[0]["loc"]) or "message"
        raise MessageError(f"invalid message at {where}: {errors[0]['msg']}") from None
