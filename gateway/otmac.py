"""One-time MAC for the handshake's information-theoretic mode (Wegman–Carter).

    h_r(m) = Horner evaluation over GF(p), p = 2^127 - 1, of m cut into 15-byte
             chunks (each read as an integer after appending 0x01, as Poly1305 does,
             so trailing zero bytes change the value), followed by len(m) in bytes
    tag    = (h_r(m) + s) mod p, as 16 bytes

For two different messages of at most n chunks the hash differences collide with
probability at most (n + 1)/p: the hash is (n + 1)/p-almost-Δ-universal, and adding a
uniformly random pad s used for one tag only makes the tag reveal nothing about r
(Wegman and Carter 1981). For a handshake transcript of about 3 KB (n ≈ 200) a forger,
whatever its computing power, succeeds with probability below 2^-119 per attempt.

One 256-bit QKD key makes one tag: its first 16 bytes give r, its last 16 give s (both
reduced mod p; the bias from reducing 128 bits is below 2^-126). A key must never make
a second tag: the handshake takes two fresh QKD keys, one per direction.
"""

from __future__ import annotations

import hmac

P127 = (1 << 127) - 1
KEY_BYTES = 32
TAG_BYTES = 16
_CHUNK = 15


def _poly_hash(r: int, message: bytes) -> int:
    h = 0
    for i in range(0, len(message), _CHUNK):
        c = int.from_bytes(message[i:i + _CHUNK] + b"\x01", "little")
        h = (h + c) * r % P127
    return (h + len(message)) * r % P127


def one_time_tag(key: bytes, message: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise ValueError(f"a one-time MAC key is {KEY_BYTES} bytes")
    r = int.from_bytes(key[:16], "little") % P127
    s = int.from_bytes(key[16:], "little") % P127
    return ((_poly_hash(r, message) + s) % P127).to_bytes(TAG_BYTES, "little")


def check_one_time_tag(key: bytes, message: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(one_time_tag(key, message), tag)
