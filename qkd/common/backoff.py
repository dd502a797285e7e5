"""Exponential retry backoff, the one implementation (issue 10): each failure doubles
the wait up to a cap, a success resets it; optional jitter spreads retries of many
clients that failed together (off by default, so waits are exact and testable)."""

from __future__ import annotations

import random


def next_delay(delay: float, cap: float, factor: float = 2.0) -> float:
    """The wait after one more failure."""
    return min(delay * factor, cap)


class Backoff:
    """`delay` is the wait before the next attempt; `failed()` grows it, `succeeded()`
    puts it back to `initial`. With `jitter` j in [0, 1), each new delay is drawn
    uniformly from [d (1 - j), d], never above the cap."""

    def __init__(self, initial: float, cap: float, *, factor: float = 2.0,
                 jitter: float = 0.0, rng: random.Random | None = None) -> None:
        if not 0 < initial <= cap:
            raise ValueError(f"backoff needs 0 < initial ({initial}) <= cap ({cap})")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"backoff jitter {jitter} is not in [0, 1)")
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._base = initial
        self.delay = self._draw()

    def _draw(self) -> float:
        if not self.jitter:
            return self._base
        return self._base * (1.0 - self.jitter * self._rng.random())

    def failed(self, cap: float | None = None) -> float:
        """One more failure: the next delay, at most `cap` (default: the backoff's)."""
        self._base = next_delay(self._base, self.cap if cap is None else cap, self.factor)
        self.delay = self._draw()
        return self.delay

    def succeeded(self) -> float:
        self._base = self.initial
        self.delay = self._draw()
        return self.delay
