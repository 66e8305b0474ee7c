"""EV_CP_M: the charging point's monitor (health-checks the engine, reports to Central)."""
