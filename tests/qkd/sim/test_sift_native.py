"""The compiled sifting pass (bb84.sift_select) and the Detections encoder's check
(bb84.increasing_in) against the numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from qkd import native
from qkd.sim import constants as c
from qkd.sim import messages as m
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


# --- PackedDetections.body: one checking pass, the encoder delta-codes -----------------

def _slots(rng: np.random.Generator, n: int, big: bool) -> np.ndarray:
    gaps = rng.geometric(0.3, n).astype(np.int64)
    if big and n:  # some multi-byte deltas, up to 2^40
        sel = rng.random(n) < 0.05
        gaps[sel] = rng.integers(128, 1 << 40, int(sel.sum()))
    return np.cumsum(gaps) - 1 + (int(rng.integers(0, 1 << 20)) if big else 0)


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 127, 128, 129, 5000])
@pytest.mark.parametrize("seed", range(6))
def test_packed_detections_body_matches_reference(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed * 7919 + n)
    for big in (False, True):
        slots = _slots(rng, n, big)
        bases = rng.integers(0, 2, n, dtype=np.uint8)
        msg = m.PackedDetections(slots, bases)
        assert msg.body() == msg.body_reference()
        back = m.decode(msg.encode())
        assert np.array_equal(back.slots, slots) and np.array_equal(back.bases, bases)


def test_packed_detections_body_at_the_limits() -> None:
    for slots in ([0], [c.ID_LIMIT - 1], [0, c.ID_LIMIT - 1], [127], [128],
                  [5, 6, 7, c.ID_LIMIT - 1]):
        msg = m.PackedDetections(np.array(slots, np.int64), np.zeros(len(slots), np.uint8))
        assert msg.body() == msg.body_reference()


@pytest.mark.parametrize("slots", [[-1], [c.ID_LIMIT], [3, 3], [4, 3], [0, 1, 2, 2, 5],
                                   [0, 5, 1 << 62], [0, 1, -5], [-(1 << 63), 0]])
def test_packed_detections_body_refuses_as_reference(slots: list[int]) -> None:
    msg = m.PackedDetections(np.array(slots, np.int64), np.zeros(len(slots), np.uint8))
    with pytest.raises(ValueError, match="strictly increasing") as fast:
        msg.body()
    with pytest.raises(ValueError, match="strictly increasing") as ref:
        msg.body_reference()
    assert str(fast.value) == str(ref.value)


@pytest.mark.parametrize("seed", range(20))
def test_increasing_in_matches_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 200))
    v = np.sort(rng.integers(-3, 300, n)).astype(np.int64)
    if n > 1 and seed % 2:
        v[int(rng.integers(1, n))] = v[0]  # a repeat or a decrease somewhere
    limit = int(rng.integers(0, 400))
    want = bool(n == 0 or (v[0] >= 0 and (np.diff(v) > 0).all() and v[-1] < limit))
    assert kernel.increasing_in(v, limit) is want
    with pytest.raises(ValueError):
        kernel.increasing_in(np.zeros(3, np.uint8), 10)
