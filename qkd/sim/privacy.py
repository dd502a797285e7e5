"""Toeplitz hashing over GF(2): privacy amplification and the verification hash.

The m x n Toeplitz matrix is fixed by a seed s of n + m - 1 bits: T[i, j] = s[i - j + n - 1].
Random Toeplitz matrices form a universal_2 family (collision probability 2^-m for any
two distinct inputs), which is what the leftover hash lemma needs.

T x is the middle part of the product s * x: output bit i is coefficient i + n - 1.

`toeplitz_hash` (and so `privacy_amplification` and the verification tag) uses the
compiled kernel `_qkdgw_gf2` (qkd/native/gf2.c) when it is built: bit-packed carry-less
polynomial arithmetic, a transposed Karatsuba middle product over square blocks down to a
VPCLMULQDQ (ymm) or PCLMULQDQ base case; exact by construction, ~90 Mbit/s on 10^7-bit
blocks with m = n/2 here (~50 with 128-bit PCLMULQDQ only). Its portable software clmul
(CPUs without PCLMULQDQ) is slower than the FFT, so there it only serves the few-row tags.
Without the kernel (or with QKDGW_NATIVE=0) the references below run; the tests compare
the kernel with them bit for bit:

* `toeplitz_dense` builds the matrix (tests, small sizes); `_toeplitz_rows` does one packed
  AND + parity per row (m <= PA_DENSE_MAX_ROWS, the verification tags);
* `toeplitz_fft` computes the convolution over the reals with float64 FFTs and reads the
  parities after rounding (~15-20 Mbit/s here; a float FFT of the 1.5e7 points caps near
  30 Mbit/s on this machine).

How `_circular_conv` computes the convolution, for N = n + m - 1 bits:

* L = L1 * L2 >= N with L1, L2 5-smooth (L2 even) and close to sqrt(L), so every FFT
  is short and cache resident; for 10^7 input bits and m = n/2, L = N + 1 = 4000 * 3750.
* ONE complex FFT of z = s + i x gives both spectra (S_k = (Z_k + conj Z_-k)/2,
  X_k = (Z_k - conj Z_-k)/2i, so S_k X_k = (Z_k^2 - conj(Z_-k)^2)/4i), computed as a
  four-step FFT: L2 transforms of length L1 down the columns, a twiddle, then L1 row
  transforms of length L2. The spectrum stays in that transposed order: all later steps
  are pointwise or pair row k1 with row -k1, and rows are processed in small blocks
  (a block and its mirror) while they sit in cache.
* The product is Hermitian, so the real inverse is one complex inverse FFT of length
  L/2 (even outputs in the real part, odd in the imaginary part), again four-step,
  whose row transforms are done in the same block loop.
* Everything happens inside one L-point complex buffer: the whole transform touches
  16 L bytes of fresh memory once (page faults on large new arrays cost as much as an
  FFT pass here).

FFT exactness: the exact outputs are integers in [0, n]; parities are read after rounding,
so the floating-point error must stay below 1/2. `_error_bound` gives a rigorous a-priori
bound (see there); the transform refuses a size whose bound exceeds 1/4 and instead
splits the input (T x = T_a x_a xor T_b x_b). For 10^7 bits the bound is ~6e-3, and the
rounding residual of every call is also checked against 1/4.
Float32 transforms are not used: the same bound with u = 2^-24 exceeds 1/2 by orders of
magnitude at any block size worth an FFT.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft as _sfft

from qkd import native
from qkd.common.errors import QkdError
from qkd.sim.constants import PA_BLOCK_BYTES, PA_DENSE_MAX_ROWS, PA_MAX_ERROR

_U = 2.0**-53  # unit roundoff of float64

_POPCOUNT = np.array([bin(i).count("1") & 1 for i in range(256)], np.uint8)


class PrecisionError(QkdError, ArithmeticError):
    """The FFT rounding residual was too large to trust the parity (never seen in practice)."""


def toeplitz_dense(x: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """Reference: build the matrix and multiply (O(mn) memory; tests and small m only)."""
    n = x.size
    if seed.size != n + m - 1:
        raise ValueError(f"seed must have n + m - 1 = {n + m - 1} bits, got {seed.size}")
    t = np.lib.stride_tricks.sliding_window_view(seed.astype(np.int64), n)[:m, ::-1]
    return ((t @ x.astype(np.int64)) & 1).astype(np.uint8)


def _toeplitz_rows(x: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    # Few rows: one packed AND + parity per row. Row i is seed[i : i + n] reversed,
    # i.e. the reversed seed from bit j = len(seed) - n - i on; the reversed seed is
    # packed once at each of the 8 bit offsets, so every row is a byte slice of one of
    # them (packing each row anew cost 8x more). Bits past n in a row's last byte
    # meet the zero padding of packbits(x).
    n = x.size
    xp = np.packbits(x)
    rev = seed[::-1]
    shifted = [np.packbits(rev[r:]) for r in range(min(8, rev.size))]
    nb = xp.size
    out = np.empty(m, np.uint8)
    for i in range(m):
        j = seed.size - n - i
        row = shifted[j % 8][j // 8 : j // 8 + nb]
        if row.size < nb:  # the padding bits of a short tail: zero, like xp's
            row = np.concatenate([row, np.zeros(nb - row.size, np.uint8)])
        acc = np.bitwise_xor.reduce(np.bitwise_and(row, xp))
        out[i] = _POPCOUNT[int(acc)]
    return out


# --- planning ---------------------------------------------------------------------------


def _smooth_numbers(lo: int, hi: int) -> list[int]:
    """All 2^a 3^b 5^c in [lo, hi]."""
    out = []
    p2 = 1
    while p2 <= hi:
        p3 = p2
        while p3 <= hi:
            p5 = p3
            while p5 <= hi:
                if p5 >= lo:
                    out.append(p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return sorted(out)


def _plan(size: int) -> tuple[int, int]:
    """(L1, L2): 5-smooth factors with L2 even, L1 * L2 >= size, L minimal, then balanced."""
    size = max(size, 2)
    r = math.isqrt(size)
    best: tuple[tuple[int, float], int, int] | None = None
    for l1 in _smooth_numbers(max(1, r // 8), 8 * r + 8):
        l2 = -(-size // l1)
        l2 += l2 & 1
        while True:  # smallest even 5-smooth number >= l2
            l2 = int(_sfft.next_fast_len(l2, real=True))  # 5-smooth
            if l2 % 2 == 0:
                break
            l2 += 1
        key = (l1 * l2, abs(math.log(l1 / l2)))
        if best is None or key < best[0]:
            best = (key, l1, l2)
    assert best is not None
    return best[1], best[2]


def _error_bound(n: int, s_len: int, length: int) -> float:
    """Rigorous bound on max |computed - exact| of the convolution outputs.

    With u = 2^-53, an FFT of length L whose twiddles are within a few ulp has normwise
    relative error <= eps = c u log2 L (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., Thm. 24.2: eta = mu + gamma_4 (sqrt 2 + mu) per radix-2 level;
    we take c = 10 per factor of 2 to cover the radix-3/4/5 kernels, the four-step twiddle
    (a product of two exp() values) and the separation and Hermitian-folding steps).
    For z = s + i x (weights W = |s| + |x| <= s_len + n, ||z||_2 <= sqrt(W)):
      spectrum error ||dZ||_2 <= eps sqrt(L) ||z||_2, and |Z_k| <= W, so the product
      S_k X_k = (Z_k^2 - conj(Z_-k)^2)/4i has ||dP||_2 <= eps W sqrt(L) ||z||_2 (rounding
      of the squares adds u W sqrt(L) ||z||_2, absorbed in c);
      the inverse maps that to <= eps W ||z||_2 in the outputs, and adds its own
      eps ||c||_2 <= eps sqrt(L) n (every exact output is <= n).
    The max-norm is at most the 2-norm, hence
      |error| <= eps (sqrt(2) W sqrt(W) + sqrt(L) n)
    (the sqrt 2: folding the Hermitian spectrum to length L/2 has operator norm 1, and
    the half-length inverse divides by sqrt(L/2) instead of sqrt(L)).
    10^7 input bits, m = n/2: eps = 2.7e-14, bound = 5.7e-3.
    """
    eps = 10.0 * _U * math.ceil(math.log2(max(length, 2)))
    w = float(n + s_len)
    return eps * (math.sqrt(2.0) * w * math.sqrt(w) + math.sqrt(length) * n)


# --- the transform ----------------------------------------------------------------------


def _twiddle_mul(a: np.ndarray, rows: np.ndarray, denom: int, sign: float,
                 scale: float = 1.0) -> None:
    """a[r, c] *= scale * exp(sign 2 pi i rows[r] c / denom), in place, c = 0..cols-1.

    exp(i t (c1 B + c2)) = exp(i t c1 B) exp(i t c2): two small tables instead of one
    exp() per element; every argument is reduced mod denom in exact integers first.
    """
    cols = a.shape[1]
    b = max((d for d in range(1, math.isqrt(cols) + 1) if cols % d == 0), default=1)
    r = rows.astype(np.int64)[:, None]
    hi = np.arange(cols // b, dtype=np.int64)[None, :] * b
    lo = np.arange(b, dtype=np.int64)[None, :]
    f = sign * 2.0 * math.pi / denom
    t_hi = np.exp(1j * (f * ((r * hi) % denom)))
    if scale != 1.0:
        t_hi *= scale
    t_lo = np.exp(1j * (f * ((r * lo) % denom)))
    a3 = a.reshape(a.shape[0], cols // b, b)
    if not np.may_share_memory(a3, a):  # rows must be contiguous for an in-place view
        raise RuntimeError("twiddle block is not a view")
    a3 *= t_hi[:, :, None]
    a3 *= t_lo[:, None, :]


def _fft_inplace(a: np.ndarray, axis: int, inverse: bool, workers: int) -> None:
    """FFT of `a` along `axis`, result stored in `a` (scipy writes in place when asked;
    if it ever hands back a different buffer, copy)."""
    fn = _sfft.ifft if inverse else _sfft.fft
    res = fn(a, axis=axis, overwrite_x=True, workers=workers)
    if not np.may_share_memory(res, a):
        a[...] = res


def _circular_conv(x: np.ndarray, s: np.ndarray, workers: int = 1
                   ) -> tuple[np.ndarray, int]:
    """Circular convolution of the bit vectors s and x (len(x) <= len(s)) over the reals.

    Returns (y, length) where y is a float64 view of length >= len(s) holding c[0 .. L-1]
    (flattened rows, see the module docstring); entries at index >= len(s) are unused.
    """
    n, size = x.size, s.size
    l1, l2 = _plan(size)
    length, m2 = l1 * l2, l2 // 2
    half = l1 * m2
    # z = s + i x, rows of length L2 (row-major index L2 n1 + n2).
    z = np.zeros((l1, l2), np.complex128)
    zf = z.reshape(-1).view(np.float64)
    zf[0 : 2 * size : 2] = s
    zf[1 : 2 * n : 2] = x
    # Step 1: length-L1 transforms down the columns, in place.
    _fft_inplace(z, 0, False, workers)

    k1_tw = np.exp(2j * math.pi * np.arange(l1) / length)  # e^{2 pi i k1 / L}
    k2_tw = np.exp(2j * math.pi * np.arange(m2) / l2)  # e^{2 pi i k2 / L2}

    def rows_forward(a: int, b: int) -> np.ndarray:
        """Finish the forward transform of rows a..b-1: twiddle, row FFTs (in place)."""
        blk = z[a:b]
        _twiddle_mul(blk, np.arange(a, b), length, -1.0)
        _fft_inplace(blk, 1, False, workers)
        return blk

    def rows_inverse(a: int, d: np.ndarray) -> None:
        """d = Z_k^2 - conj(Z_-k)^2 for rows a..: fold to length L/2, inverse row FFTs,
        inverse twiddle; written to z[rows, :L2/2]."""
        k1 = np.arange(a, a + d.shape[0])
        lo, hi = d[:, :m2], d[:, m2:]
        # P = d / 4i; U = (P_lo + P_hi)/2 + i e^{2 pi i k/L} (P_lo - P_hi)/2
        #   = (e^{2 pi i k/L} (d_lo - d_hi) - i (d_lo + d_hi)) / 8   (1/8 applied below)
        ssum = lo + hi
        lo -= hi
        lo *= k2_tw[None, :]
        lo *= k1_tw[k1, None]
        ssum *= -1j
        lo += ssum
        out = z[a : a + d.shape[0], :m2]
        out[...] = lo
        _fft_inplace(out, 1, True, workers)
        _twiddle_mul(out, k1, half, 1.0, 0.125)

    def self_paired(r: int, rev: np.ndarray) -> None:
        c = z[r : r + 1]
        d = c * c
        rev2 = rev * rev
        np.conjugate(rev2, out=rev2)
        d -= rev2
        rows_inverse(r, d)

    # Row 0 pairs with itself: Z_-k at (0, -k2 mod L2).
    c0 = rows_forward(0, 1)
    self_paired(0, np.roll(c0[:, ::-1], 1, axis=1))
    # Row k1 (1 <= k1 < L1/2) pairs with row L1 - k1, reversed: Z_-k at (L1-k1, L2-1-k2).
    npairs = (l1 - 1) // 2
    step = max(1, PA_BLOCK_BYTES // (16 * l2))
    for a in range(1, npairs + 1, step):
        b = min(a + step, npairs + 1)
        ca = rows_forward(a, b)
        cm = rows_forward(l1 - b + 1, l1 - a + 1)  # rows L1-b+1 .. L1-a, i.e. mirrors reversed
        rev = cm[::-1, ::-1]
        d = ca * ca
        t = rev * rev
        np.conjugate(t, out=t)
        d -= t
        # Mirror rows: d(-k) = -conj(d(k)); in the mirror block's row order.
        dm = d[::-1, ::-1].conj()
        np.negative(dm, out=dm)
        rows_inverse(a, d)
        rows_inverse(l1 - b + 1, dm)
    if l1 % 2 == 0:
        r = l1 // 2
        cr = rows_forward(r, r + 1)
        self_paired(r, cr[:, ::-1])
    # Last step of the inverse: length-L1 transforms down the columns of the left half.
    u = z[:, :m2]
    _fft_inplace(u, 0, True, workers)
    # u[n1, n2] = c[2 (M2 n1 + n2)] + i c[2 (M2 n1 + n2) + 1]
    y = u.view(np.float64)  # (L1, 2 M2) strided rows = c in row-major order
    return y, length


def _parities(y: np.ndarray, start: int, count: int) -> np.ndarray:
    """Rounded parities of flat entries start..start+count-1 of the 2-D float view y."""
    width = y.shape[1]
    r0, r1 = start // width, (start + count - 1) // width + 1
    out = np.empty((r1 - r0) * width, np.uint8)
    # Adding 1.5 * 2^52 rounds |v| < 2^51 to an integer held in the low mantissa bits.
    magic = 6755399441055744.0
    step = max(1, (1 << 16) // width)  # rows per cache-sized slab
    resid = 0.0
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        blk = y[a:b]
        t = blk + magic
        np.bitwise_and(t.view(np.int64), 1, out=out[(a - r0) * width : (b - r0) * width]
                       .reshape(b - a, width), casting="unsafe")
        t -= magic
        t -= blk
        resid = max(resid, float(np.max(np.abs(t))))
    if resid > PA_MAX_ERROR:
        raise PrecisionError("FFT rounding residual above 1/4; refusing to guess parities")
    off = start - r0 * width
    return out[off : off + count]


def toeplitz_fft(x: np.ndarray, seed: np.ndarray, m: int, workers: int = 1) -> np.ndarray:
    """T(seed) x over GF(2) by FFT; bit-exact (see the module docstring).

    `workers` > 1 lets scipy's FFT use threads (the per-core figures use 1).
    """
    x = np.ascontiguousarray(x, dtype=np.uint8)
    seed = np.ascontiguousarray(seed, dtype=np.uint8)
    n = x.size
    if seed.size != n + m - 1:
        raise ValueError(f"seed must have n + m - 1 = {n + m - 1} bits, got {seed.size}")
    if m == 0:
        return np.zeros(0, np.uint8)
    length = int(np.prod(_plan(seed.size)))
    if n > 1 and _error_bound(n, seed.size, length) > PA_MAX_ERROR:
        # T x = T_a x_a xor T_b x_b over the two halves of x; each half needs the seed
        # window its columns use: columns j < na use s[n - na : n + m - 1], the rest
        # (shifted by na) use s[: nb + m - 1].
        na = n // 2
        nb = n - na
        ya = toeplitz_fft(x[:na], seed[n - na :], m, workers)
        yb = toeplitz_fft(x[na:], seed[: nb + m - 1], m, workers)
        return ya ^ yb
    y, _ = _circular_conv(x, seed, workers)
    return _parities(y, n - 1, m)


def toeplitz_native(x: np.ndarray, seed: np.ndarray, m: int, force_portable: bool = False,
                    isa: str | None = None) -> np.ndarray:
    """T(seed) x by the compiled GF(2) kernel; ValueError if the kernel is not built.

    `force_portable` uses the software carry-less multiply even on a CPU with PCLMULQDQ
    (so the tests cover the fallback on any machine); `isa` picks any base case the CPU
    has (`_qkdgw_gf2.isas()`: "portable", "pclmul", "vpclmul"), default the fastest.
    """
    gf2 = native.load("gf2")
    if gf2 is None:
        raise ValueError("native GF(2) kernel _qkdgw_gf2 not available (build with pip install .)")
    x = np.ascontiguousarray(x, dtype=np.uint8)
    seed = np.ascontiguousarray(seed, dtype=np.uint8)
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    out = np.empty(m, np.uint8)
    gf2.toeplitz(x, seed, m, out, force_portable=force_portable, isa=isa)
    return out


def toeplitz_hash(x: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """T(seed) x over GF(2), m output bits (compiled kernel if built, else the references)."""
    x = np.ascontiguousarray(x, dtype=np.uint8)
    seed = np.ascontiguousarray(seed, dtype=np.uint8)
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    if seed.size != x.size + m - 1:
        raise ValueError(f"seed must have n + m - 1 = {x.size + m - 1} bits, got {seed.size}")
    gf2 = native.load("gf2")
    # Without PCLMULQDQ the kernel's software clmul (~2 Mbit/s on 1e7 bits) loses to the
    # FFT; it still wins for the few-row tags.
    if gf2 is not None and (gf2.has_pclmul() or m <= PA_DENSE_MAX_ROWS):
        out = np.empty(m, np.uint8)
        gf2.toeplitz(x, seed, m, out)
        return out
    # The row path costs m passes over n/8 bytes: below PA_DENSE_MAX_ROWS rows that beats
    # an FFT of n + m bits at any n (a 50-bit tag of 2e6 bits: 0.01 s against 0.08 s).
    if m <= PA_DENSE_MAX_ROWS:
        return _toeplitz_rows(x, seed, m)
    return toeplitz_fft(x, seed, m)


def privacy_amplification(key: np.ndarray, seed: np.ndarray, out_bits: int) -> np.ndarray:
    """Compress `key` to `out_bits` bits with the Toeplitz matrix given by `seed`."""
    if not 0 <= out_bits <= key.size:
        raise ValueError(f"output length must be in [0, {key.size}], got {out_bits}")
    return toeplitz_hash(key, seed, out_bits)
