"""The admin WebSocket's command messages (browser or `ctl` -> Central)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

MAX_COMMAND_BYTES = 4096
ADMIN_COOKIE = "ev_admin_session"  # the admin web's session cookie (docs/web-auth.md)

CPId = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
Ref = Annotated[str, Field(max_length=64)]
# The address of the client a service acts for (EV_Registry passes its HTTP caller's): the audit
# log then names "CALLER via PEER". Informative only: who is checked is the session or the peer.
Caller = Annotated[str, Field(max_length=45, pattern=r"^[0-9A-Fa-f.:]*$")]
# A CP's figures and an enrolment's limits, shared with EV_Registry's REST bodies.
Location = Annotated[str, Field(min_length=1, max_length=120)]
PricePerKWh = Annotated[float, Field(ge=0, le=10)]
MaxKW = Annotated[float, Field(gt=0, le=1000)]
EnrolmentTTL = Annotated[int, Field(ge=60, le=7 * 24 * 3600)]  # seconds
# A one-time enrolment token: URL-safe text (EV_Central/enrolment.py makes them).
EnrolmentToken = Annotated[str, Field(min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]


def source_of(caller: str, peer: str) -> str:
    """Where a command or an enrolment came from, for the audit log: "CALLER via PEER"."""
    return f"{caller} via {peer}" if caller else peer


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
    location: Location
    price_eur_kwh: PricePerKWh
    max_kw: MaxKW
    caller: Caller = ""
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


class DeregisterCP(BaseModel):
    """Remove a CP for good: a supply in progress is settled with its ticket first, its keys,
    secret and enrolment token go, its monitor is closed and refused (docs/registry.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["deregister_cp"] = "deregister_cp"
    target: CPId
    caller: Caller = ""
    ref: Ref = ""


class IssueEnrolment(BaseModel):
    """A one-time enrolment token for a registered CP (in the result, once), valid `ttl_s`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["issue_enrolment"] = "issue_enrolment"
    target: CPId
    ttl_s: EnrolmentTTL = 900
    caller: Caller = ""
    ref: Ref = ""


class ListCPs(BaseModel):
    """Every CP, or the one `target` names, as /api/cps shows them; audited, unlike a GET."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["list_cps"] = "list_cps"
    target: CPId | None = None
    caller: Caller = ""
    ref: Ref = ""


def failure_code(exc: Exception) -> str:
    """The `code` of a failed command's result: `not_found` (no such CP) or `conflict`
    (the command does not fit the CP's state, e.g. an id registered already)."""
    return "not_found" if isinstance(exc, LookupError) else "conflict"


AdminRequest = Annotated[
    AdminCommand | RegisterCP | RevokeKey | ResetSecret | DeregisterCP | IssueEnrolment | ListCPs,
    Field(discriminator="type"),
]
ADMIN_REQUEST: TypeAdapter[AdminRequest] = TypeAdapter(AdminRequest)


# --- enrolment: the admin web's public /enrol WebSocket (no login; EV_Central/enrolment.py) --

ENROL_PATH = "/enrol"


class EnrolRequest(BaseModel):
    """The one message on /enrol: a CP's id and its one-time token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["enrol"] = "enrol"
    cp_id: CPId
    token: EnrolmentToken
    caller: Caller = ""


class EnrolResult(BaseModel):
    """The answer: the CP's new secret (once), or why not."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["enrol_result"] = "enrol_result"
    cp_id: str
    ok: bool
    secret: str | None = None
    reason: str = ""
    retry_after: float | None = None
