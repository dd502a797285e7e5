"""Toeplitz hashing: FFT path bit-exact against the dense matrix product."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkd.sim import privacy
from qkd.sim.privacy import (
    PrecisionError,
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


def test_fft_equals_dense_random_shapes() -> None:
    # 150 random shapes: the FFT plan L1 x L2 varies (L1 odd, even, divisible by 4, 1 or
    # 2), which changes which rows pair with themselves in the Hermitian step.
    rng = np.random.default_rng(2024)
    l1_kinds = set()
    for _ in range(150):
        n = int(rng.integers(1, 2500))
        m = int(rng.integers(1, 2500))
        x = rng.integers(0, 2, n, dtype=np.uint8)
        s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
        l1, _l2 = privacy._plan(n + m - 1)
        l1_kinds.add(min(l1, 3) if l1 < 3 else 3 + l1 % 2)
        assert np.array_equal(toeplitz_fft(x, s, m), toeplitz_dense(x, s, m)), (n, m)
    assert l1_kinds >= {3, 4}  # both odd and even L1 were exercised


@pytest.mark.parametrize("size", [1, 2, 3, 5, 97, 4001, 15_000_000, 10**9 + 7])
def test_plan_is_valid(size: int) -> None:
    l1, l2 = privacy._plan(size)
    assert l1 * l2 >= size and l2 % 2 == 0
    for v in (l1, l2):
        for p in (2, 3, 5):
            while v % p == 0:
                v //= p
        assert v == 1  # 5-smooth
    # Not wasteful: within 2 % of the size for large sizes.
    if size > 10**6:
        assert l1 * l2 <= 1.02 * size


def test_large_block_against_closed_forms() -> None:
    # 2^20-bit block (FFT of ~1.6e6 points): too big for the dense product, so use inputs
    # whose product is known in closed form. All ones: every output is n (the largest
    # value, worst for rounding). A unit vector e_j: output i is s[i - j + n - 1].
    n, m = 1 << 20, 1 << 19
    ones = toeplitz_fft(np.ones(n, np.uint8), np.ones(n + m - 1, np.uint8), m)
    assert np.array_equal(ones, np.full(m, n & 1, np.uint8))
    ones_odd = toeplitz_fft(np.ones(n - 1, np.uint8), np.ones(n + m - 2, np.uint8), m)
    assert np.array_equal(ones_odd, np.full(m, (n - 1) & 1, np.uint8))
    rng = np.random.default_rng(3)
    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    for j in (12345, n - 1):
        e = np.zeros(n, np.uint8)
        e[j] = 1
        assert np.array_equal(toeplitz_fft(e, s, m), s[n - 1 - j : n - 1 - j + m])
    # Linearity over GF(2) on random inputs: T(a ^ b) = T a ^ T b.
    a = rng.integers(0, 2, n, dtype=np.uint8)
    b = rng.integers(0, 2, n, dtype=np.uint8)
    assert np.array_equal(toeplitz_fft(a ^ b, s, m), toeplitz_fft(a, s, m) ^ toeplitz_fft(b, s, m))


def test_threads_give_the_same_bits() -> None:
    rng = np.random.default_rng(4)
    n, m = 12000, 9000
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    ref = toeplitz_dense(x, s, m)
    assert np.array_equal(toeplitz_fft(x, s, m, workers=2), ref)


def test_error_bound() -> None:
    # 10^7 input bits, m = n/2 (L = 1.5e7): eps = 10 u ceil(log2 L) = 10 * 2^-53 * 24,
    # W = 2.5e7, bound = eps (sqrt2 W^1.5 + sqrt(L) n) = 2.66e-14 * (1.77e11 + 3.87e10)
    # = 5.7e-3, far below the 1/4 the parity needs.
    b = privacy._error_bound(10**7, 15 * 10**6 - 1, 15 * 10**6)
    assert 5.5e-3 < b < 6.0e-3
    # It grows like n^1.5: at 10^9 bits one transform would not be provably exact.
    assert privacy._error_bound(10**9, 15 * 10**8, 15 * 10**8) > 0.25


def test_split_path_when_bound_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the "split the input" path (used above ~2e8 bits) on a small block.
    rng = np.random.default_rng(5)
    n, m = 3001, 1500
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    calls = []
    real = privacy._circular_conv

    def spy(xx: np.ndarray, ss: np.ndarray, workers: int = 1):
        calls.append(xx.size)
        return real(xx, ss, workers)

    monkeypatch.setattr(privacy, "_circular_conv", spy)
    monkeypatch.setattr(privacy, "_error_bound", lambda n, s_len, length: n / 1000.0)
    assert np.array_equal(toeplitz_fft(x, s, m), toeplitz_dense(x, s, m))
    # Halving until n / 1000 <= 1/4: 3001 -> 16 pieces of 187 or 188 bits.
    assert len(calls) == 16 and sum(calls) == n and max(calls) <= 250


def test_rounding_residual_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    x = rng.integers(0, 2, 500, dtype=np.uint8)
    s = rng.integers(0, 2, 999, dtype=np.uint8)
    real = privacy._circular_conv

    def noisy(xx: np.ndarray, ss: np.ndarray, workers: int = 1):
        y, length = real(xx, ss, workers)
        y[:] += 0.3  # as if the transform had lost precision
        return y, length

    monkeypatch.setattr(privacy, "_circular_conv", noisy)
    with pytest.raises(PrecisionError):
        toeplitz_fft(x, s, 500)


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


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), m=st.integers(1, 64), seed=st.integers(0, 2**32 - 1))
def test_row_path_equals_dense(n: int, m: int, seed: int) -> None:
    # The few-row path (verification tags) reads each row as a byte slice of the
    # reversed seed packed at 8 bit offsets: every offset and tail length occurs here.
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    assert np.array_equal(privacy._toeplitz_rows(x, s, m), toeplitz_dense(x, s, m))


def test_row_path_equals_dense_at_tag_size() -> None:
    rng = np.random.default_rng(50)
    for n in (8, 1_000_001, 2**20):
        x = rng.integers(0, 2, n, dtype=np.uint8)
        s = rng.integers(0, 2, n + 50 - 1, dtype=np.uint8)
        want = toeplitz_fft(x, s, 50)
        assert np.array_equal(privacy._toeplitz_rows(x, s, 50), want), n
