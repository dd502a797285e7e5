"""Wegman–Carter authentication of the KME-to-KME classical channel, sans-I/O.

Tag of a message m (Wegman and Carter 1981; the hash is the two-level design of UMAC,
Black et al. 1999, with a polynomial second level as in Poly1305):

    level 1  NH over 1 KiB blocks, 4 Toeplitz-shifted iterations (UMAC NH):
             NH_K(M) = sum_j ((m_2j + k_2j) mod 2^32) * ((m_2j+1 + k_2j+1) mod 2^32) mod 2^64
             each iteration is 2^-32-almost-universal for equal-length blocks; the four
             Toeplitz-shifted ones together 2^-128 (UMAC, Theorem on NH-Toeplitz).
    level 2  polynomial evaluation over GF(p), p = 2^127 - 1, of the 4 NH outputs of
             every block followed by the message length: (L+1)/p-almost-Δ-universal.
    tag      (h(m) + s) mod p, s a fresh 127-bit one-time pad.
             (level 2 and the tag are qkd.common.polymac, shared with the handshake's
             one-time MAC.)

The composition is (2^-128 + (L+1)/p)-almost-Δ-universal, so with a fresh pad per tag
an adversary who sees any number of (message, tag) pairs forges a new one with at most
that probability per attempt (about 2^-105 for a 20 MB transcript), whatever its
computing power. The hash key (1088 bytes) may be reused across tags; only pads are
one-time. Both come from `AuthKeys`, which accounts for every byte.

Key sources: after the first round, key produced by the link itself (information-
theoretic). Before it (bootstrap), the hash key and pads are HKDF-expanded from the
pre-shared bootstrap key: that phase is only computationally secure and is reported
as `auth_mode = "bootstrap"`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from qkd.common import polymac
from qkd.common.errors import QkdError
from qkd.common.polymac import P127, pad_tag, poly_hash

NH_WORDS = 256  # 1 KiB blocks
NH_ITER = 4
NH_KEY_WORDS = NH_WORDS + 4 * (NH_ITER - 1)
HASH_KEY_BYTES = NH_KEY_WORDS * 4 + 16
PAD_BYTES = 16
# NH blocks hashed per slab: the temporaries stay in cache (a 20 MB transcript as one
# uint64 array costs more in fresh pages than in arithmetic).
_NH_ROWS = 256
TAG_BYTES = polymac.TAG_BYTES


class AuthError(QkdError):
    """A tag did not verify, or no authentication key is left. Never holds key bytes."""


class HashKey:
    """The reusable universal-hash key. repr hides it."""

    __slots__ = ("_nh", "_nh32", "_poly", "material")

    def __init__(self, material: bytes) -> None:
        if len(material) != HASH_KEY_BYTES:
            raise ValueError(f"hash key must be {HASH_KEY_BYTES} bytes")
        self.material = bytes(material)
        words = np.frombuffer(material[: NH_KEY_WORDS * 4], "<u4").astype(np.uint64)
        self._nh = [words[4 * t : 4 * t + NH_WORDS] for t in range(NH_ITER)]
        self._nh32 = [k.astype(np.uint32) for k in self._nh]
        self._poly = int.from_bytes(material[NH_KEY_WORDS * 4 :], "little") % P127

    def __repr__(self) -> str:
        return "HashKey(<redacted>)"

    def hash(self, message: bytes) -> int:
        """The almost-Δ-universal hash of `message` as an integer mod p."""
        n = len(message)
        block = NH_WORDS * 4
        pad = -n % block
        words = np.frombuffer(message, "<u4", n // 4)
        if pad or n % 4:
            buf = np.zeros((n + pad) // 4, "<u4")
            buf.view(np.uint8)[:n] = np.frombuffer(message, np.uint8)
            words = buf
        words = words.reshape(-1, NH_WORDS)
        nh = np.empty((words.shape[0], NH_ITER), np.uint64)
        a = np.empty((min(_NH_ROWS, words.shape[0]), NH_WORDS), np.uint32)
        prod = np.empty((a.shape[0], NH_WORDS // 2), np.uint64)
        hi = np.empty_like(prod)
        for r0 in range(0, words.shape[0], _NH_ROWS):
            w = words[r0 : r0 + _NH_ROWS]
            rows = w.shape[0]
            for t, key in enumerate(self._nh32):
                # uint32 addition wraps mod 2^32, which is NH's (m + k) mod 2^32; the
                # products of two 32-bit values fit uint64 and the sum wraps mod 2^64.
                np.add(w, key, out=a[:rows])
                p = prod[:rows]
                p[...] = a[:rows, 0::2]
                hi[:rows] = a[:rows, 1::2]
                p *= hi[:rows]
                p.sum(axis=1, dtype=np.uint64, out=nh[r0 : r0 + rows, t])
        # The length as the last coefficient separates messages that differ only in
        # the zero padding.
        return poly_hash(nh.ravel().tolist(), n, self._poly)

    def hash_reference(self, message: bytes) -> int:
        """`hash` written out plainly on uint64 arrays (the tests hold `hash` to it)."""
        n = len(message)
        block = NH_WORDS * 4
        padded = message + bytes(-n % block) if n % block or n == 0 else message
        words = np.frombuffer(padded, "<u4").astype(np.uint64).reshape(-1, NH_WORDS)
        mask = np.uint64(0xFFFFFFFF)
        outs = []
        for key in self._nh:
            a = (words + key) & mask
            # uint64 products of two 32-bit values never overflow; the sum wraps
            # mod 2^64, which is NH's definition.
            outs.append((a[:, 0::2] * a[:, 1::2]).sum(axis=1, dtype=np.uint64))
        elements = np.stack(outs, axis=1).ravel().tolist()
        # Horner written out again so the reference does not share poly_hash with `hash`.
        h = 0
        k = self._poly
        for e in elements:
            h = (h + e) * k % P127
        return (h + n) * k % P127


def make_tag(key: HashKey, pad: bytes, message: bytes) -> bytes:
    if len(pad) != PAD_BYTES:
        raise ValueError("one-time pad must be 16 bytes")
    return pad_tag(key.hash(message), pad)


def check_tag(key: HashKey, pad: bytes, message: bytes, tag: bytes) -> bool:
    return polymac.check(make_tag(key, pad, message), tag)


def bootstrap_material(bootstrap_key: bytes, label: bytes, length: int) -> bytes:
    """Bootstrap-phase key stream (computational security only, see module note)."""
    out = b""
    counter = 0
    while len(out) < length:
        info = b"qkdgw link bootstrap v1\x00" + label + struct.pack(">Q", counter)
        out += HKDFExpand(hashes.SHA256(), 255 * 32, info).derive(bootstrap_key)
        counter += 1
    return out[:length]


@dataclass
class AuthStatus:
    mode: str  # "bootstrap" or "qkd"
    pad_bytes_available_out: int
    pad_bytes_available_in: int
    pad_bytes_used: int
    reserve_bytes: int
    failures: int


class AuthKeys:
    """Pads for both directions, the hash key, and the accounting, for one KME.

    Each direction has its own pad stream with absolute byte offsets. A sender takes
    the next unused 16 bytes of its outgoing stream and names the offset in the frame;
    the receiver accepts only offsets at or past its watermark for that direction, so
    no pad is ever used twice by either side, even if frames are lost. Refills append
    the same bytes on both sides (fed with identical link output in the same order);
    `reserve` bytes of each stream are kept back for control traffic only, so an
    attacker who makes every round abort cannot drain the key the link needs to
    restart (`take_pad(for_round=True)` refuses once only the reserve is left)."""

    def __init__(self, role: str, hash_key: HashKey, reserve: int = 64 * PAD_BYTES,
                 mode: str = "qkd") -> None:
        if role not in ("alice", "bob"):
            raise ValueError("role must be 'alice' or 'bob'")
        self.role = role
        self.mode = mode
        self._hash_key = hash_key
        self._streams = {"a2b": bytearray(), "b2a": bytearray()}
        self._base = {"a2b": 0, "b2a": 0}  # absolute offset of stream[0]
        self._next_out = 0
        self._watermark_in = 0
        self.reserve = reserve
        self.used = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"AuthKeys(role={self.role!r}, mode={self.mode!r}, <keys redacted>)"

    @property
    def _out(self) -> str:
        return "a2b" if self.role == "alice" else "b2a"

    @property
    def _in(self) -> str:
        return "b2a" if self.role == "alice" else "a2b"

    def _avail(self, name: str, start: int) -> int:
        return self._base[name] + len(self._streams[name]) - start

    def refill(self, material: bytes) -> None:
        """Append link output: first half to a2b, second half to b2a (same on both sides)."""
        half = (len(material) // (2 * PAD_BYTES)) * PAD_BYTES
        self._streams["a2b"] += material[:half]
        self._streams["b2a"] += material[half : 2 * half]

    def rekey(self, hash_key: HashKey, mode: str) -> None:
        self._hash_key = hash_key
        self.mode = mode

    def take_pad(self, *, for_round: bool) -> tuple[int, bytes]:
        name = self._out
        need = PAD_BYTES + (self.reserve if for_round else 0)
        if self._avail(name, self._next_out) < need:
            raise AuthError("authentication key exhausted"
                            + (" down to the reserve" if for_round else ""))
        off = self._next_out
        i = off - self._base[name]
        pad = bytes(self._streams[name][i : i + PAD_BYTES])
        self._next_out += PAD_BYTES
        self.used += PAD_BYTES
        self._drop(name, self._next_out)
        return off, pad

    def sign(self, message: bytes, *, for_round: bool) -> tuple[int, bytes]:
        off, pad = self.take_pad(for_round=for_round)
        return off, make_tag(self._hash_key, pad, message)

    def check(self, offset: int, message: bytes, tag: bytes) -> bool:
        """Would `verify` accept this? Changes nothing (no watermark, no counters)."""
        name = self._in
        if (offset < self._watermark_in or offset % PAD_BYTES
                or self._avail(name, offset) < PAD_BYTES):
            return False
        i = offset - self._base[name]
        return check_tag(self._hash_key, bytes(self._streams[name][i : i + PAD_BYTES]),
                         message, tag)

    def verify(self, offset: int, message: bytes, tag: bytes) -> None:
        name = self._in
        if offset < self._watermark_in or offset % PAD_BYTES:
            self.failures += 1
            raise AuthError("authentication pad offset reused or misaligned")
        if self._avail(name, offset) < PAD_BYTES:
            self.failures += 1
            raise AuthError("authentication pad offset beyond the key this side holds")
        i = offset - self._base[name]
        pad = bytes(self._streams[name][i : i + PAD_BYTES])
        if not check_tag(self._hash_key, pad, message, tag):
            self.failures += 1
            raise AuthError("message authentication failed")
        self._watermark_in = offset + PAD_BYTES
        self.used += PAD_BYTES
        self._drop(name, self._watermark_in)

    def _drop(self, name: str, upto: int) -> None:
        # Used pads are erased from memory, not just skipped.
        cut = upto - self._base[name]
        if cut > 0:
            del self._streams[name][:cut]
            self._base[name] = upto

    def status(self) -> AuthStatus:
        return AuthStatus(self.mode, self._avail(self._out, self._next_out),
                          self._avail(self._in, self._watermark_in), self.used,
                          self.reserve, self.failures)

    # ------------------------------------------------------------ persistence
    # The KME seals this state at rest (qkd.link.bb84) and writes it before any tag it
    # signed leaves the process, so a restart never hands out a pad twice.

    def export_state(self) -> dict[str, object]:
        return {
            "role": self.role, "mode": self.mode, "reserve": self.reserve,
            "hash_key": self._hash_key.material.hex(),
            "a2b": self._streams["a2b"].hex(), "b2a": self._streams["b2a"].hex(),
            "base_a2b": self._base["a2b"], "base_b2a": self._base["b2a"],
            "next_out": self._next_out, "watermark_in": self._watermark_in,
            "used": self.used, "failures": self.failures,
        }

    @classmethod
    def import_state(cls, state: dict[str, object]) -> AuthKeys:
        keys = cls(str(state["role"]), HashKey(bytes.fromhex(str(state["hash_key"]))),
                   int(state["reserve"]), str(state["mode"]))  # type: ignore[call-overload]
        for name in ("a2b", "b2a"):
            keys._streams[name] = bytearray(bytes.fromhex(str(state[name])))
            keys._base[name] = int(state[f"base_{name}"])  # type: ignore[call-overload]
        keys._next_out = int(state["next_out"])  # type: ignore[call-overload]
        keys._watermark_in = int(state["watermark_in"])  # type: ignore[call-overload]
        keys.used = int(state["used"])  # type: ignore[call-overload]
        keys.failures = int(state["failures"])  # type: ignore[call-overload]
        return keys

    @property
    def next_out(self) -> int:
        return self._next_out

    @property
    def watermark_in(self) -> int:
        return self._watermark_in

    def advance_out(self, offset: int) -> None:
        """Skip outgoing pads up to `offset` (the peer reports it has seen them)."""
        if offset > self._next_out and offset % PAD_BYTES == 0:
            self._next_out = min(offset, self._base[self._out] + len(self._streams[self._out]))
            self._drop(self._out, self._next_out)

    def levels(self) -> tuple[int, int]:
        """(outgoing, incoming) pad bytes left; Alice uses them to size a refill."""
        return (self._avail(self._out, self._next_out),
                self._avail(self._in, self._watermark_in))

    def replace_pads(self, material: bytes, hash_key: HashKey, mode: str) -> None:
        """Drop every unused pad and start over from `material` (both sides at once):
        used when link output replaces the bootstrap keys, so no computationally
        derived pad is used once the link authenticates itself."""
        for name in ("a2b", "b2a"):
            self._base[name] += len(self._streams[name])
            self._streams[name] = bytearray()
        self._next_out = self._base[self._out]
        self._watermark_in = self._base[self._in]
        self.rekey(hash_key, mode)
        self.refill(material)
