"""The pure key-budget forecaster (qkd/common/budget.py): rates, smoothing, time to exhaustion,
the words status prints."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkd.common.budget import (
    INF,
    BudgetForecaster,
    describe,
    format_duration,
    seconds_to_empty,
)


def test_one_sample_knows_no_rate() -> None:
    f = BudgetForecaster(tau=10)
    fig = f.observe(0.0, 500)
    assert fig.net_rate is None and fig.seconds_to_empty is None
    assert fig.trend == "unknown"
    assert describe(fig) == "pool 500 keys, trend not known yet"


def test_steady_drain_forecasts_the_exhaustion_time() -> None:
    f = BudgetForecaster(tau=10)
    level = 1000.0
    for t in range(61):
        fig = f.observe(float(t), level, consumed=3.0 * t)
        level -= 3
    # Constant -3/s: the EWMA of a constant is that constant.
    assert fig.net_rate == pytest.approx(-3.0)
    assert fig.consumption_rate == pytest.approx(3.0)
    assert fig.production_rate == pytest.approx(0.0, abs=1e-9)
    assert fig.seconds_to_empty == pytest.approx(fig.level / 3.0)
    assert fig.trend == "falling"


def test_growing_pool_never_runs_dry() -> None:
    f = BudgetForecaster(tau=10)
    for t in range(20):
        fig = f.observe(float(t), 100 + 5 * t, produced=5.0 * t)
    assert fig.seconds_to_empty == INF and fig.trend == "rising"
    assert fig.as_dict()["seconds_to_empty"] == "inf"
    assert describe(fig) == "pool 195 keys, rising 5/s"


def test_empty_pool_is_dry_now() -> None:
    f = BudgetForecaster(tau=10)
    f.observe(0.0, 3)
    fig = f.observe(1.0, 0)
    assert fig.seconds_to_empty == 0.0
    assert describe(fig) == "pool 0 keys, EMPTY"


def test_the_words_of_the_issue() -> None:
    f = BudgetForecaster(tau=5)
    level = 1212.0
    for t in range(201):
        fig = f.observe(float(t), level)
        level -= 3
    # 612 keys at -3/s: 204 s.
    assert fig.level == 612
    assert describe(fig) == "pool 612 keys, falling 3/s, dry in ~3 min"


def test_smoothing_follows_a_change_within_a_few_tau() -> None:
    f = BudgetForecaster(tau=10)
    level = 10_000.0
    t = 0.0
    for _ in range(100):  # -1/s for 100 s
        f.observe(t, level)
        t += 1
        level -= 1
    fig = f.observe(t, level)
    assert fig.net_rate == pytest.approx(-1.0)
    # The consumption jumps to 10/s; right after, the estimate lags ...
    level -= 10
    t += 1
    first = f.observe(t, level)
    assert -10 < first.net_rate < -1  # type: ignore[operator]
    # ... and within 5 tau it is within 1 % of the new rate.
    for _ in range(50):
        t += 1
        level -= 10
        fig = f.observe(t, level)
    assert fig.net_rate == pytest.approx(-10.0, rel=0.01)


def test_sampling_rate_does_not_change_the_estimate_of_a_jump() -> None:
    """A block of 50 keys taken at once moves the estimate by about 50/tau whether
    the pool is sampled every 0.1 s or every 2 s."""
    moves = []
    for step in (0.1, 2.0):
        f = BudgetForecaster(tau=30)
        t = 0.0
        f.observe(t, 1000)
        f.observe(t + step, 1000)  # a known rate of 0
        t += step
        t += step
        fig = f.observe(t, 950)
        moves.append(fig.net_rate)
    # Both about -50/30 (exactly -50/step * (1 - exp(-step/30))).
    for step, move in zip((0.1, 2.0), moves, strict=True):
        assert move == pytest.approx(-50 / step * (1 - math.exp(-step / 30)))
        assert move == pytest.approx(-50 / 30, rel=0.04)


def test_counter_restart_is_not_a_negative_rate() -> None:
    f = BudgetForecaster(tau=10)
    for t in range(10):
        f.observe(float(t), 100, consumed=100.0 + 2 * t)
    fig = f.observe(10.0, 100, consumed=0.0)  # the source restarted
    assert fig.consumption_rate == pytest.approx(2.0)
    fig = f.observe(11.0, 100, consumed=2.0)
    assert fig.consumption_rate == pytest.approx(2.0)


def test_same_instant_and_backwards_time() -> None:
    f = BudgetForecaster(tau=10)
    f.observe(5.0, 100)
    fig = f.observe(5.0, 90)
    assert fig.net_rate is None  # no time passed
    fig = f.observe(6.0, 80)
    assert fig.net_rate == pytest.approx(-10.0)
    fig = f.observe(1.0, 80)  # time went back: the old rate stays, no new one
    assert fig.net_rate == pytest.approx(-10.0)


def test_tau_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tau"):
        BudgetForecaster(tau=0)


@pytest.mark.parametrize(("seconds", "words"), [
    (0.4, "~0 s"), (45, "~45 s"), (204, "~3 min"), (3 * 3600, "~3 h"),
    (5 * 86400, "~5 d"), (INF, "never")])
def test_format_duration(seconds: float, words: str) -> None:
    assert format_duration(seconds) == words


@given(level=st.floats(0, 1e9), rate=st.floats(-1e6, 1e6))
def test_seconds_to_empty_is_level_over_drain(level: float, rate: float) -> None:
    tte = seconds_to_empty(level, rate)
    assert tte is not None and tte >= 0
    if level > 0 and rate < -1e-3:
        assert tte == pytest.approx(level / -rate)
    elif level > 0:
        assert tte == INF


def test_early_estimate_says_it_is_early() -> None:
    """One key taken in the first second reads as falling 1/s: true of the data, so it
    is shown, but marked as resting on a second of data until one time constant."""
    f = BudgetForecaster(tau=30)
    f.observe(0.0, 94)
    fig = f.observe(1.0, 93)
    assert not fig.settled and fig.window_s == 1.0
    assert describe(fig) == "pool 93 keys, falling 1/s, dry in ~2 min (estimate from 1 s of data)"
    for t in range(2, 32):
        fig = f.observe(float(t), 93)
    assert fig.settled and "estimate from" not in describe(fig)
