"""Reconnect policy: exponential backoff with jitter and a cap, reset on success."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, initial: float = 0.5, maximum: float = 10.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.attempt = 0

    def next_delay(self) -> float:
        """Delay before the next try; grows with each failure, with ±20 % jitter."""
        base = min(self.maximum, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return float(base * random.uniform(0.8, 1.2))

    def reset(self) -> None:
        self.attempt = 0
