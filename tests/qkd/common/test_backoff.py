"""qkd.common.backoff: the doubling, the cap, the reset and the jitter bounds."""

from __future__ import annotations

import random

import pytest

from qkd.common.backoff import Backoff, next_delay


def test_doubles_to_the_cap_and_resets() -> None:
    b = Backoff(0.2, 2.0)
    assert b.delay == 0.2
    assert [b.failed() for _ in range(6)] == [0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert b.succeeded() == 0.2 and b.delay == 0.2
    assert b.failed() == 0.4


def test_same_sequence_as_the_loops_it_replaced() -> None:
    # The hand-written loops: delay = min(delay * 2, cap), cap per failure kind.
    b = Backoff(0.2, 10.0)
    delay = 0.2
    for cap in (10.0, 2.0, 10.0, 10.0, 2.0, 10.0, 10.0, 10.0, 10.0):
        delay = min(delay * 2, cap)
        assert b.failed(cap=cap) == delay
    assert next_delay(3.0, 10.0) == 6.0 and next_delay(6.0, 10.0) == 10.0


def test_jitter_stays_within_bounds_and_varies() -> None:
    b = Backoff(1.0, 8.0, jitter=0.5, rng=random.Random(1))
    seen = []
    for _ in range(50):
        seen.append(b.failed())
        assert 0.5 * min(b._base, 8.0) <= b.delay <= b._base <= 8.0
    assert len(set(seen)) > 10  # control: jitter on really draws
    assert Backoff(1.0, 8.0).failed() == 2.0  # and off gives the exact value


@pytest.mark.parametrize(("initial", "cap", "jitter"), [(0.0, 1.0, 0.0), (2.0, 1.0, 0.0),
                                                         (1.0, 2.0, 1.0)])
def test_bad_parameters_refused(initial: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial, cap, jitter=jitter)
