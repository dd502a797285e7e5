"""Algebraic manipulation detection (AMD) code over GF(2^128) for relayed keys.

Cramer, Dodis, Fehr, Padro, Wichs (2008): E(K) = K | x | t, x uniform, t = f(x, m)
with f(x, m) = x^(n+2) + sum_{i=1..n} m_i x^i. Any XOR change to E(K) chosen without
seeing x passes `tag_matches` with another key with probability <= (n+1)/2^128.
docs/network.md ("End-to-end integrity") has the construction and the bound.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable

from qkd.network.constants import AMD_BYTES

BLOCK_BYTES = AMD_BYTES // 2  # one GF(2^128) element: x, t, each key block
_R = (1 << 7) | (1 << 2) | (1 << 1) | 1  # z^128 = z^7 + z^2 + z + 1
_MASK = (1 << 128) - 1


def gf_mul(a: int, b: int) -> int:
    """a * b in GF(2^128) = GF(2)[z] / (z^128 + z^7 + z^2 + z + 1); bit i is z^i."""
    if not (0 <= a <= _MASK and 0 <= b <= _MASK):
        raise ValueError("GF(2^128) elements are 128-bit non-negative ints")
    prod = 0
    while b:  # carry-less multiply
        if b & 1:
            prod ^= a
        a <<= 1
        b >>= 1
    # Fold the bits above 127 back in twice: z^128 = _R, and _R times a 127-bit high
    # part can still reach past bit 127 (by at most 7 bits).
    for _ in range(2):
        high = prod >> 128
        prod &= _MASK
        for bit in range(8):
            if (_R >> bit) & 1:
                prod ^= high << bit
    return prod


def _elements(key: bytes) -> list[int]:
    """The message vector m: the key's 16-byte blocks (the last zero-padded), then the
    key length (so keys differing only in trailing zero bytes differ), then one zero
    block if needed to make n odd: the CDFPW bound needs the field's characteristic (2)
    not to divide n + 2."""
    padded = key + bytes(-len(key) % BLOCK_BYTES)
    m = [int.from_bytes(padded[i : i + BLOCK_BYTES], "big")
         for i in range(0, len(padded), BLOCK_BYTES)]
    m.append(len(key))
    if len(m) % 2 == 0:
        m.append(0)
    return m


def block_count(key_bytes: int) -> int:
    """n, the number of field elements the tag polynomial covers for this key length."""
    d = -(-key_bytes // BLOCK_BYTES) + 1
    return d + (d % 2 == 0)


def tag(key: bytes, x: int) -> int:
    """t = x^(n+2) + sum m_i x^i (Horner, from the top)."""
    m = _elements(key)
    acc = x  # the coefficient 1 of x^(n+2), times x once below per m_i
    for mi in reversed(m):
        acc = gf_mul(acc, x) ^ mi
    return gf_mul(acc, x)


def encode(key: bytes, rng: Callable[[int], bytes] = secrets.token_bytes) -> bytes:
    """E(K) = K | x | t, x drawn from `rng` (the OS CSPRNG unless a test scripts it)."""
    x = int.from_bytes(rng(BLOCK_BYTES), "big")
    return key + x.to_bytes(BLOCK_BYTES, "big") + tag(key, x).to_bytes(BLOCK_BYTES, "big")


def split(encoded: bytes) -> tuple[bytes, bytes, bytes]:
    """(K, x, t) of an encoding, unchecked."""
    if len(encoded) < AMD_BYTES:
        raise ValueError("an AMD encoding is at least 32 bytes")
    kb = len(encoded) - AMD_BYTES
    return encoded[:kb], encoded[kb : kb + BLOCK_BYTES], encoded[kb + BLOCK_BYTES :]


def tag_matches(encoded: bytes) -> bool:
    """Whether t is f(x, K) (constant-time comparison of the 16 bytes)."""
    key, x, t = split(encoded)
    want = tag(key, int.from_bytes(x, "big")).to_bytes(BLOCK_BYTES, "big")
    return hmac.compare_digest(want, t)
