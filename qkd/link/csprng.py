"""Secret randomness for the link at numpy speed.

Everything a KME's key, seed, nonce or pad depends on (Alice's bits, bases and
intensity classes, Bob's bases and the bits of his double and dark clicks, the
verification and privacy-amplification seeds, Cascade's shuffles, round nonces) comes
from `SecretRng`: an AES-256-CTR keystream over zero bytes under a key and counter
block from `os.urandom`, turned into numpy arrays with `np.frombuffer`. AES-CTR is the
CTR_DRBG construction of NIST SP 800-90A without its reseeding (a round draws a few
hundred MB at most, far below the 2^48 requests SP 800-90A allows per seed; each round
takes a new key from the OS). OpenSSL runs it at several GB/s, so it costs about what
numpy's PCG64 does.

numpy generators (PCG64, seedable) stay for the *physics*: photon numbers, loss, dark
clicks, misalignment. Nothing secret is derived from them, and `qkdgw qkd simulate
--seed` keeps using them for reproducible research runs.

`SecretRng` implements the part of `numpy.random.Generator` the link and the
post-processing call (`bytes`, `random`, `integers`), so it can be handed to them in
place of a generator.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_U64_MAX = 1 << 64
# Keystream is made in chunks over one shared zero buffer, straight into the output
# array (allocating a zero input and a bytes output per call costs 5x the AES).
_CHUNK = 1 << 22
_ZEROS = bytes(_CHUNK)


class SecretRng:
    """A CSPRNG with numpy-shaped draws. repr shows nothing of its state."""

    __slots__ = ("_enc",)

    def __init__(self) -> None:
        self._enc = Cipher(algorithms.AES(os.urandom(32)),
                           modes.CTR(os.urandom(16))).encryptor()

    def __repr__(self) -> str:
        return "SecretRng(<os-seeded>)"

    def _stream(self, length: int) -> np.ndarray:
        out = np.empty(length + 16, np.uint8)
        view = memoryview(out)
        zeros = memoryview(_ZEROS)
        pos = 0
        while pos < length:
            k = min(_CHUNK, length - pos)
            self._enc.update_into(zeros[:k], view[pos:])
            pos += k
        return out[:length]

    def bytes(self, length: int) -> bytes:
        return self._stream(length).tobytes()

    def _u64(self, n: int) -> np.ndarray:
        return self._stream(8 * n).view("<u8")

    def random(self, size: int | tuple[int, ...] | None = None) -> Any:
        """Uniform floats in [0, 1) with 53 random bits each, like Generator.random."""
        n = 1 if size is None else math.prod(np.atleast_1d(size))
        out = (self._u64(n) >> np.uint64(11)) * (1.0 / (1 << 53))
        return float(out[0]) if size is None else out.reshape(size)

    def integers(self, low: int, high: int | None = None,
                 size: int | tuple[int, ...] | None = None,
                 dtype: Any = np.int64) -> Any:
        """Uniform integers in [low, high), like Generator.integers (endpoint=False)."""
        if high is None:
            low, high = 0, low
        span = int(high) - int(low)
        if not 0 < span <= _U64_MAX:
            raise ValueError("integers: need low < high and a range of at most 2^64")
        n = 1 if size is None else math.prod(np.atleast_1d(size))
        if span == _U64_MAX and not low:
            vals = self._u64(n)  # the keystream words as they are: no mask, no copy
        elif span == 2:
            bits = np.unpackbits(self._stream(-(-n // 8)))[:n]
            vals = bits.astype(np.int64) + low if low else bits
        elif span & (span - 1) == 0:
            vals = self._u64(n) & np.uint64(span - 1)
            vals = vals.astype(object) + low if low else vals
        else:
            # Rejection keeps the draw exactly uniform: only words below the largest
            # multiple of span count.
            limit = (_U64_MAX // span) * span
            got: list[np.ndarray] = []
            need = n
            while need:
                w = self._u64(need + need // 8 + 8)
                w = w[w < np.uint64(limit)]
                got.append(w[:need])
                need -= got[-1].size
            vals = np.concatenate(got) % np.uint64(span)
            vals = vals.astype(object) + low if low else vals
        if size is None:
            return int(vals[0])
        return np.asarray(vals).astype(dtype, copy=False).reshape(size)


__all__ = ["SecretRng"]
