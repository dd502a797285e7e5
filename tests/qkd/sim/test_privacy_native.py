"""The compiled GF(2) Toeplitz kernel (_qkdgw_gf2) bit for bit against the references."""

from __future__ import annotations

import numpy as np
import pytest

from qkd import native
from qkd.sim import privacy
from qkd.sim.privacy import toeplitz_dense, toeplitz_fft, toeplitz_native

gf2 = native.load("gf2")
# A missing build must fail here, not skip: QKDGW_NATIVE=0 is the only accepted reason.
pytestmark = pytest.mark.skipif(not native.enabled(), reason="QKDGW_NATIVE=0: references only")

EDGE = [1, 2, 63, 64, 65, 127, 128, 129, 1000]
# Every base case this CPU can run: software clmul, PCLMULQDQ, VPCLMULQDQ (ymm).
PATHS = gf2.isas() if gf2 is not None else ["portable"]


def _case(rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    return (rng.integers(0, 2, n, dtype=np.uint8),
            rng.integers(0, 2, n + m - 1, dtype=np.uint8))


def test_kernel_is_built() -> None:
    assert gf2 is not None, "_qkdgw_gf2 missing: pip install -e . with a C compiler"


def test_isas() -> None:
    assert gf2.isas()[0] == "portable"
    assert gf2.has_pclmul() == ("pclmul" in gf2.isas())


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("n", EDGE)
@pytest.mark.parametrize("m", EDGE)
def test_edge_sizes_equal_dense(n: int, m: int, isa: str) -> None:
    rng = np.random.default_rng(1000 * n + m)
    x, s = _case(rng, n, m)
    assert np.array_equal(toeplitz_native(x, s, m, isa=isa), toeplitz_dense(x, s, m)), (n, m)


def test_force_portable_equals_dense() -> None:
    rng = np.random.default_rng(99)
    for n, m in ((1, 1), (65, 129), (3000, 1700), (40_000, 9_000)):
        x, s = _case(rng, n, m)
        # force_portable wins over isa: both name the software clmul here
        got = toeplitz_native(x, s, m, force_portable=True, isa=gf2.isas()[-1])
        assert np.array_equal(got, toeplitz_fft(x, s, m)), (n, m)


@pytest.mark.parametrize("isa", PATHS)
def test_random_sizes_equal_fft(isa: str) -> None:
    # Block plans vary with the shape: one square block, many column blocks (m << n),
    # many row blocks (m >> n), padded and unpadded Karatsuba sizes.
    portable = isa == "portable"
    rng = np.random.default_rng(13 + PATHS.index(isa))
    for _ in range(12 if portable else 30):
        n = int(rng.integers(1, 300_000))
        m = int(rng.integers(1, 300_000)) if rng.random() < 0.3 else int(rng.integers(1, n + 1))
        x, s = _case(rng, n, m)
        assert np.array_equal(toeplitz_native(x, s, m, isa=isa), toeplitz_fft(x, s, m)), (n, m)


def test_structured_inputs() -> None:
    # All ones (every output = n mod 2) and unit vectors (output = a seed window), where
    # a mistake in one block's seed offset or a dropped carry word would show.
    n, m = 70_000, 33_333
    assert np.array_equal(toeplitz_native(np.ones(n, np.uint8), np.ones(n + m - 1, np.uint8), m),
                          np.full(m, n & 1, np.uint8))
    rng = np.random.default_rng(7)
    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    for j in (0, 1, 63, 64, 4095, 4096, n - 1):
        e = np.zeros(n, np.uint8)
        e[j] = 1
        assert np.array_equal(toeplitz_native(e, s, m), s[n - 1 - j : n - 1 - j + m]), j


def test_low_bit_of_each_byte_is_used() -> None:
    # Bytes other than 0/1 count mod 2, as the dense reference computes.
    rng = np.random.default_rng(8)
    n, m = 777, 300
    x = rng.integers(0, 256, n, dtype=np.uint8)
    s = rng.integers(0, 256, n + m - 1, dtype=np.uint8)
    assert np.array_equal(toeplitz_native(x, s, m), toeplitz_dense(x & 1, s & 1, m))


def test_ten_million_bit_block() -> None:
    rng = np.random.default_rng(9)
    n = 10**7
    m = n // 2
    x, s = _case(rng, n, m)
    want = toeplitz_fft(x, s, m)
    for isa in PATHS[1:]:  # the hardware base cases (the software one takes ~5 s here)
        assert np.array_equal(toeplitz_native(x, s, m, isa=isa), want), isa


def test_hash_uses_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = gf2.toeplitz

    class Spy:
        has_pclmul = staticmethod(gf2.has_pclmul)

        @staticmethod
        def toeplitz(*a: object, **k: object) -> None:
            calls.append(a[2])
            real(*a, **k)

    monkeypatch.setattr(privacy.native, "load", lambda name: Spy if name == "gf2" else None)
    rng = np.random.default_rng(10)
    x, s = _case(rng, 5000, 2500)
    assert np.array_equal(privacy.privacy_amplification(x, s, 2500), toeplitz_dense(x, s, 2500))
    x, s = _case(rng, 5000, 50)
    assert np.array_equal(privacy.toeplitz_hash(x, s, 50), toeplitz_dense(x, s, 50))
    # (a CPU without PCLMULQDQ sends the long output to the FFT, see the next test)
    assert calls == ([2500, 50] if gf2.has_pclmul() else [50])


def test_no_pclmul_uses_fft_for_long_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU without PCLMULQDQ: the kernel only takes the few-row tags.
    calls = []
    real = gf2.toeplitz

    class NoClmul:
        @staticmethod
        def has_pclmul() -> bool:
            return False

        @staticmethod
        def toeplitz(*a: object, **k: object) -> None:
            calls.append(a[2])
            real(*a, **k)

    monkeypatch.setattr(privacy.native, "load", lambda name: NoClmul if name == "gf2" else None)
    rng = np.random.default_rng(12)
    for m in (50, 700):
        x, s = _case(rng, 3000, m)
        assert np.array_equal(privacy.toeplitz_hash(x, s, m), toeplitz_dense(x, s, m))
    assert calls == [50]


def test_reference_path_without_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # QKDGW_NATIVE=0: toeplitz_hash falls back to the FFT / row references.
    monkeypatch.setenv("QKDGW_NATIVE", "0")
    rng = np.random.default_rng(11)
    for m in (50, 700):
        x, s = _case(rng, 3000, m)
        assert np.array_equal(privacy.toeplitz_hash(x, s, m), toeplitz_dense(x, s, m))
    with pytest.raises(ValueError, match="not available"):
        toeplitz_native(x, s, 700)


def test_zero_sizes() -> None:
    out = np.empty(0, np.uint8)
    assert gf2.toeplitz(np.zeros(5, np.uint8), np.zeros(4, np.uint8), 0, out) is None
    assert toeplitz_native(np.zeros(0, np.uint8), np.ones(2, np.uint8), 3).tolist() == [0, 0, 0]


def test_bad_arguments_raise_value_error() -> None:
    x = np.zeros(100, np.uint8)
    with pytest.raises(ValueError, match="seed"):
        toeplitz_native(x, np.zeros(100, np.uint8), 5)
    with pytest.raises(ValueError, match="seed"):
        privacy.toeplitz_hash(x, np.zeros(200, np.uint8), 5)
    with pytest.raises(ValueError, match="m must be"):
        toeplitz_native(x, np.zeros(98, np.uint8), -1)
    with pytest.raises(ValueError, match="out must"):
        gf2.toeplitz(x, np.zeros(104, np.uint8), 5, np.empty(4, np.uint8))
    with pytest.raises(ValueError, match="output length"):
        privacy.privacy_amplification(x, np.zeros(200, np.uint8), 101)
    with pytest.raises(ValueError, match="isa"):
        gf2.toeplitz(x, np.zeros(104, np.uint8), 5, np.empty(5, np.uint8), isa="avx9000")
    with pytest.raises(TypeError):
        gf2.toeplitz(x, np.zeros(104, np.uint8), 5, b"read-only")
    # Positive control: the same call with a right-sized out works.
    out = np.empty(5, np.uint8)
    gf2.toeplitz(x, np.zeros(104, np.uint8), 5, out)
    assert out.tolist() == [0] * 5
