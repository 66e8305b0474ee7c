"""Central's in-memory view of the charging points: health, service state, live supply.

Pure: no I/O. The service layer feeds it events (authentication, heartbeats, faults, session
changes) and publishes what changed. The database stays the durable record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from EV_Central.session import Session, SessionStatus
from shared.messages import CPState, CPStateUpdate, CPSummary


@dataclass
class ChargingPoint:
    id: str
    location: str
    price_eur_kwh: float
    max_kw: float
    in_service: bool = True
    connected: bool = False
    engine_ok: bool = True
    last_heartbeat: float = 0.0
    session: Session | None = None
    # The engine's time scale (its --speed), from the monitor's heartbeats: the screens mark a
    # CP whose figures run faster than real time.
    speed: float = 1.0
    # A frost alert at the CP's place (EV_Central/weather.py): its text while it holds. It is
    # independent of `in_service`, an admin's stop: the CP is PARADO while either holds.
    weather_hold: str = ""

    @property
    def serving(self) -> bool:
        """In service: neither an admin nor the weather has stopped it."""
        return self.in_service and not self.weather_hold

    @property
    def stop_reason(self) -> str:
        """Why the CP is out of service ("" when it is not): every hold that stands."""
        reasons = [] if self.in_service else ["stopped by an admin"]
        if self.weather_hold:
            reasons.append(self.weather_hold)
        return "; ".join(reasons)

    @property
    def state(self) -> CPState:
        """The health table of the brief, then service and supply."""
        if not self.connected:
            return CPState.DESCONECTADO
        if not self.engine_ok:
            return CPState.AVERIADO
        if self.session is not None and self.session.status == SessionStatus.SUPPLYING:
            return CPState.SUMINISTRANDO
        if not self.serving:
            return CPState.PARADO
        return CPState.ACTIVADO

    @property
    def available(self) -> bool:
        return self.state == CPState.ACTIVADO and self.session is None

    @property
    def reserved(self) -> bool:
        """Held for a driver who has not plugged in yet (the CP itself is ACTIVADO)."""
        return self.session is not None and self.session.status in (
            SessionStatus.ASKED,
            SessionStatus.AUTHORISED,
        )

    def unavailable_detail(self) -> str:
        """Why a request for this CP finds it unavailable, for the driver (never naming
        the driver who holds it)."""
        if self.state == CPState.ACTIVADO and self.reserved:
            return f"{self.id} is reserved for another driver"
        if self.state == CPState.ACTIVADO and self.session is not None:
            return f"{self.id} is finishing another supply"
        if self.state == CPState.PARADO:
            return f"{self.id} is PARADO ({self.stop_reason})"
        return f"{self.id} is {self.state.value}"

    def as_api(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "id": self.id,
            "location": self.location,
            "price_eur_kwh": self.price_eur_kwh,
            "max_kw": self.max_kw,
            "state": self.state.value,
            "connected": self.connected,
            "engine_ok": self.engine_ok,
            "in_service": self.in_service,
            "weather_hold": self.weather_hold,
            "stop_reason": self.stop_reason,
            "reserved": self.reserved,
            "speed": self.speed,
        }
        if self.session is not None:
            entry["session_id"] = self.session.session_id
            entry["session_phase"] = self.session.status.value
            entry["driver_id"] = self.session.driver_id
            entry["kw"] = self.session.kw
            entry["kwh"] = round(self.session.kwh, 4)
            entry["amount_eur"] = self.session.amount_eur
        return entry

    def state_message(self) -> CPStateUpdate:
        """The CP's state for the public state topic."""
        s = self.session
        return CPStateUpdate(
            cp_id=self.id,
            state=self.state,
            reserved=self.reserved,
            location=self.location,
            price_eur_kwh=self.price_eur_kwh,
            max_kw=self.max_kw,
            # The state topic is readable by anyone on the broker: who is charging and what
            # they pay stay out of it (drivers get their own figures, sealed).
            kw=s.kw if s else 0.0,
            kwh=round(s.kwh, 4) if s else 0.0,
            speed=self.speed,
            stop_reason=self.stop_reason,
        )

    def summary(self) -> CPSummary:
        return CPSummary(
            cp_id=self.id,
            location=self.location,
            price_eur_kwh=self.price_eur_kwh,
            state=self.state,
        )


@dataclass
class Registry:
    cps: dict[str, ChargingPoint] = field(default_factory=dict)

    def add(self, cp: ChargingPoint) -> None:
        self.cps[cp.id] = cp

    def remove(self, cp_id: str) -> None:
        """Forget a deregistered CP (nothing happens for one that is not here)."""
        self.cps.pop(cp_id, None)

    def get(self, cp_id: str) -> ChargingPoint | None:
        return self.cps.get(cp_id)

    def by_session(self, session_id: str) -> ChargingPoint | None:
        for cp in self.cps.values():
            if cp.session is not None and cp.session.session_id == session_id:
                return cp
        return None

    def session_of_driver(self, driver_id: str) -> ChargingPoint | None:
        for cp in self.cps.values():
            if cp.session is not None and cp.session.driver_id == driver_id:
                return cp
        return None

    def stale(self, now: float, timeout: float) -> list[ChargingPoint]:
        """Connected CPs whose last heartbeat is older than `timeout`."""
        return [
            cp for cp in self.cps.values() if cp.connected and now - cp.last_heartbeat > timeout
        ]

    def sorted(self) -> list[ChargingPoint]:
        return [self.cps[k] for k in sorted(self.cps)]
