"""The admin WebSocket's command messages (browser or `ctl` -> Central)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

MAX_COMMAND_BYTES = 4096
ADMIN_COOKIE = "ev_admin_session"  # the admin web's session cookie (docs/web-auth.md)

CPId = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
Ref = Annotated[str, Field(max_length=64)]


class AdminCommand(BaseModel):
    """Stop or resume one CP or all of them; `ref` comes back in the result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["command"] = "command"
    action: Literal["stop", "resume"]
    target: CPId
    ref: Ref = ""


class RegisterCP(BaseModel):
    """Register a new charging point; the result carries its secret, once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["register_cp"] = "register_cp"
    id: CPId
    location: Annotated[str, Field(min_length=1, max_length=120)]
    price_eur_kwh: Annotated[float, Field(ge=0, le=10)]
    max_kw: Annotated[float, Field(gt=0, le=1000)]
    ref: Ref = ""


class RevokeKey(BaseModel):
    """Revoke a CP's current keys: its monitor must authenticate again with its secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["revoke_key"] = "revoke_key"
    target: CPId
    ref: Ref = ""


class ResetSecret(BaseModel):
    """Give a CP a new secret (in the result, once); the old one stops working."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["reset_secret"] = "reset_secret"
    target: CPId
    ref: Ref = ""


AdminRequest = Annotated[
    AdminCommand | RegisterCP | RevokeKey | ResetSecret, Field(discriminator="type")
]
ADMIN_REQUEST: TypeAdapter[AdminRequest] = TypeAdapter(AdminRequest)
