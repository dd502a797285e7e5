"""The *ideal link*: a stand-in QKD link with NO quantum security.

Both KMEs derive the same keys and key IDs from a link secret that was copied to both
sides out of band; nothing travels between them. Whoever holds that file can compute
every key ever delivered, so this is exactly as strong as a pre-shared key — useful for
tests, demos and for exercising the gateway's ETSI 014 path, never for protecting
traffic against a quantum (or any) adversary who can steal the file. The real source
of key is the simulated BB84 link in `qkd.sim`.

Derivation (all HKDF/HMAC over SHA-256; every input label-separated and
length-prefixed so no two inputs can encode to the same bytes):

    PRK    = HKDF-Extract(salt = "qkdgw ideal-link v1", IKM = link secret)
    k_tag  = HKDF-Expand(PRK, lp("key-id tag"), 32)
    k_mask = HKDF-Expand(PRK, lp("key-id mask"), 32)
    key    = HKDF-Expand(PRK, lp("key") lp(master) lp(slave) u64(i) u32(size_bits), size/8)

A key exists per ordered pair (master SAE, slave SAE), counter i and size. Its key ID
is a version-8 UUID (RFC 9562) whose 122 free bits carry an SIV-style deterministic
encryption of (i, size):

    tag = HMAC(k_tag, lp("key-id") lp(master) lp(slave) u64(i) u32(size_bits))[:66 bits]
    ct  = (i: 40 bits || size/8: 16 bits) XOR HMAC(k_mask, lp(master) lp(slave) tag)[:56 bits]
    key_ID bits = ct || tag

so the slave's KME recovers i and the size from the ID alone, without any lookup or
message from the master's KME, and a forged, altered or mis-addressed ID fails the
66-bit tag. Encrypting (i, size) instead of writing them in clear (improvement over
the plain "counter + tag" layout) keeps the per-pair key count and key sizes out of
the key IDs, which gateways send across the network in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
import uuid
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from qkd.common.errors import QkdError
from qkd.etsi014.messages import HKDF_MAX_BITS

LINK_SECRET_MIN_BYTES = 32
COUNTER_BITS = 40
COUNTER_LIMIT = 1 << COUNTER_BITS  # counters 0 .. 2**40 - 1 per ordered pair
_SIZE_BITS_FIELD = 16  # key size in bytes
_TAG_BITS = 66
_CT_BITS = COUNTER_BITS + _SIZE_BITS_FIELD  # 56 bits: 7 bytes
_SALT = b"qkdgw ideal-link v1"


class InvalidKeyId(QkdError, ValueError):
    """The key ID was not made by this link for this master/slave pair."""


def _lp(data: bytes | str) -> bytes:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return struct.pack(">I", len(raw)) + raw


def load_link_secret(path: Path) -> bytes:
    """Read a hex link secret file (whitespace ignored). ValueError with a readable reason."""
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise ValueError("file is not hex text") from None
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r} ({exc.strerror})") from None
    compact = "".join(text.split())
    try:
        secret = bytes.fromhex(compact)
    except ValueError:
        raise ValueError("file is not hex text") from None
    if len(secret) < LINK_SECRET_MIN_BYTES:
        raise ValueError(f"secret has {len(secret)} bytes, need at least "
                         f"{LINK_SECRET_MIN_BYTES}")
    return secret


class IdealLink:
    """Derives keys and key IDs from the link secret; holds no state, never logs."""

    __slots__ = ("_k_mask", "_k_tag", "_prk")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < LINK_SECRET_MIN_BYTES:
            raise ValueError(f"link secret must be at least {LINK_SECRET_MIN_BYTES} bytes")
        self._prk = hmac.new(_SALT, secret, hashlib.sha256).digest()
        self._k_tag = self._expand(_lp("key-id tag"), 32)
        self._k_mask = self._expand(_lp("key-id mask"), 32)

    def __repr__(self) -> str:
        return "IdealLink(<secret redacted>)"

    def _expand(self, info: bytes, length: int) -> bytes:
        return HKDFExpand(hashes.SHA256(), length, info).derive(self._prk)

    @staticmethod
    def _check(counter: int, size_bits: int) -> None:
        if not 0 <= counter < COUNTER_LIMIT:
            raise ValueError(f"counter {counter} outside 0..2**{COUNTER_BITS}-1")
        if size_bits <= 0 or size_bits % 8 or size_bits > HKDF_MAX_BITS:
            raise ValueError(f"key size {size_bits} bits is not a positive multiple of 8 "
                             f"up to {HKDF_MAX_BITS}")

    def key(self, master: str, slave: str, counter: int, size_bits: int) -> bytes:
        self._check(counter, size_bits)
        info = (_lp("key") + _lp(master) + _lp(slave)
                + struct.pack(">QI", counter, size_bits))
        return self._expand(info, size_bits // 8)

    def _tag(self, master: str, slave: str, counter: int, size_bits: int) -> int:
        msg = _lp("key-id") + _lp(master) + _lp(slave) + struct.pack(">QI", counter, size_bits)
        digest = hmac.new(self._k_tag, msg, hashlib.sha256).digest()
        return int.from_bytes(digest[:9], "big") >> (72 - _TAG_BITS)

    def _pad(self, master: str, slave: str, tag: int) -> int:
        msg = _lp(master) + _lp(slave) + tag.to_bytes(9, "big")
        digest = hmac.new(self._k_mask, msg, hashlib.sha256).digest()
        return int.from_bytes(digest[:7], "big")

    def key_id(self, master: str, slave: str, counter: int, size_bits: int) -> str:
        self._check(counter, size_bits)
        tag = self._tag(master, slave, counter, size_bits)
        plain = (counter << _SIZE_BITS_FIELD) | (size_bits // 8)
        payload = ((plain ^ self._pad(master, slave, tag)) << _TAG_BITS) | tag
        return str(_pack_uuid8(payload))

    def open_key_id(self, key_id: str, master: str, slave: str) -> tuple[int, int]:
        """(counter, size_bits) of a key ID this link made for master -> slave.

        Raises InvalidKeyId for anything else: not a v8 UUID, forged, altered, or made
        for another pair (a different link secret also ends here)."""
        try:
            payload = _unpack_uuid8(uuid.UUID(key_id))
        except ValueError:
            raise InvalidKeyId("not a key ID of this link") from None
        tag = payload & ((1 << _TAG_BITS) - 1)
        plain = (payload >> _TAG_BITS) ^ self._pad(master, slave, tag)
        counter = plain >> _SIZE_BITS_FIELD
        size_bits = (plain & ((1 << _SIZE_BITS_FIELD) - 1)) * 8
        if size_bits == 0 or size_bits > HKDF_MAX_BITS:
            raise InvalidKeyId("not a key ID of this link for this master/slave pair")
        expected = self._tag(master, slave, counter, size_bits)
        if not hmac.compare_digest(expected.to_bytes(9, "big"), tag.to_bytes(9, "big")):
            raise InvalidKeyId("not a key ID of this link for this master/slave pair")
        return counter, size_bits


def _pack_uuid8(payload: int) -> uuid.UUID:
    # RFC 9562 layout: 48 bits | version (4) | 12 bits | variant 0b10 (2) | 62 bits.
    high = payload >> 74
    mid = (payload >> 62) & 0xFFF
    low = payload & ((1 << 62) - 1)
    return uuid.UUID(int=(high << 80) | (0x8 << 76) | (mid << 64) | (0b10 << 62) | low)


def _unpack_uuid8(u: uuid.UUID) -> int:
    value = u.int
    if (value >> 76) & 0xF != 0x8 or (value >> 62) & 0b11 != 0b10:
        raise ValueError("not an RFC 9562 version-8 UUID")
    high = value >> 80
    mid = (value >> 64) & 0xFFF
    low = value & ((1 << 62) - 1)
    return (high << 74) | (mid << 62) | low


class TokenBucket:
    """Simulated key production: `rate` keys/s accrue up to `capacity`, starting empty.

    Sans-I/O: the caller passes the monotonic time. rate 0 never produces a key (for
    fail-closed tests); math.inf (or any huge rate) keeps the bucket full."""

    def __init__(self, rate: float, capacity: int, now: float) -> None:
        if rate < 0 or capacity < 0:
            raise ValueError("rate and capacity must not be negative")
        self.rate = rate
        self.capacity = capacity
        self._tokens = 0.0
        self._last = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._last)
        self._last = max(self._last, now)
        if self.rate == 0:
            return
        if math.isinf(self.rate):
            self._tokens = float(self.capacity)
            return
        self._tokens = min(float(self.capacity), self._tokens + elapsed * self.rate)

    def level(self, now: float) -> int:
        self._refill(now)
        return min(self.capacity, int(self._tokens))

    def take(self, n: int, now: float) -> bool:
        """Remove n whole keys if available; all or nothing."""
        self._refill(now)
        if n <= int(self._tokens):
            self._tokens -= n
            return True
        return False
