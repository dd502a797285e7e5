"""Fast paths of the link against their plain reference forms, bit for bit."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qkd.link.csprng import SecretRng
from qkd.link.wegman_carter import HASH_KEY_BYTES, NH_WORDS, HashKey

_BLOCK = NH_WORDS * 4
# Sizes around the word, block and slab boundaries of the chunked NH.
_EDGES = [0, 1, 3, 4, 5, _BLOCK - 1, _BLOCK, _BLOCK + 1, 256 * _BLOCK - 4,
          256 * _BLOCK, 256 * _BLOCK + 3, 513 * _BLOCK + 17]


def test_nh_hash_matches_the_reference_at_edge_sizes() -> None:
    key = HashKey(os.urandom(HASH_KEY_BYTES))
    for n in _EDGES:
        msg = os.urandom(n)
        assert key.hash(msg) == key.hash_reference(msg), n
    # All-ones words: every (m + k) mod 2^32 wraps and every NH sum wraps mod 2^64.
    ones = b"\xff" * (3 * _BLOCK)
    assert key.hash(ones) == key.hash_reference(ones)


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=HASH_KEY_BYTES, max_size=HASH_KEY_BYTES),
       msg=st.binary(max_size=5 * _BLOCK))
def test_nh_hash_matches_the_reference(key: bytes, msg: bytes) -> None:
    k = HashKey(key)
    assert k.hash(msg) == k.hash_reference(msg)


def test_secret_rng_full_range_words_are_the_keystream() -> None:
    rng = SecretRng()
    w = rng.integers(0, 1 << 64, 100_000, dtype=np.uint64)
    assert w.dtype == np.uint64 and w.size == 100_000
    # Each of the 64 bit positions is set about half the time.
    bits = np.unpackbits(w.view(np.uint8)).reshape(-1, 64).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 0.01)
    assert rng.integers(0, 1 << 64, (2, 3), dtype=np.uint64).shape == (2, 3)
