"""Issue 17 review: a round the BB84 link starts only for its own pads, while the refill
gate reads "full", sizes its key from the store's real headroom (not zero)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from qkd.kme.refill import RefillGate, RefillPolicy
from qkd.link import bb84
from qkd.link.pool import ReservedKey

MAX = 1000


class _Store:
    def __init__(self, level: int) -> None:
        self.level = level

    async def deposit(self, blocks: Sequence[tuple[str, bytes]], now: float,
                      lifetime: float, limit: int | None = None,
                      count_reserved: bool = False) -> int:
        return 0

    async def pool_level(self, now: float) -> int:
        return self.level

    async def release(self, keys: Sequence[ReservedKey]) -> None:
        return None

    async def apply_reservation(self, master: str, slave: str,
                                keys: Sequence[ReservedKey], now: float) -> None:
        return None


class _Core:
    """The parts of LinkCore that Bb84Link._drive_once reads: idle, pads low."""

    def __init__(self) -> None:
        self.peer_ready, self.round_active, self.round_pads_ok, self.pads_low = (
            True, False, True, True)
        self.stats = SimpleNamespace(rounds_aborted=0)
        self.peer_busy_aborts = 0
        self.rooms: list[int] = []

    def next_round_number(self) -> int:
        return 7

    def prepare_round(self, number: int) -> object:
        return object()

    def start_round(self, now: float, prepared: object, room: int) -> None:
        self.rooms.append(room)


async def _drive(store: Any) -> list[int]:
    link: Any = object.__new__(bb84.Bb84Link)
    core = _Core()
    link.core, link.store, link._max, link._waiting = core, store, MAX, {}
    link._writer, link._abort_streak = object(), 0
    link.s = SimpleNamespace(round_pause_s=0.0)

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        assert isinstance(fn, functools.partial)
        return fn(*args)

    link._call = call
    await asyncio.wait_for(link._drive_once(), 10)
    return core.rooms


@pytest.mark.parametrize("gated", [True, False])
async def test_a_pads_round_behind_a_full_reading_gate_still_fills_the_pool(
        gated: bool) -> None:
    real = _Store(900)  # above the 0.5 mark: the gate reads "full"
    clock = iter(float(i) for i in range(100))
    store = RefillGate(real, RefillPolicy(MAX, 0.5), lambda: next(clock)) if gated else real
    assert await store.pool_level(0.0) == (MAX if gated else 900)
    # Both ways the round may store up to the real headroom of 100 keys (the gated one
    # used to get room 0 and threw its key away).
    assert await _drive(store) == [MAX - 900]
