"""The rule for a supply request: ask the CP to authorise it (reserving the CP) or deny it.

Central's checks come first (the driver, the CP, the balance); a request that passes them is
not yet authorised: the CP's engine is asked, and the driver hears "authorised" only when it
accepts (EV_Central/session.py, `Session.engine_answered`).

Pure, like EV_Central/session.py: the caller passes what it knows of the driver and the CP and
the time, and gets the new session and the messages to publish.
"""

from __future__ import annotations

from dataclasses import dataclass

from EV_Central.pricing import decide_request, max_kwh_for
from EV_Central.session import Effects, Note, Session, SessionStatus, Timers
from shared.messages import (
    AuthorizeSupply,
    DenialReason,
    RequestAccepted,
)


@dataclass(frozen=True)
class SupplyAsk:
    """A request for a supply, from a driver or a CP's own menu."""

    request_id: str
    # When the broker took the request, on Central's clock (never the sender's: it may be off).
    sent_at: float
    driver_id: str
    cp_id: str
    origin: str


@dataclass(frozen=True)
class CPOffer:
    """What the request needs to know of the CP it names."""

    cp_id: str
    price_eur_kwh: float
    max_kw: float
    available: bool
    unavailable_detail: str = ""


def decide_supply(
    ask: SupplyAsk,
    cp: CPOffer | None,
    *,
    driver_known: bool,
    driver_busy: bool,
    balance_cents: int,
    session_id: str,
    now: float,
    timers: Timers,
) -> tuple[Session, Effects]:
    """Ask the CP to authorise a request (the CP is then reserved for it) or deny it."""
    price = cp.price_eur_kwh if cp else 0.0
    reason = decide_request(
        driver_known=driver_known,
        cp_known=cp is not None,
        cp_available=cp is not None and cp.available,
        driver_busy=driver_busy,
        balance_cents=balance_cents,
        price_eur_kwh=price,
        age_s=now - ask.sent_at,
        max_age_s=timers.request_ttl,
    )
    session = Session(
        session_id=session_id,
        cp_id=ask.cp_id,
        driver_id=ask.driver_id,
        status=SessionStatus.ASKED,
        price_eur_kwh=price,
        max_kw=cp.max_kw if cp else 0.0,
        origin=ask.origin,
        request_id=ask.request_id,
        requested_at=ask.sent_at,
    )
    if reason is not None or cp is None:
        session.status = SessionStatus.DENIED
        session.reason = (reason or DenialReason.UNKNOWN_CP).value
        denial = reason or DenialReason.UNKNOWN_CP
        detail = cp.unavailable_detail if cp and reason == DenialReason.CP_UNAVAILABLE else ""
        if reason == DenialReason.REQUEST_EXPIRED:
            # Judged by the broker's stamp, not the sender's clock: it waited, e.g. for Central.
            detail = (
                f"it waited {now - ask.sent_at:.0f} s in Kafka before Central read it"
                f" (at most {timers.request_ttl:g} s)"
            )
        publish = [session.to_driver(session.denial(denial, detail))]
        if ask.origin == "cp" and cp is not None:
            publish.append(session.to_engine(session.cp_denial(denial, detail)))
        note = Note("denied", f"{ask.cp_id}: request from {ask.driver_id} denied ({denial})")
        return session, Effects(publish=publish, save=True, notes=[note])
    session.expires_at = now + timers.authorization_ttl
    session.answer_deadline = now + timers.cp_answer_timeout
    accepted = RequestAccepted(
        driver_id=ask.driver_id, cp_id=ask.cp_id, request_id=ask.request_id, session_id=session_id
    )
    authorise = AuthorizeSupply(
        cp_id=ask.cp_id,
        session_id=session_id,
        driver_id=ask.driver_id,
        price_eur_kwh=price,
        max_kw=cp.max_kw,
        max_kwh=max_kwh_for(balance_cents, price),
        expires_at=session.expires_at,
    )
    text = (
        f"{ask.cp_id}: asking the CP to authorise a supply for {ask.driver_id} "
        f"({ask.origin} request, session {session_id})"
    )
    return session, Effects(
        publish=[session.to_driver(accepted), session.to_engine(authorise)],
        save=True,
        notes=[Note("asked", text)],
    )
