"""The registry's REST API (FastAPI): each route checks its input, asks Central, maps the answer.

| route | who | what |
|---|---|---|
| POST /auth/login | anyone | an admin's bearer token (a session at Central) |
| GET /cps, GET /cps/{id} | admin | the CPs as Central has them |
| POST /cps | admin | register a CP; its secret, once |
| DELETE /cps/{id} | admin | deregister it (a supply in progress is settled first) |
| POST /cps/{id}/enrolment | admin | a one-time enrolment token for it |
| POST /cps/{id}/enrol | the CP | its new secret in exchange for the token, once |

Errors are `{"detail": "..."}` with 400/422 (bad input), 401 (no or a wrong login), 403 (not
an admin, or a token refused), 404 (no such CP), 409 (already registered), 413 (body too
large), 429 (a source blocked for guessing, with Retry-After) or 502 (Central unreachable).
Central audits every call, naming the caller's address (docs/registry.md).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from EV_Central.admin_api import (
    CPId,
    DeregisterCP,
    EnrolRequest,
    IssueEnrolment,
    ListCPs,
    RegisterCP,
)
from EV_Registry.central import CentralClient, CentralUnreachable, LoginRefused, SessionRefused
from EV_Registry.models import (
    CP,
    BearerToken,
    CPSecret,
    Deregistered,
    Enrolment,
    EnrolmentRequest,
    LoginForm,
    NewCP,
    Problem,
    Redemption,
    RegisteredCP,
)

log = logging.getLogger(__name__)

REF = "registry"  # the `ref` of the registry's commands, echoed in Central's results
LOG_IN_FIRST = "log in first: POST /auth/login, then send Authorization: Bearer TOKEN"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem} for code in (400, 401, 403, 404, 409, 413, 422, 429, 502)
}

CPPath = Annotated[CPId, Path(description="the CP's id")]
# A failed command's `code` at Central (EV_Central/admin_api.py, failure_code) as HTTP.
FAILURE_STATUS = {"not_found": 404, "conflict": 409}
BEARER = HTTPBearer(auto_error=False, description="the token of POST /auth/login")


def session_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> str:
    """The caller's bearer token (Central checks it); 401 without one."""
    if credentials is None:
        raise HTTPException(401, LOG_IN_FIRST, headers={"WWW-Authenticate": "Bearer"})
    return credentials.credentials


Session = Annotated[str, Depends(session_token)]


def caller_of(request: Request) -> str:
    """The HTTP client's address, which Central's audit rows name."""
    return request.client.host if request.client else ""


