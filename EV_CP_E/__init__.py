"""EV_CP_E: the charging point's engine (simulated hardware, supplies energy)."""
