"""A chaos soak: random faults and an independent auditor (docs/reliability.md)."""
