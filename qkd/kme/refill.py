"""When the BB84 link refills the pool: a low-water mark in front of the key store.

Alice's link starts a round whenever the pool level it reads is below max_key_count,
so one key taken from a full pool started a round (emission, sifting, Cascade: seconds
of both cores) while requests were being served. `RefillGate` is the `KeyPool` the
link is given instead of the store: it passes every call through, but reports the
pool as full until the level falls below `refill_below` x max_key_count, or until the
keys drawn at the recent rate during one round would take it there (the forecast).
Once a refill starts it goes on, round after round, until the pool is full again
(hysteresis: no round per handful of keys). Rounds the link needs for its own
authentication pads start regardless (the link checks that itself).

`RefillPolicy` is the decision (sans-I/O: levels and times in, a level out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qkd.link.pool import KeyPool, ReservedKey

# Weight of the newest drain-rate sample, per second of its span (an EWMA with a
# time constant of ~10 s: steady for a steady load, quick to follow a new one).
DRAIN_TAU_S = 10.0
# The forecast asks for twice the keys one round's time would draw at that rate: a
# round can take longer than the last one, and the next one starts only after it.
FORECAST_ROUNDS = 2.0
# Round time assumed before one was seen (4e7 pulses take 2-4 s on a 2-core machine).
DEFAULT_ROUND_S = 5.0
# A gate open for longer (link down, pads short) says nothing about round time.
MAX_ROUND_S = 60.0


class RefillPolicy:
    """The low-water-mark rule for one link's pool (levels in blocks of key_size)."""

    def __init__(self, max_keys: int, refill_below: float) -> None:
        if not 0.0 < refill_below <= 1.0:  # the config allows 0.01..1
            raise ValueError("refill_below must be above 0 and at most 1")
        self.max_keys = max_keys
        # 1.0 keeps the old rule (refill as soon as the level is below the cap).
        self.low_water = (max_keys if refill_below >= 1.0
                          else max(1, int(max_keys * refill_below)))
        self.refilling = False
        self.drain_per_s = 0.0
        self.round_s = DEFAULT_ROUND_S
        self._last: tuple[float, int] | None = None  # (time, level) of the last reading
        self._deposited = 0  # blocks stored since the last reading
        self._opened_at: float | None = None  # when the gate last let a round start

    def deposited(self, blocks: int, now: float) -> None:
        """A round's blocks reached the store (after the pool-limit trim)."""
        self._deposited += blocks
        if self._opened_at is not None:
            self.round_s = min(MAX_ROUND_S, max(0.1, now - self._opened_at))
            self._opened_at = None

    def level(self, real: int, now: float) -> int:
        """The level to tell the link: `real`, or max_keys while no refill is due."""
        self._update_drain(real, now)
        if real >= self.max_keys:
            self.refilling = False
        elif real < self.low_water or self.forecast(now) > real - self.low_water:
            self.refilling = True
        if not self.refilling:
            return max(real, self.max_keys)
        if self._opened_at is None:
            self._opened_at = now
        return real

    def snapshot(self) -> dict[str, float | int | bool]:
        """For the admin status (no key material: counts and rates)."""
        return {"refilling": self.refilling, "low_water": self.low_water,
                "drain_keys_per_s": round(self.drain_per_s, 1),
                "round_s": round(self.round_s, 2)}

    def forecast(self, now: float) -> float:
        """Keys expected to be drawn before a round started now has been stored."""
        return self.drain_per_s * self.round_s * FORECAST_ROUNDS

    def _update_drain(self, real: int, now: float) -> None:
        if self._last is not None:
            t0, level0 = self._last
            span = now - t0
            if span > 0:
                # Drawn = what was there + what came in - what is there now.
                drawn = max(0, level0 + self._deposited - real)
                weight = min(1.0, span / DRAIN_TAU_S)
                self.drain_per_s += weight * (drawn / span - self.drain_per_s)
        self._last = (now, real)
        self._deposited = 0


class RefillGate:
    """The key store as the link sees it, with `RefillPolicy` on `pool_level`."""

    def __init__(self, store: KeyPool, policy: RefillPolicy,
                 clock: Callable[[], float]) -> None:
        self._store = store
        self.policy = policy
        self._clock = clock  # monotonic: the policy's rates and round times
        # The store's own level at the last pool_level call: a round the link starts
        # for its pads while no refill is due may still fill the pool up to the cap.
        self.real_level: int | None = None

    async def deposit(self, blocks: Sequence[tuple[str, bytes]], now: float,
                      lifetime: float, limit: int | None = None,
                      count_reserved: bool = False) -> int:
        trimmed = await self._store.deposit(blocks, now, lifetime, limit, count_reserved)
        # Replayed blocks the store already had count as new here: the drain estimate
        # only ever errs towards refilling sooner.
        self.policy.deposited(len(blocks) - trimmed, self._clock())
        return trimmed

    async def pool_level(self, now: float) -> int:
        self.real_level = await self._store.pool_level(now)
        return self.policy.level(self.real_level, self._clock())

    async def release(self, keys: Sequence[ReservedKey]) -> None:
        await self._store.release(keys)

    async def apply_reservation(self, master: str, slave: str,
                                keys: Sequence[ReservedKey], now: float) -> None:
        await self._store.apply_reservation(master, slave, keys, now)
