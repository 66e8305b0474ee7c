"""Central's weather stops: the rules, without I/O.

A CP is out of service (PARADO) while either of two independent holds stands: an admin's stop
(`ChargingPoint.in_service` false) and a frost alert at its place (`ChargingPoint.weather_hold`,
the text of the alert). The weather service (EV_W) reports each place's temperature; below
0 °C the place is frozen and its CPs stop, at 0 °C or above it thaws and they resume, unless
an admin stopped them too. A report that carries no temperature (the provider failed) marks
the place stale and changes nothing else: a broken provider must not stop or resume CPs.
An admin may not resume a CP that frost holds: the refusal says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FREEZING_C = 0.0
# With no good reading for this long the panel shows a place's weather as stale, even when the
# weather service has stopped reporting altogether (it reports every 4 s by default).
STALE_AFTER_S = 15.0


def place_of(location: str) -> str:
    """The town whose weather a CP follows: its location up to " - ".

    "Alicante - Puerto, Muelle 12" is in "Alicante"; a location without the dash is its own
    place. The weather service asks its provider about these names.
    """
    return location.split(" - ", 1)[0].strip() or location


@dataclass
class PlaceWeather:
    """What Central knows of one place's weather (a row of the replicated `weather` table)."""

    place: str
    temperature: float | None = None  # the last good reading
    provider: str = ""
    updated_at: float = 0.0  # when the last good reading came
    checked_at: float = 0.0  # when the last report came, good or not
    error: str = ""  # the provider's failure in the last report ("" when it was good)
    frozen_at: float | None = None  # since when the place is below 0 °C (the alert)

    @property
    def frozen(self) -> bool:
        return self.frozen_at is not None

    def stale(self, now: float) -> bool:
        return bool(self.error) or now - self.updated_at > STALE_AFTER_S

    def hold(self) -> str:
        """The reason its CPs are stopped, "" when the place is not frozen."""
        if not self.frozen or self.temperature is None:
            return ""
        return f"weather: {self.temperature:.1f} °C at {self.place}"

    def record(self, temperature: float | None, provider: str, error: str, now: float) -> None:
        """Take a report: a reading moves the temperature and the alert, a failure only marks
        the place stale."""
        self.checked_at = now
        self.provider = provider
        if temperature is None:
            self.error = error or "no reading"
            return
        self.error = ""
        self.temperature = temperature
        self.updated_at = now
        if temperature < FREEZING_C:
            if self.frozen_at is None:
                self.frozen_at = now
        else:
            self.frozen_at = None

    def as_api(self, cp_ids: list[str], now: float) -> dict[str, Any]:
        return {
            "place": self.place,
            "temperature": self.temperature,
            "provider": self.provider,
            "updated_at": self.updated_at or None,
            "checked_at": self.checked_at or None,
            "error": self.error,
            "stale": self.stale(now),
            "frozen": self.frozen,
            "frozen_at": self.frozen_at,
            "hold": self.hold(),
            "cps": cp_ids,
        }


def resume_refusal(cp_id: str, weather_hold: str) -> str | None:
    """Why an admin may not resume this CP now, or None when it may."""
    if weather_hold:
        return f"{cp_id} stays PARADO: {weather_hold}"
    return None
