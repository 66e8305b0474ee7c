"""The admin WebSocket's command messages (browser or `ctl` -> Central)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

MAX_COMMAND_BYTES = 4096

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
    """Register a new charging point."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["register_cp"] = "register_cp"
    id: CPId
    location: Annotated[str, Field(min_length=1, max_length=120)]
    price_eur_kwh: Annotated[float, Field(ge=0, le=10)]
    max_kw: Annotated[float, Field(gt=0, le=1000)]
    ref: Ref = ""


AdminRequest = Annotated[AdminCommand | RegisterCP, Field(discriminator="type")]
ADMIN_REQUEST: TypeAdapter[AdminRequest] = TypeAdapter(AdminRequest)
