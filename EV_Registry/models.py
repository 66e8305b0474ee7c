"""The REST API's bodies: what a client sends and gets (pydantic; the OpenAPI schema too).

Every input is validated here, at the edge, before anything reaches Central; the limits are
Central's own (EV_Central/admin_api.py), so a body the registry accepts is one Central takes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from EV_Central.admin_api import CPId, EnrolmentToken, EnrolmentTTL, Location, MaxKW, PricePerKWh
from shared.messages import Identifier


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoginForm(Strict):
    """An admin's account at Central and its password."""

    username: Identifier  # as Central's /login takes it (shared/websession.py, WebLogin)
    password: Annotated[str, Field(min_length=1, max_length=256)]


class BearerToken(Strict):
    """The admin's session at Central: send it as `Authorization: Bearer TOKEN`."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"


class NewCP(Strict):
    """A charging point to register."""

    id: CPId
    location: Location
    price_eur_kwh: PricePerKWh
    max_kw: MaxKW


class CP(BaseModel):
    """A registered charging point as Central sees it now."""

    id: str
    location: str
    price_eur_kwh: float
    max_kw: float
    state: str  # ACTIVADO, SUMINISTRANDO, PARADO, AVERIADO or DESCONECTADO
    connected: bool = False
    in_service: bool = True


class RegisteredCP(Strict):
    """A CP just registered, with its secret: shown this once, never again. On a secured
    Kafka, its engine's login too (docs/security.md, "Kafka"), also shown once."""

    id: str
    secret: str
    kafka_user: str | None = None
    kafka_password: str | None = None


class Deregistered(Strict):
    """A CP removed; `settled_session` is the supply it was giving, settled with its ticket."""

    id: str
    settled_session: str | None = None


class EnrolmentRequest(Strict):
    """How long the one-time token stays valid (seconds, 1 min to 7 days; 15 min)."""

    ttl_s: EnrolmentTTL = 900


class Enrolment(Strict):
    """A one-time enrolment token for a CP: give it to the CP's monitor (--enrolment-token)."""

    cp_id: str
    token: str
    expires_at: float  # seconds since the epoch


class Redemption(Strict):
    """What a CP's monitor presents to enrol itself."""

    token: EnrolmentToken


class CPSecret(Strict):
    """The CP's new secret, given once in exchange for its token."""

    cp_id: str
    secret: str


class Problem(BaseModel):
    """Every error: what went wrong, in one line."""

    detail: str
