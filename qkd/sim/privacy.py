"""Toeplitz hashing over GF(2): privacy amplification and the verification hash.

The m x n Toeplitz matrix is fixed by a seed s of n + m - 1 bits: T[i, j] = s[i - j + n - 1].
Random Toeplitz matrices form a universal_2 family (collision probability 2^-m for any
two distinct inputs), which is what the leftover hash lemma needs.

T x is the middle part of the convolution s * x. A circular convolution of length
L >= n + m - 1 (= len(s)) already contains it without wrap-around, which makes the FFT
about 40% shorter than a full linear convolution. Float64 FFTs are exact here: outputs
are integers <= n, and the rounding residual is checked on every call.
"""

from __future__ import annotations

import numpy as np

try:  # scipy's pocketfft can work in place; numpy's is the fallback (same results)
    import scipy.fft as _sfft
except ImportError:  # pragma: no cover - exercised only without scipy
    _sfft = None

# Above this many output bits the FFT path is used; below it, bit-sliced dense products.
_DENSE_MAX_ROWS = 64


class PrecisionError(ArithmeticError):
    """The FFT rounding residual was too large to trust the parity (never seen in practice)."""


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (sizes the FFT handles fastest)."""
    if _sfft is not None:
        return int(_sfft.next_fast_len(n, real=True))
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def toeplitz_dense(x: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """Reference: build the matrix and multiply (O(mn) memory; tests and small m only)."""
    n = x.size
    if seed.size != n + m - 1:
        raise ValueError(f"seed must have n + m - 1 = {n + m - 1} bits, got {seed.size}")
    t = np.lib.stride_tricks.sliding_window_view(seed.astype(np.int64), n)[:m, ::-1]
    return ((t @ x.astype(np.int64)) & 1).astype(np.uint8)


def _toeplitz_rows(x: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    # Few rows: one packed AND + popcount parity per row.
    n = x.size
    xp = np.packbits(x)
    out = np.empty(m, np.uint8)
    for i in range(m):
        row = np.packbits(seed[i : i + n][::-1])
        out[i] = int(np.bitwise_count(np.bitwise_and(row, xp)).sum()) & 1
    return out


def toeplitz_fft(x: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    n = x.size
    if seed.size != n + m - 1:
        raise ValueError(f"seed must have n + m - 1 = {n + m - 1} bits, got {seed.size}")
    if m == 0:
        return np.zeros(0, np.uint8)
    size = _fast_len(n + m - 1)
    if _sfft is not None:
        fs = _sfft.rfft(seed.astype(np.float64), size, overwrite_x=True)
        fx = _sfft.rfft(x.astype(np.float64), size, overwrite_x=True)
        fs *= fx
        del fx
        conv = _sfft.irfft(fs, size, overwrite_x=True)
    else:
        fs = np.fft.rfft(seed.astype(np.float64), size)
        fs *= np.fft.rfft(x.astype(np.float64), size)
        conv = np.fft.irfft(fs, size)
    mid = conv[n - 1 : n - 1 + m]
    r = np.rint(mid)
    if m and float(np.max(np.abs(mid - r))) > 0.25:
        raise PrecisionError("FFT rounding residual above 1/4; refusing to guess parities")
    return (r.astype(np.int64) & 1).astype(np.uint8)


def toeplitz_hash(x: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """T(seed) x over GF(2), m output bits."""
    x = np.ascontiguousarray(x, dtype=np.uint8)
    seed = np.ascontiguousarray(seed, dtype=np.uint8)
    if m <= _DENSE_MAX_ROWS and x.size * m <= 1 << 26:
        if seed.size != x.size + m - 1:
            raise ValueError(f"seed must have n + m - 1 = {x.size + m - 1} bits, got {seed.size}")
        return _toeplitz_rows(x, seed, m)
    return toeplitz_fft(x, seed, m)


def privacy_amplification(key: np.ndarray, seed: np.ndarray, out_bits: int) -> np.ndarray:
    """Compress `key` to `out_bits` bits with the Toeplitz matrix given by `seed`."""
    if not 0 <= out_bits <= key.size:
        raise ValueError(f"output length must be in [0, {key.size}], got {out_bits}")
    return toeplitz_hash(key, seed, out_bits)