def create_app(central: CentralClient) -> FastAPI:
    """The API, talking to Central through `central`."""
    app = FastAPI(
        title="EV_Registry",
        version="1",
        description="Register, deregister and enrol the network's charging points. Central "
        "keeps the records; admins log in with their Central account (docs/registry.md).",
        # Swagger UI and ReDoc load their scripts from the internet: only the description.
        docs_url=None,
        redoc_url=None,
        responses=ERRORS,
    )

    async def run(token: str, command: BaseModel) -> dict[str, Any]:
        """Send an admin command; Central's result, or the HTTP error its failure means."""
        result = await central.command(token, command)
        if not result.get("ok"):
            status = FAILURE_STATUS.get(str(result.get("code")), 400)
            raise HTTPException(status, str(result.get("detail") or "refused by Central"))
        return result

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, 422)

    @app.exception_handler(LoginRefused)
    async def login_refused(request: Request, exc: LoginRefused) -> JSONResponse:
        if exc.retry_after:
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
            return JSONResponse({"detail": str(exc)}, 429, headers=headers)
        return JSONResponse({"detail": str(exc)}, 401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(SessionRefused)
    async def session_refused(request: Request, exc: SessionRefused) -> JSONResponse:
        detail = LOG_IN_FIRST if exc.status == 401 else str(exc)
        return JSONResponse({"detail": detail}, exc.status, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(CentralUnreachable)
    async def unreachable(request: Request, exc: CentralUnreachable) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, 502)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "central": central.address}

    @app.post("/auth/login", response_model=BearerToken, tags=["admins"])
    async def login(form: LoginForm) -> BearerToken:
        """Log in with an admin account of Central's (the admin panel's rules: a source that
        guesses is slowed down, then blocked for a while: 429)."""
        return BearerToken(access_token=await central.login(form.username, form.password))

    @app.get("/cps", response_model=list[CP], tags=["charging points"])
    async def list_cps(request: Request, token: Session) -> list[CP]:
        """Every registered CP, with its state now."""
        result = await run(token, ListCPs(caller=caller_of(request), ref=REF))
        return [CP.model_validate(cp) for cp in result.get("charging_points", [])]

    @app.get("/cps/{cp_id}", response_model=CP, tags=["charging points"])
    async def get_cp(cp_id: CPPath, request: Request, token: Session) -> CP:
        """One CP, with its state now."""
        result = await run(token, ListCPs(target=cp_id, caller=caller_of(request), ref=REF))
        return CP.model_validate(result["charging_points"][0])

    @app.post(
        "/cps",
        response_model=RegisteredCP,
        status_code=status.HTTP_201_CREATED,
        tags=["charging points"],
    )
    async def register(cp: NewCP, request: Request, token: Session) -> RegisteredCP:
        """Register a CP. Its secret is in the answer, this once: give it to the CP's
        monitor, or issue an enrolment token instead and let the CP fetch a new one."""
        command = RegisterCP(**cp.model_dump(), caller=caller_of(request), ref=REF)
        result = await run(token, command)
        return RegisteredCP(
            id=cp.id,
            secret=str(result["secret"]),
            kafka_user=result.get("kafka_user"),
            kafka_password=result.get("kafka_password"),
        )

    @app.delete("/cps/{cp_id}", response_model=Deregistered, tags=["charging points"])
    async def deregister(cp_id: CPPath, request: Request, token: Session) -> Deregistered:
        """Deregister a CP: a supply in progress is ended and settled with its ticket; its
        keys and secret are revoked at once, its monitor is closed and refused."""
        result = await run(token, DeregisterCP(target=cp_id, caller=caller_of(request), ref=REF))
        return Deregistered(id=cp_id, settled_session=result.get("settled_session"))

    @app.post(
        "/cps/{cp_id}/enrolment",
        response_model=Enrolment,
        status_code=status.HTTP_201_CREATED,
        tags=["enrolment"],
    )
    async def issue_enrolment(
        cp_id: CPPath,
        request: Request,
        token: Session,
        body: EnrolmentRequest | None = None,
    ) -> Enrolment:
        """A one-time enrolment token for a registered CP (any earlier one stops working)."""
        ttl_s = (body or EnrolmentRequest()).ttl_s
        command = IssueEnrolment(target=cp_id, ttl_s=ttl_s, caller=caller_of(request), ref=REF)
        result = await run(token, command)
        return Enrolment(
            cp_id=cp_id, token=str(result["token"]), expires_at=float(result["expires_at"])
        )

    @app.post("/cps/{cp_id}/enrol", response_model=CPSecret, tags=["enrolment"])
    async def enrol(cp_id: CPPath, redemption: Redemption, request: Request) -> Any:
        """A CP enrols itself: its one-time token for its new secret (no login). The token
        is used up; a wrong, used or expired one is refused (403), and a source that keeps
        trying is blocked for a while (429)."""
        answer = await central.enrol(
            EnrolRequest(cp_id=cp_id, token=redemption.token, caller=caller_of(request))
        )
        if answer.retry_after:
            headers = {"Retry-After": str(max(1, round(answer.retry_after)))}
            return JSONResponse({"detail": answer.reason}, 429, headers=headers)
        if not answer.ok or not answer.secret:
            return JSONResponse({"detail": answer.reason or "enrolment refused"}, 403)
        return CPSecret(cp_id=cp_id, secret=answer.secret)

    return app
