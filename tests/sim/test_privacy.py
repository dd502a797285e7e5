"""Toeplitz hashing: FFT path bit-exact against the dense matrix product."""

from __future__ import annotations

import numpy as np
import pytest

from qkd.sim.privacy import (
    privacy_amplification,
    toeplitz_dense,
    toeplitz_fft,
    toeplitz_hash,
)


@pytest.mark.parametrize(("n", "m"), [(1, 1), (7, 3), (1000, 1), (1000, 64), (1000, 65),
                                      (4096, 2048), (5000, 4999), (12345, 6000)])
def test_fft_equals_dense(n: int, m: int) -> None:
    rng = np.random.default_rng(n * 7 + m)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    ref = toeplitz_dense(x, s, m)
    assert np.array_equal(toeplitz_fft(x, s, m), ref)
    assert np.array_equal(toeplitz_hash(x, s, m), ref)


def test_fft_exact_on_extreme_inputs() -> None:
    # All-ones input and seed maximise the convolution values (up to n), the hardest
    # case for floating-point rounding.
    n, m = 20000, 15000
    x = np.ones(n, np.uint8)
    s = np.ones(n + m - 1, np.uint8)
    assert np.array_equal(toeplitz_fft(x, s, m), toeplitz_dense(x, s, m))


def test_matrix_convention() -> None:
    # T[i, j] = s[i - j + n - 1]: with x = e_j, output bit i is s[i - j + n - 1].
    n, m = 5, 3
    s = np.array([1, 0, 0, 1, 1, 0, 1], np.uint8)
    for j in range(n):
        x = np.zeros(n, np.uint8)
        x[j] = 1
        expected = np.array([s[i - j + n - 1] for i in range(m)], np.uint8)
        assert np.array_equal(toeplitz_hash(x, s, m), expected)


def test_seed_length_checked() -> None:
    with pytest.raises(ValueError, match="seed"):
        toeplitz_hash(np.zeros(10, np.uint8), np.zeros(10, np.uint8), 3)
    with pytest.raises(ValueError, match="output length"):
        privacy_amplification(np.zeros(10, np.uint8), np.zeros(20, np.uint8), 11)


def test_universal_collision_rate() -> None:
    # Universal_2: for fixed x != y, P_seed[T x = T y] = 2^-m. With m = 4 and 4000
    # seeds, the collision count is Binomial(4000, 1/16): mean 250, sd 15.3; accept 5 sd.
    rng = np.random.default_rng(1)
    n, m = 64, 4
    x = rng.integers(0, 2, n, dtype=np.uint8)
    y = x.copy()
    y[10] ^= 1
    hits = 0
    for _ in range(4000):
        s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
        hits += np.array_equal(toeplitz_hash(x, s, m), toeplitz_hash(y, s, m))
    assert abs(hits - 250) <= 5 * 15.3
