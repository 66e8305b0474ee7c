"""What the weather service (EV_W) sends Central on the admin WebSocket, as its own role.

EV_W logs in with an account of role "weather" (docs/weather.md). On /ws such a session may
send only these two messages, and receives nothing but their results: no CP states, drivers or
audit rows are pushed to it. Each message is answered with a `result` carrying its `ref`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

WEATHER_ROLE = "weather"
MAX_PLACE = 80  # characters of a place name ("Alicante")
MAX_ERROR = 200  # characters of a provider's failure as reported

Place = Annotated[str, Field(min_length=1, max_length=MAX_PLACE)]
# Colder or hotter than anywhere on Earth is a broken reading, not weather.
Celsius = Annotated[float, Field(ge=-100, le=70, allow_inf_nan=False)]
Ref = Annotated[str, Field(max_length=64)]


class PlacesQuery(BaseModel):
    """Which places have registered CPs; the result lists them in `places`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["weather_places"] = "weather_places"
    ref: Ref = ""


class WeatherReport(BaseModel):
    """One place's temperature, or (`temperature` null) the provider's failure to give it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["weather_report"] = "weather_report"
    place: Place
    provider: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9_-]+$")]
    temperature: Celsius | None
    error: Annotated[str, Field(max_length=MAX_ERROR)] = ""
    ref: Ref = ""


WeatherRequest = Annotated[PlacesQuery | WeatherReport, Field(discriminator="type")]
WEATHER_REQUEST: TypeAdapter[WeatherRequest] = TypeAdapter(WeatherRequest)
