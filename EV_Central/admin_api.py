"""The admin WebSocket's command messages (browser or `ctl` -> Central)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

MAX_COMMAND_BYTES = 4096


class AdminCommand(BaseModel):
    """Stop or resume one CP or all of them; `ref` comes back in the result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["command"] = "command"
    action: Literal["stop", "resume"]
    target: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
    ref: Annotated[str, Field(max_length=64)] = ""


ADMIN_COMMAND: TypeAdapter[AdminCommand] = TypeAdapter(AdminCommand)
