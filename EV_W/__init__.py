"""EV_W: the weather service. Frost at a CP's place puts the CP out of service (docs/weather.md)."""
