"""Polynomial one-time MAC over GF(2^127 - 1), the one implementation (issue 10).

    hash  h_r(c_1..c_n, L) = (...((c_1 r + c_2) r + ...) + c_n) r + L) r   mod p
    tag   (h + s) mod p, as 16 little-endian bytes, s a one-time pad

Two users feed it different coefficients: the handshake's one-time MAC
(gateway.tunnel.otmac) takes the message in 15-byte chunks with 0x01 appended, as
Poly1305 does; the link's Wegman-Carter MAC (qkd.link.wegman_carter) takes the NH
outputs of each 1 KiB block. The length L as the last coefficient makes both
encodings injective. Security arguments are in those modules' docstrings.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Iterable, Iterator

P127 = (1 << 127) - 1
TAG_BYTES = 16
ONE_TIME_KEY_BYTES = 32
CHUNK_BYTES = 15


def poly_hash(coefficients: Iterable[int], length: int, r: int) -> int:
    """Horner evaluation of the coefficients then `length`, times r, mod p."""
    h = 0
    for c in coefficients:
        h = (h + c) * r % P127
    return (h + length) * r % P127


def pad_tag(h: int, pad: bytes) -> bytes:
    """(h + s) mod p as the 16-byte tag, s the pad read little-endian mod p."""
    s = int.from_bytes(pad, "little") % P127
    return ((h + s) % P127).to_bytes(TAG_BYTES, "little")


def chunk_coefficients(message: bytes) -> Iterator[int]:
    """15-byte chunks with 0x01 appended (so trailing zero bytes change the value)."""
    for i in range(0, len(message), CHUNK_BYTES):
        yield int.from_bytes(message[i:i + CHUNK_BYTES] + b"\x01", "little")


def forgery_bound(length: int) -> float:
    """Bound on one forgery attempt against a chunked one-time tag over `length` bytes."""
    n = math.ceil(length / CHUNK_BYTES)
    return (n + 1) / P127 + 2.0 ** -126


def one_time_tag(key: bytes, message: bytes) -> bytes:
    """Chunked one-time tag; the key's first 16 bytes give r, the last 16 the pad."""
    if len(key) != ONE_TIME_KEY_BYTES:
        raise ValueError(f"a one-time MAC key is {ONE_TIME_KEY_BYTES} bytes")
    r = int.from_bytes(key[:16], "little") % P127
    return pad_tag(poly_hash(chunk_coefficients(message), len(message), r), key[16:])


def check(expected: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(expected, tag)
