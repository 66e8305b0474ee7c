"""EV_Driver: the driver app (asks for supplies, shows progress and tickets)."""
