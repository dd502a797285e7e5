"""One-time MAC for the handshake's information-theoretic mode (Wegman–Carter).

    h_r(m) = Horner evaluation over GF(p), p = 2^127 - 1, of m cut into 15-byte
             chunks (each read as an integer after appending 0x01, as Poly1305 does,
             so trailing zero bytes change the value), followed by len(m) in bytes
    tag    = (h_r(m) + s) mod p, as 16 bytes

h_r(m) is a polynomial in r of degree n + 1 with no constant term, where n =
ceil(len(m) / 15); two different messages give different polynomials (the 0x01 byte and
the length term make the encoding injective). A forger who saw one tag and sends
another message with a tag of its choice wins iff r is a root of a non-zero polynomial
of degree at most n + 1: probability (n + 1)/p for uniform r and s in GF(p). r and s are
128-bit strings reduced mod p, which puts each at statistical distance at most 2^-127
from uniform; hence, whatever the forger's computing power,

    P(forgery per attempt) <= (n + 1)/p + 2^-126        (`forgery_bound`)

The arithmetic lives in qkd.common.polymac, shared with the link's Wegman-Carter MAC.

The handshake refuses to tag or check a transcript longer than `MAX_MESSAGE_BYTES`
(64 KiB: n = 4370), so the bound it relies on is at most `MAX_FORGERY_BOUND` < 2^-114.9.
Real transcripts (measured, docs/protocol.md) are 20.7 KB for a PKI bootstrap with
ML-DSA-65 and ML-KEM-768 (bound 2^-116.5), 28.1 KB with ML-DSA-87 and ML-KEM-1024
(2^-116.1), and under 4 KB for a PSK or chained handshake (2^-119).

One 256-bit QKD key makes one tag: its first 16 bytes give r, its last 16 give s. A key
must never make a second tag: the handshake takes two fresh QKD keys, one per direction.
"""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.tunnel.constants import (
    OTMAC_KEY_BYTES as KEY_BYTES,
)
from gateway.tunnel.constants import (
    OTMAC_MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES,
)
from gateway.tunnel.constants import (
    OTMAC_TAG_BYTES as TAG_BYTES,
)
from qkd.common import polymac
from qkd.common.polymac import P127, forgery_bound

__all__ = ["KEY_BYTES", "MAX_FORGERY_BOUND", "MAX_MESSAGE_BYTES", "P127", "TAG_BYTES",
           "OneTimeMacError", "check_one_time_tag", "forgery_bound", "one_time_tag"]

# The arithmetic is qkd.common.polymac's (shared with the link's Wegman-Carter MAC);
# this module adds the handshake's limits and error type.
assert KEY_BYTES == polymac.ONE_TIME_KEY_BYTES and TAG_BYTES == polymac.TAG_BYTES


class OneTimeMacError(GatewayError, ValueError):
    """A key of the wrong size, or a message longer than the bound covers."""


MAX_FORGERY_BOUND = forgery_bound(MAX_MESSAGE_BYTES)


def one_time_tag(key: bytes, message: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise OneTimeMacError(f"a one-time MAC key is {KEY_BYTES} bytes")
    if len(message) > MAX_MESSAGE_BYTES:
        raise OneTimeMacError(f"message of {len(message)} bytes is longer than the "
                              f"{MAX_MESSAGE_BYTES} bytes the forgery bound covers")
    return polymac.one_time_tag(key, message)


def check_one_time_tag(key: bytes, message: bytes, tag: bytes) -> bool:
    return polymac.check(one_time_tag(key, message), tag)
