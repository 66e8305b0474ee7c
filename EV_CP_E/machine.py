"""The charging point's engine as a pure state machine: no asyncio, no I/O.

IDLE -> AUTHORISED -> PLUGGED -> SUPPLYING -> IDLE: a plugged-in vehicle draws nothing until
Central's `start_supply` says the session is SUPPLYING there too. Four conditions refuse or end
supplies:
KO (the menu's `k`/`o`), the monitor's health checks (lost after `health_timeout` seconds of
silence), Central's reachability (as the last health check reported it) and Central's
in-service flag. Every input is a method call; every method returns an `Outcome` holding the
events to publish and, when something was refused, the reason to show. Time comes from the
injectable clock `now` (seconds since the epoch, like the messages' timestamps).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum

from shared.messages import (
    AuthorizeSupply,
    CPAuthorisation,
    CPPlugged,
    CPRequest,
    CPRequestDenied,
    CPSupplyEnded,
    CPTelemetry,
    EndReason,
    EndSupply,
    Message,
    SetService,
    StartSupply,
)


class EngineState(StrEnum):
    IDLE = "IDLE"
    AUTHORISED = "AUTHORISED"
    PLUGGED = "PLUGGED"  # plugged in, waiting for Central's start_supply
    SUPPLYING = "SUPPLYING"


@dataclass(frozen=True)
class Authorisation:
    """A supply Central authorised, waiting for the plug or in progress."""

    session_id: str
    driver_id: str
    price_eur_kwh: float
    max_kw: float
    max_kwh: float | None
    expires_at: float
    authorised_at: float


@dataclass
class Supply:
    """Energy delivered so far in the current supply."""

    started_at: float
    kwh: float = 0.0
    seq: int = 0


@dataclass
class Outcome:
    """What one input produced: events to publish and, if refused, why (for the screen)."""

    events: list[Message] = field(default_factory=list)
    refused: str | None = None
    notes: list[str] = field(default_factory=list)

    def extend(self, other: Outcome) -> None:
        self.events += other.events
        self.notes += other.notes
        if other.refused and not self.refused:
            self.refused = other.refused


def amount(kwh: float, price: float) -> float:
    """kWh × €/kWh in euros, rounded half up to the cent as Central rounds tickets (Python's
    round() rounds half to even, and binary floats sit just below many halves)."""
    cents = Decimal(str(round(kwh, 6))) * Decimal(str(price)) * 100
    return int(cents.quantize(Decimal(1), rounding=ROUND_HALF_UP)) / 100


class EngineMachine:
    """The engine's state and rules. Call `poll()` often and `tick(seconds)` every tick."""

    def __init__(
        self,
        *,
        health_timeout: float = 3.0,
        auto_plug: float | None = None,
        auto_unplug: float | None = None,
        speed: float = 1.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.health_timeout = health_timeout
        self.auto_plug = auto_plug
        self.auto_unplug = auto_unplug
        # Simulated seconds per real second: scales the energy of each tick, nothing else
        # (health, authorisation and plug timers are about real time).
        self.speed = speed
        self._now = now
        self.cp_id: str | None = None
        self.state = EngineState.IDLE
        self.ko = False
        self.in_service = True
        self.central_ok = False
        self.last_health_check: float | None = None
        self.auth: Authorisation | None = None
        self.supply: Supply | None = None
        self.last_kw = 0.0
        self._monitor_was_ok = False

    # --- conditions -------------------------------------------------------------------

    @property
    def monitor_ok(self) -> bool:
        last = self.last_health_check
        return last is not None and self._now() - last <= self.health_timeout

    def _new_supply_blocker(self) -> tuple[str, EndReason] | None:
        """Why no new supply can start now (screen text, end reason), or None."""
        if self.ko:
            return "engine KO", EndReason.ENGINE_FAULT
        if not self.monitor_ok:
            text = "monitor lost" if self.last_health_check is not None else "no monitor yet"
            return text, EndReason.MONITOR_LOST
        if not self.central_ok:
            # Central does not hear from our monitor either, so it sees us as unreachable.
            return "Central unreachable", EndReason.MONITOR_LOST
        if not self.in_service:
            return "out of service", EndReason.STOPPED_BY_ADMIN
        return None

    # --- inputs from the monitor --------------------------------------------------------

    def set_cp_id(self, cp_id: str) -> bool:
        """Learn the CP id from the monitor's hello; False if it differs from the known one."""
        if self.cp_id is None:
            self.cp_id = cp_id
            return True
        return self.cp_id == cp_id

    def health_check(self, central_ok: bool) -> Outcome:
        """Record a health check from the monitor (answer it with `health_ok`)."""
        self.last_health_check = self._now()
        self.central_ok = central_ok
        out = Outcome()
        if not self._monitor_was_ok:
            self._monitor_was_ok = True
            out.notes.append("monitor OK: health checks arriving")
        return out

    @property
    def health_ok(self) -> bool:
        return not self.ko

    # --- inputs from Central ---------------------------------------------------------------

    def authorize(self, cmd: AuthorizeSupply) -> Outcome:
        """Central asks this CP to authorise a supply: accept it or refuse it, and say so."""
        out = Outcome()
        if self.auth is not None and self.auth.session_id == cmd.session_id:
            return out  # a redelivery of the current authorisation, answered already
        refusal = self._refusal_of(cmd)
        if refusal is not None:
            out.refused = f"authorisation for session {cmd.session_id} refused: {refusal}"
            out.events.append(self._answer(cmd, refusal))
            return out
        self.auth = Authorisation(
            session_id=cmd.session_id,
            driver_id=cmd.driver_id,
            price_eur_kwh=cmd.price_eur_kwh,
            max_kw=cmd.max_kw,
            max_kwh=cmd.max_kwh,
            expires_at=cmd.expires_at,
            authorised_at=self._now(),
        )
        self.state = EngineState.AUTHORISED
        out.events.append(self._answer(cmd, None))
        out.notes.append(f"authorised session {cmd.session_id} for driver {cmd.driver_id}")
        return out

    def refuse(self, cmd: AuthorizeSupply, why: str) -> Outcome:
        """Refuse an authorisation the engine cannot take (e.g. one that came too late)."""
        out = Outcome()
        out.refused = f"authorisation for session {cmd.session_id} refused: {why}"
        out.events.append(self._answer(cmd, why))
        return out

    def _refusal_of(self, cmd: AuthorizeSupply) -> str | None:
        """Why this CP cannot take an authorisation now, or None."""
        blocker = self._new_supply_blocker()
        if blocker is not None:
            return blocker[0]
        if self.state is not EngineState.IDLE:
            return f"busy with session {self._session_id()}"
        if cmd.expires_at <= self._now():
            return "authorisation already expired"
        return None

    def _answer(self, cmd: AuthorizeSupply, refusal: str | None) -> CPAuthorisation:
        assert self.cp_id is not None
        return CPAuthorisation(
            cp_id=self.cp_id,
            session_id=cmd.session_id,
            accepted=refusal is None,
            reason=refusal or "",
        )

    def request_denied(self, cmd: CPRequestDenied) -> Outcome:
        """Central denied a request made at this CP's menu: show why."""
        text = f"Central denied the supply for driver {cmd.driver_id}: {cmd.reason.value}"
        if cmd.detail:
            text += f" ({cmd.detail})"
        return Outcome(notes=[text])

    def end_supply(self, cmd: EndSupply) -> Outcome:
        if self.auth is None or self.auth.session_id != cmd.session_id:
            return Outcome()
        return self._end(cmd.reason)

    def start_supply(self, cmd: StartSupply) -> Outcome:
        """Central's word that the plugged-in supply may begin: energy flows from now."""
        out = Outcome()
        auth = self.auth
        if self.state is not EngineState.PLUGGED or auth is None:
            return out  # a redelivery, or a supply that ended meanwhile (Central hears of it)
        if auth.session_id != cmd.session_id:
            return out
        self.state = EngineState.SUPPLYING
        self.supply = Supply(started_at=self._now())
        self.last_kw = 0.0
        out.notes.append(f"Central started session {auth.session_id}: supplying")
        return out

    def set_service(self, cmd: SetService) -> Outcome:
        self.in_service = cmd.in_service
        out = Outcome()
        if not cmd.in_service and self.state is not EngineState.IDLE:
            out.extend(self._end(EndReason.STOPPED_BY_ADMIN))
        out.notes.append("back in service" if cmd.in_service else "put out of service")
        return out

    # --- inputs from the menu -----------------------------------------------------------

    def plug(self) -> Outcome:
        out = Outcome()
        if self.state is EngineState.SUPPLYING:
            out.refused = "already supplying"
            return out
        if self.state is EngineState.PLUGGED:
            out.refused = "already plugged in, waiting for Central to start the supply"
            return out
        if self.state is EngineState.IDLE or self.auth is None:
            out.refused = "no authorised supply to plug into"
            return out
        if self.auth.expires_at <= self._now():
            out.extend(self._end(EndReason.AUTHORIZATION_EXPIRED))
            out.refused = "authorisation expired"
            return out
        blocker = self._new_supply_blocker()
        if blocker is not None:
            out.refused = blocker[0]
            return out
        self.state = EngineState.PLUGGED
        out.events.append(self._plugged())
        out.notes.append(f"plugged in: waiting for Central to start session {self.auth.session_id}")
        return out

    def unplug(self) -> Outcome:
        if self.state not in (EngineState.PLUGGED, EngineState.SUPPLYING):
            return Outcome(refused="nothing plugged in")
        return self._end(EndReason.UNPLUGGED)

    def set_ko(self, ko: bool) -> Outcome:
        out = Outcome()
        if ko == self.ko:
            return out
        self.ko = ko
        if ko and self.state is not EngineState.IDLE:
            out.extend(self._end(EndReason.ENGINE_FAULT))
        out.notes.append("engine KO" if ko else "engine OK again")
        return out

    def request(self, driver_id: str) -> Outcome:
        """A supply asked for at the CP's own menu."""
        out = Outcome()
        if self.cp_id is None:
            out.refused = "refused: CP id not known yet (no monitor hello)"
            return out
        if self.state is not EngineState.IDLE:
            out.refused = f"refused: {self.state.value.lower()}"
            return out
        blocker = self._new_supply_blocker()
        if blocker is not None:
            out.refused = f"refused: {blocker[0]}"
            return out
        out.events.append(CPRequest(cp_id=self.cp_id, driver_id=driver_id))
        out.notes.append(f"asked Central for a supply for driver {driver_id}")
        return out

    def shutdown(self) -> Outcome:
        """Quitting: a supply in progress ends as if unplugged."""
        if self.state is EngineState.IDLE:
            return Outcome()
        return self._end(EndReason.UNPLUGGED)

    # --- time -------------------------------------------------------------------------------

    def poll(self) -> Outcome:
        """Apply everything time decides: monitor loss, expiry, automatic plug and unplug."""
        out = Outcome()
        now = self._now()
        if self._monitor_was_ok and not self.monitor_ok:
            self._monitor_was_ok = False
            out.notes.append("monitor lost: refusing supplies")
            if self.state is not EngineState.IDLE:
                out.extend(self._end(EndReason.MONITOR_LOST))
        auth = self.auth
        if self.state is EngineState.PLUGGED and auth is not None and auth.expires_at <= now:
            # Central never started it (its word lost, or it no longer stands behind it).
            out.extend(self._end(EndReason.AUTHORIZATION_EXPIRED))
            out.notes.append(f"Central did not start session {auth.session_id} in time")
        elif self.state is EngineState.AUTHORISED and auth is not None:
            if auth.expires_at <= now:
                out.extend(self._end(EndReason.AUTHORIZATION_EXPIRED))
                out.notes.append(f"authorisation for session {auth.session_id} expired")
            elif self.auto_plug is not None and now >= auth.authorised_at + self.auto_plug:
                out.extend(self.plug())
        supply = self.supply
        if (
            self.state is EngineState.SUPPLYING
            and supply is not None
            and self.auto_unplug is not None
            and now >= supply.started_at + self.auto_unplug
        ):
            out.extend(self.unplug())
        return out

    def tick(self, seconds: float) -> Outcome:
        """Deliver `seconds` (real) worth of energy at the authorised power, times the time
        scale; telemetry out."""
        out = Outcome()
        auth, supply = self.auth, self.supply
        if self.state is not EngineState.SUPPLYING or auth is None or supply is None:
            return out
        assert self.cp_id is not None
        kw = auth.max_kw
        kwh = supply.kwh + kw * seconds * self.speed / 3600.0
        capped = auth.max_kwh is not None and kwh >= auth.max_kwh
        if auth.max_kwh is not None and capped:
            kwh = auth.max_kwh
        supply.kwh = kwh
        supply.seq += 1
        self.last_kw = kw
        out.events.append(
            CPTelemetry(
                cp_id=self.cp_id,
                session_id=auth.session_id,
                seq=supply.seq,
                kw=kw,
                kwh=supply.kwh,
                amount_eur=amount(supply.kwh, auth.price_eur_kwh),
            )
        )
        if capped:
            out.notes.append("energy limit reached")
            out.extend(self._end(EndReason.BALANCE_EXHAUSTED))
        return out

    # --- helpers ----------------------------------------------------------------------------

    def _session_id(self) -> str:
        return self.auth.session_id if self.auth is not None else "-"

    def _end(self, reason: EndReason) -> Outcome:
        """End the current authorisation or supply, back to IDLE, with its ended event."""
        out = Outcome()
        auth, supply = self.auth, self.supply
        if auth is not None:
            kwh = supply.kwh if supply is not None else 0.0
            started = supply.started_at if supply is not None else None
            out.events.append(
                self._ended(auth.session_id, kwh, amount(kwh, auth.price_eur_kwh), reason, started)
            )
            out.notes.append(
                f"session {auth.session_id} ended ({reason.value}): {kwh:.4f} kWh, "
                f"{amount(kwh, auth.price_eur_kwh):.2f} €"
            )
        self.state = EngineState.IDLE
        self.auth = None
        self.supply = None
        self.last_kw = 0.0
        return out

    def _ended(
        self,
        session_id: str,
        kwh: float,
        amount_eur: float,
        reason: EndReason,
        started_at: float | None,
    ) -> CPSupplyEnded:
        assert self.cp_id is not None
        return CPSupplyEnded(
            cp_id=self.cp_id,
            session_id=session_id,
            kwh=kwh,
            amount_eur=amount_eur,
            reason=reason,
            started_at=started_at,
        )

    def _plugged(self) -> CPPlugged:
        assert self.cp_id is not None and self.auth is not None
        return CPPlugged(cp_id=self.cp_id, session_id=self.auth.session_id)

    # --- screen -------------------------------------------------------------------------------

    def status_line(self) -> str:
        """One line describing the engine now, e.g. for the CP's screen; a simulated clock is
        named on it, so that nobody takes its figures for real time."""
        line = self._state_text()
        if self.speed != 1.0:
            line += f"  [×{self.speed:g} simulated time]"
        return line

    def _state_text(self) -> str:
        who = f"[{self.cp_id or '?'}]"
        auth, supply = self.auth, self.supply
        if self.state is EngineState.SUPPLYING and auth is not None and supply is not None:
            line = (
                f"{who} SUPPLYING driver {auth.driver_id}  {self.last_kw:.2f} kW  "
                f"{supply.kwh:.4f} kWh  {amount(supply.kwh, auth.price_eur_kwh):.2f} €"
            )
            if not self.central_ok:
                line += "  (Central unreachable: finishing this supply)"
            return line
        if self.state is EngineState.PLUGGED and auth is not None:
            return (
                f"{who} PLUGGED driver {auth.driver_id} session {auth.session_id}  "
                "(waiting for Central to start the supply)"
            )
        if self.state is EngineState.AUTHORISED and auth is not None:
            plug = "plugging in automatically" if self.auto_plug is not None else "plug in: p"
            return (
                f"{who} AUTHORISED driver {auth.driver_id} session {auth.session_id}  "
                f"{auth.price_eur_kwh:.2f} €/kWh ({plug})"
            )
        blocker = self._new_supply_blocker()
        if blocker is None:
            return f"{who} IDLE (ready)"
        text = blocker[0]
        if text == "Central unreachable":
            return f"{who} IDLE (Central unreachable: refusing new supplies)"
        if text == "out of service":
            return f"{who} IDLE (out of service)"
        return f"{who} IDLE ({text}: refusing supplies)"
