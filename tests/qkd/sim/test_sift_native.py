"""The compiled sifting pass (bb84.sift_select) against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from qkd import native
from qkd.sim.protocol import _Party

kernel = native.load("bb84")
pytestmark = pytest.mark.skipif(kernel is None, reason="compiled kernels not built")


def _party() -> _Party:
    from qkd.sim.protocol import SessionResult

    p = _Party.__new__(_Party)
    p.result = SessionResult()
    return p


def _both(a: np.ndarray, b: np.ndarray, i: np.ndarray) -> None:
    fast, ref = _party(), _party()
    zf, xf = fast._sift_counts(a, b, i)
    zr, xr = ref._sift_counts_reference(a, b, i)
    assert zf.dtype == zr.dtype and np.array_equal(zf, zr)
    assert xf.dtype == xr.dtype and np.array_equal(xf, xr)
    for name in ("n_z", "n_x", "sifted_bits", "test_bits"):
        assert getattr(fast.result, name) == getattr(ref.result, name), name


@pytest.mark.parametrize("n", [0, 1, 2, 7, 63, 64, 65, 127, 128, 129, 1000, 4099])
@pytest.mark.parametrize("seed", range(8))
def test_matches_reference(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed * 1000 + n)
    a = rng.integers(0, 2, n, dtype=np.uint8)
    b = rng.integers(0, 2, n, dtype=np.uint8)
    i = rng.integers(0, 3, n, dtype=np.uint8)
    _both(a, b, i)


@pytest.mark.parametrize("seed", range(4))
def test_odd_values_match_reference(seed: int) -> None:
    # Bases outside {0, 1} and classes >= 3 (not produced by the protocol): the kernel
    # still selects and counts exactly as the reference does.
    rng = np.random.default_rng(seed)
    n = 3000
    a = rng.integers(0, 4, n, dtype=np.uint8)
    b = rng.integers(0, 4, n, dtype=np.uint8)
    i = rng.integers(0, 256, n, dtype=np.uint8)
    _both(a, b, i)


def test_all_same_basis() -> None:
    n = 130
    z = np.zeros(n, np.uint8)
    _both(z, z, np.full(n, 2, np.uint8))
    o = np.ones(n, np.uint8)
    _both(o, o, np.ones(n, np.uint8))
    _both(z, o, np.zeros(n, np.uint8))  # nothing matches


def test_non_contiguous_and_other_dtypes_use_a_correct_path() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(0, 2, 2000, dtype=np.uint8)[::2]
    b = rng.integers(0, 2, 2000, dtype=np.uint8)[::2]
    i = rng.integers(0, 3, 2000, dtype=np.uint8)[::2]
    _both(a, b, i)
    _both(a.astype(bool), b.astype(np.int64), i.astype(np.int16))


def test_kernel_checks_sizes() -> None:
    a = np.zeros(10, np.uint8)
    out = np.empty(10, np.int64)
    with pytest.raises(ValueError):
        kernel.sift_select(a, a[:9], a, 0, 1, out, out.copy())
    with pytest.raises(ValueError):
        kernel.sift_select(a, a, a, 0, 1, out[:9], out.copy())
    with pytest.raises(ValueError):
        kernel.sift_select(a, a, a, 0, 1, out, np.empty(9, np.int64))
    # positive control: the right sizes pass
    assert kernel.sift_select(a, a, a, 0, 1, out, out.copy())[:2] == (10, 0)
