"""Issue 17: the low-water mark in front of the key store (qkd.kme.refill) and the
round work on lower-priority threads (qkd.kme.link_work)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qkd.kme.config import LinkSection
from qkd.kme.link_work import LinkWorkExecutor, is_round_work
from qkd.kme.refill import DEFAULT_ROUND_S, FORECAST_ROUNDS, RefillGate, RefillPolicy
from qkd.link.core import LinkCore, Work
from qkd.link.pool import ReservedKey

MAX = 1000
API = "/api/v1/keys"


def _drain(policy: RefillPolicy, start: int, per_s: float, seconds: float,
           step: float = 0.05, t0: float = 0.0) -> tuple[int, float, list[int]]:
    """Readings every `step` s while keys are drawn at `per_s`; returns the last
    level, the time and every level the link was told."""
    told = []
    level, t = float(start), t0
    while t < t0 + seconds:
        told.append(policy.level(int(level), t))
        t += step
        level -= per_s * step
    return int(level), t, told


def test_full_pool_and_a_few_keys_taken_start_no_round() -> None:
    p = RefillPolicy(MAX, 0.75)
    assert p.level(MAX, 0.0) == MAX
    # Keys taken slowly (0.5/s): the link is told "full" down to the mark plus the
    # forecast (0.5 keys/s x 5 s x 2 = 5 keys), then the real level.
    for i, level in enumerate(range(MAX - 1, 755, -5)):
        assert p.level(level, 1.0 + i * 10.0) == MAX, level
    assert not p.refilling
    assert p.level(749, 1000.0) == 749 and p.refilling


def test_below_the_mark_the_link_sees_the_real_level_until_full_again() -> None:
    p = RefillPolicy(MAX, 0.75)
    assert p.level(749, 0.0) == 749 and p.refilling
    # Hysteresis: once refilling, the real level goes out even above the mark...
    p.deposited(200, 3.0)
    assert p.level(949, 3.0) == 949
    # ... until the pool is full; then "full" again below it.
    p.deposited(51, 6.0)
    assert p.level(MAX, 6.0) == MAX and not p.refilling
    assert p.level(990, 100.0) == MAX


def test_refill_below_one_is_the_old_rule() -> None:
    p = RefillPolicy(MAX, 1.0)
    assert p.level(MAX, 0.0) == MAX
    assert p.level(MAX - 1, 1.0) == MAX - 1


def test_forecast_starts_the_refill_above_the_mark_under_a_steady_draw() -> None:
    # 20 keys/s for 40 s: twice a default round's draw (200 keys) reaches the mark
    # well above it (the rate estimate needs a few seconds to ramp up).
    p = RefillPolicy(MAX, 0.75)
    level, _t, told = _drain(p, MAX, 20.0, 40.0)
    assert level >= 0
    first_real = next(i for i, v in enumerate(told) if v < MAX)
    assert p.refilling and told[first_real] > 800
    assert p.drain_per_s == pytest.approx(20.0, rel=0.05)
    assert p.forecast(0.0) == pytest.approx(p.drain_per_s * DEFAULT_ROUND_S
                                            * FORECAST_ROUNDS)
    # Control: the same levels read with no time passing between big jumps (no
    # rate) stay gated until the mark.
    q = RefillPolicy(MAX, 0.75)
    assert q.level(MAX, 0.0) == MAX
    assert q.level(800, 1000.0) == MAX


def test_deposits_do_not_count_as_draw_and_round_time_is_measured() -> None:
    p = RefillPolicy(MAX, 0.75)
    assert p.level(700, 0.0) == 700  # opens at t=0
    p.deposited(300, 4.0)
    p.level(1000, 4.0)
    assert p.round_s == pytest.approx(4.0)
    assert p.drain_per_s == pytest.approx(0.0)  # 700 + 300 - 1000: nothing drawn


def test_bad_fraction_is_refused() -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="refill_below"):
            RefillPolicy(MAX, bad)
    field = LinkSection.model_fields["refill_below"]
    assert field.default == 0.75


class _FakeStore:
    def __init__(self, level: int, trim: int = 0) -> None:
        self.level, self.trim = level, trim
        self.calls: list[tuple[Any, ...]] = []

    async def deposit(self, blocks: Sequence[tuple[str, bytes]], now: float,
                      lifetime: float, limit: int | None = None,
                      count_reserved: bool = False) -> int:
        self.calls.append(("deposit", len(blocks), limit, count_reserved))
        self.level += len(blocks) - self.trim
        return self.trim

    async def pool_level(self, now: float) -> int:
        return self.level

    async def release(self, keys: Sequence[ReservedKey]) -> None:
        self.calls.append(("release", list(keys)))

    async def apply_reservation(self, master: str, slave: str,
                                keys: Sequence[ReservedKey], now: float) -> None:
        self.calls.append(("apply", master, slave, list(keys)))


async def test_gate_passes_calls_through_and_gates_the_level() -> None:
    store = _FakeStore(900, trim=2)
    clock = iter(float(i) for i in range(100))
    gate = RefillGate(store, RefillPolicy(MAX, 0.75), lambda: next(clock))
    assert await gate.pool_level(0.0) == MAX  # 900: above the mark, no draw
    # ... while the real headroom stays visible: a round started for the link's pads
    # sizes its key from it (bb84.py), instead of storing nothing.
    assert gate.real_level == 900
    store.level = 700
    assert await gate.pool_level(0.0) == 700
    key = ReservedKey("k", ("b",), 256)
    assert await gate.deposit([("b1", b"x" * 32)] * 5, 0.0, 60.0, 1000, True) == 2
    await gate.release([key])
    await gate.apply_reservation("m", "s", [key], 0.0)
    assert store.calls == [("deposit", 5, 1000, True), ("release", [key]),
                           ("apply", "m", "s", [key])]
    assert gate.policy.round_s > 0


# ------------------------------------------------------------ link work priority


def _work() -> Work:
    return Work("pp", None, lambda: None)  # type: ignore[arg-type]


def test_round_work_is_recognised_as_to_thread_hands_it_over() -> None:
    import contextvars
    import functools

    ctx = contextvars.copy_context()
    core = LinkCore.__new__(LinkCore)
    assert is_round_work(functools.partial(ctx.run, _work().run))
    assert is_round_work(functools.partial(ctx.run, core.prepare_round, 3))
    # Short core calls and anything else stay on the normal threads.
    assert not is_round_work(functools.partial(ctx.run, core.receive_frame, b"x", 0.0))
    assert not is_round_work(functools.partial(ctx.run, print))
    assert not is_round_work(print)
    assert not is_round_work(functools.partial(print, 1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux")
async def test_round_work_runs_at_lower_priority_and_short_calls_do_not() -> None:
    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = nice()
    if base > 9:
        pytest.skip("this process already runs at nice > 9")

    loop = asyncio.get_running_loop()
    executor = LinkWorkExecutor(nice=5)
    loop.set_default_executor(executor)
    try:
        # Control: a short call runs at the process's priority.
        assert await asyncio.to_thread(nice) == base
        work = _work()
        work.fn = nice
        done = await asyncio.to_thread(work.run)
        assert done.result == base + 5
        # The normal threads were not lowered by it.
        assert await asyncio.to_thread(nice) == base
    finally:
        executor.shutdown(wait=True)


# ------------------------------------------------------------ two KME processes


def test_kme_pair_refills_only_below_the_mark(tmp_path: Path, pki: Path) -> None:
    """Two KME processes on the BB84 link, pool 400, default refill_below (0.75: the
    mark is 300). Keys taken from a full pool start no round while the level stays
    above the mark; below it the link refills to full. (The control, refill_below =
    1: test_delivery_storm's slice test needs a refill after 16 keys, and times out
    without it.)"""
    import time

    from tests.qkd.kme.test_delivery_storm import POOL, _ctx, _free, _post, _start_pair
    from tests.support.kme_processes import wait_until

    alice, bob = _start_pair(tmp_path, pki)

    def level() -> int:
        return _free(pki, alice, "site-a", "site-b-gw")

    def rounds() -> int:
        return int(alice.link_status(pki, "site-a", "site-b-gw")  # type: ignore[call-overload]
                   ["rounds_committed"])

    async def draw(requests: int) -> int:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=_ctx(pki, "site-a"))) as s:
            url = f"{alice.url}{API}/site-b-gw/enc_keys"
            for _ in range(requests):
                st, body = await _post(s, url, {"number": 16})
                assert st == 200, body
        return requests * 16

    try:
        wait_until(lambda: level() == POOL, 300, "a full pool", (alice, bob))
        time.sleep(0.5)  # the last round's deposit is in: nothing runs now
        before = rounds()
        asyncio.run(draw(2))  # 32 keys: 368 of 400, above the mark
        time.sleep(6.0)  # ~3 rounds' time at these settings
        assert rounds() == before
        assert level() == POOL - 32
        asyncio.run(draw(5))  # 80 more: 288, below the mark
        wait_until(lambda: level() == POOL, 120, "the pool refilled", (alice, bob))
        assert rounds() > before
    finally:
        alice.stop()
        bob.stop()


def test_snapshot_shows_the_rule_state() -> None:
    p = RefillPolicy(MAX, 0.75)
    assert p.snapshot() == {"refilling": False, "low_water": 750, "drain_keys_per_s": 0.0,
                            "round_s": DEFAULT_ROUND_S}
    p.level(700, 0.0)
    assert p.snapshot()["refilling"] is True


def test_a_bad_nice_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkd.common.errors import UserError
    from qkd.kme import link_work

    class Loop:
        executor: object = None

        def set_default_executor(self, ex: object) -> None:
            self.executor = ex

    monkeypatch.setenv(link_work.NICE_ENV, "high")
    with pytest.raises(UserError, match="QKDGW_KME_LINK_NICE='high'"):
        link_work.install(Loop())
    monkeypatch.setenv(link_work.NICE_ENV, "0")  # control: 0 keeps the default executor
    loop = Loop()
    link_work.install(loop)
    assert loop.executor is None
