"""The emulated quantum channel between two KMEs, split at the fibre so that an
eavesdropper process can sit on it. Sans-I/O: functions from settings and bytes to
bytes and records; the caller moves the frames over a real connection.

Same physics as `qkd.sim.channel` (weak coherent pulses, Poisson photon numbers,
per-photon loss, misalignment e_d, two detectors with dark clicks, double clicks to a
random bit; afterpulsing and dead time are not emulated here), but split in three:

    Alice  `emit()`     chooses intensity, basis and bit for every slot, draws the
                        photon number, and puts the pulses that carry photons into a
                        *pulse frame* (vacuum slots' settings are drawn lazily, for
                        the slots Bob announces; see `SparseSlotRecord`). What the
                        frame shows is what a pulse physically carries: photon
                        number and polarisation, never the intensity class (that
                        is what makes decoy states work).
    Eve    `attack()`   may rewrite the frame: intercept-resend, photon-number
                        splitting, depolarising noise, on a fraction of the pulses.
    Bob    `measure()`  applies the fibre and detector loss to each photon, his random
                        basis, misalignment and dark clicks, and keeps his click record.

Fibre loss is applied at Bob's end, to every pulse except those flagged `bypass`: a
PNS attacker replaces the fibre by a lossless line, which in this emulation means
setting that flag on the pulses she forwards. Vacuum slots are not sent; Bob's dark
clicks cover every slot of the round.

The per-pulse loops (emission, measurement, frame v2 coding, Alice's slot lookup and
the vacuum-slot insertion) run compiled when `_qkdgw_bb84` (qkd/native/bb84.c) is
built, from the same random words as their numpy forms, which stay as the references
the tests compare them with bit for bit (QKDGW_NATIVE=0 runs them).

Frame (little-endian): b"QKDQ" | version u8 | round u32 | pulses u64 | count u64 |
then in version 2 (what `emit` sends): state u8[count] | slot deltas as unsigned
LEB128 varints [count] (one byte each below 128: a slot delta is ~3 with the example
source, so the frame is ~2 bytes a pulse); in version 1: slot deltas u32[count] |
state u8[count]. state = photons (5 bits, capped at 31) | basis << 5 | bit << 6 |
bypass << 7. `decode` reads both versions and a decoded frame encodes in the version
it came in, so Eve forwards what she received in its own form.

On the wire between two KMEs that frame is *sealed* (`seal` / `unseal`; `seal_frame`
encodes and seals in one go, the same bytes): the pulses'
states are what a real fibre would never show to an observer, and in this emulation they
travel over TCP, so they are encrypted and authenticated with AES-256-GCM:

    b"QKDS" | version u8 | round u32 | round nonce 16 | counter u64 | ciphertext+tag
    key   = HKDF-SHA256(link secret, salt = round nonce,
                        info = "qkdgw quantum channel v1" | direction | round u64)
    nonce = direction (4 bytes) | counter u64;  AAD = the header

The round nonce is Alice's fresh ROUND_START nonce (Bob checks the two agree), so every
round and direction has its own key. Whoever holds the link secret can read and rewrite
pulses (that is how `qkdgw eve` plays the eavesdropper on purpose); nobody else learns
anything from the connection or gets a frame accepted. The emulated link's keys are
therefore only as secret as the link secret and AES, like the ideal link's; a real QKD
device replaces all of this by the fibre, where the physics does the protecting.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qkd import native
from qkd.common.errors import QkdError
from qkd.link.csprng import SecretRng
from qkd.sim import messages
from qkd.sim.channel import AliceRecord, BobRecord
from qkd.sim.params import LinkParams

MAGIC = b"QKDQ"
VERSION = 2  # what encode() writes unless a frame was decoded from version 1
VERSION_U32 = 1
_HDR = struct.Struct("<4sBIQQ")
ATTACKS = ("intercept-resend", "pns", "noise")
MAX_PULSES = 1 << 31
# What the secret draws come from: a KME's SecretRng, or a numpy generator (research).
Random = np.random.Generator | SecretRng


class FrameError(QkdError, ValueError):
    """A pulse frame is malformed (Bob then treats the round as lost)."""


class SealError(FrameError):
    """A sealed pulse frame did not authenticate (forged, altered, replayed from another
    round or sealed under another link secret)."""


SEALED_MAGIC = b"QKDS"
SEAL_VERSION = 1
_SEAL_HDR = struct.Struct("<4sBI16sQ")
SEAL_OVERHEAD = _SEAL_HDR.size + 16
A2B = b"a2b\x00"
# Test hook, never set in service: True sends pulse frames in clear, as the old code
# did (the positive control of tests/qkd/link/test_tap.py: a tap then rebuilds
# every key). Both ends of a link read it, so it only works inside one process.
_TEST_PLAINTEXT = False


def channel_key(link_secret: bytes, nonce: bytes, round_no: int,
                direction: bytes = A2B) -> bytes:
    """The AES-256-GCM key of one round and direction of the quantum channel."""
    if len(link_secret) < 16 or len(nonce) != 16:
        raise ValueError("quantum channel key needs the link secret and a 16-byte nonce")
    info = b"qkdgw quantum channel v1\x00" + direction + struct.pack("<Q", round_no)
    return HKDF(hashes.SHA256(), 32, nonce, info).derive(link_secret)


def seal(link_secret: bytes, nonce: bytes, round_no: int, frame: bytes,
         counter: int = 0, direction: bytes = A2B) -> bytes:
    """Encrypt and authenticate an encoded pulse frame for the wire."""
    if _TEST_PLAINTEXT:
        return frame
    hdr = _SEAL_HDR.pack(SEALED_MAGIC, SEAL_VERSION, round_no & 0xFFFFFFFF, nonce, counter)
    aead = AESGCM(channel_key(link_secret, nonce, round_no & 0xFFFFFFFF, direction))
    return hdr + aead.encrypt(direction + struct.pack("<Q", counter), frame, hdr)


def seal_frame(link_secret: bytes, nonce: bytes, round_no: int, frame: PulseFrame,
               counter: int = 0, direction: bytes = A2B) -> bytes:
    """`seal(..., frame.encode(), ...)`, the same bytes, with fewer copies of a
    frame of tens of MB: the kernel writes the plaintext into a numpy buffer and
    AES-GCM encrypts it behind the header in another, so only the final bytes are
    fresh 4 KiB pages (numpy's buffers get huge pages and are reused)."""
    kernel = native.load("bb84")
    count = frame.slots.size
    if (_TEST_PLAINTEXT or kernel is None or frame.version != VERSION
            or np.size(frame.state) != count):
        return seal(link_secret, nonce, round_no, frame.encode(), counter, direction)
    size = _HDR.size + 2 * count
    plain = np.empty(size, np.uint8)
    got = kernel.varints_encode(
        np.ascontiguousarray(frame.slots, np.int64), True,
        _HDR.pack(MAGIC, VERSION, frame.round, frame.pulses, count),
        np.ascontiguousarray(frame.state, np.uint8), plain)
    if got != size:  # a delta of two bytes or more: the general encoder
        return seal(link_secret, nonce, round_no, frame.encode(), counter, direction)
    hdr = _SEAL_HDR.pack(SEALED_MAGIC, SEAL_VERSION, round_no & 0xFFFFFFFF, nonce, counter)
    out = np.empty(len(hdr) + size + 16, np.uint8)
    out[: len(hdr)] = np.frombuffer(hdr, np.uint8)
    aead = AESGCM(channel_key(link_secret, nonce, round_no & 0xFFFFFFFF, direction))
    aead.encrypt_into(direction + struct.pack("<Q", counter), plain, hdr,
                      memoryview(out)[len(hdr) :])
    return out.tobytes()


def sealed_header(data: bytes) -> tuple[int, bytes, int]:
    """(round, nonce, counter) of a sealed frame; FrameError if it is not one."""
    if len(data) < SEAL_OVERHEAD:
        raise FrameError("sealed pulse frame truncated")
    magic, version, rnd, nonce, counter = _SEAL_HDR.unpack_from(data)
    if magic != SEALED_MAGIC or version != SEAL_VERSION:
        raise FrameError("not a sealed pulse frame of this version")
    return rnd, nonce, counter


def unseal(link_secret: bytes, data: bytes, round_no: int | None = None,
           nonce: bytes | None = None, direction: bytes = A2B) -> bytes:
    """The encoded pulse frame inside `data`. With `round_no`/`nonce`, the frame must
    belong to that round (Bob passes the ROUND_START values). SealError if it does not
    authenticate; nothing of the plaintext is used before it does."""
    if _TEST_PLAINTEXT:
        return data
    rnd, got_nonce, counter = sealed_header(data)
    if (round_no is not None and rnd != round_no & 0xFFFFFFFF) or (
            nonce is not None and got_nonce != nonce):
        raise SealError("sealed pulse frame belongs to another round")
    hdr = data[:_SEAL_HDR.size]
    aead = AESGCM(channel_key(link_secret, got_nonce, rnd, direction))
    try:
        # A view, not a slice: slicing bytes would copy the whole frame first.
        return aead.decrypt(direction + struct.pack("<Q", counter),
                            memoryview(data)[_SEAL_HDR.size:], hdr)
    except InvalidTag:
        raise SealError("sealed pulse frame failed authentication") from None


class SlotRecord(AliceRecord):
    """Alice's record with one entry per slot, so a lookup is the slot itself."""

    def lookup(self, slots: np.ndarray) -> np.ndarray:
        if slots.size and (slots.min() < 0 or slots.max() >= self.intensity.size):
            raise ValueError("announced slot outside the sent pulse train")
        return slots.astype(np.int64)


@dataclass
class PulseFrame:
    round: int
    pulses: int
    slots: np.ndarray  # int64, strictly increasing
    state: np.ndarray  # uint8, see module note
    version: int = VERSION

    def encode(self) -> bytes:
        if self.version == VERSION_U32:
            return self._encode_u32()
        count = self.slots.size
        kernel = native.load("bb84")
        if kernel is not None:  # header, states and deltas written into one buffer
            return kernel.varints_encode(  # type: ignore[no-any-return]
                np.ascontiguousarray(self.slots, np.int64), True,
                _HDR.pack(MAGIC, VERSION, self.round, self.pulses, count),
                np.ascontiguousarray(self.state, np.uint8))
        deltas = np.empty(count, np.int64)
        if count:
            deltas[0] = self.slots[0]
            np.subtract(self.slots[1:], self.slots[:-1], out=deltas[1:])
        # Nearly always every delta is one varint byte: then it is the byte itself.
        if not count or int(deltas.max()) < 0x80:
            body = deltas.astype(np.uint8).tobytes()
        else:
            body = messages.encode_varints(deltas)
        return b"".join((_HDR.pack(MAGIC, VERSION, self.round, self.pulses, count),
                         np.asarray(self.state, np.uint8).tobytes(), body))

    def _encode_u32(self) -> bytes:
        # Written into one buffer: a frame is tens of MB, and the diff, the casts and
        # the byte concatenation each copied all of it.
        count = self.slots.size
        out = np.empty(_HDR.size + 5 * count, np.uint8)
        out[: _HDR.size] = np.frombuffer(
            _HDR.pack(MAGIC, VERSION_U32, self.round, self.pulses, count), np.uint8)
        deltas = out[_HDR.size : _HDR.size + 4 * count].view("<u4")
        if count:
            deltas[0] = self.slots[0]
            np.subtract(self.slots[1:], self.slots[:-1], out=deltas[1:], casting="unsafe")
        out[_HDR.size + 4 * count :] = self.state
        return out.tobytes()

    @classmethod
    def decode(cls, data: bytes) -> PulseFrame:
        if len(data) < _HDR.size:
            raise FrameError("pulse frame truncated")
        magic, version, rnd, pulses, count = _HDR.unpack_from(data)
        if magic != MAGIC or version not in (VERSION, VERSION_U32):
            raise FrameError("not a pulse frame of a known version")
        if pulses > MAX_PULSES or count > pulses:
            raise FrameError("pulse frame length does not match its header")
        if version == VERSION_U32:
            if len(data) != _HDR.size + 5 * count:
                raise FrameError("pulse frame length does not match its header")
            deltas = np.frombuffer(data, "<u4", count, _HDR.size).astype(np.int64)
            state = np.frombuffer(data, np.uint8, count, _HDR.size + 4 * count).copy()
        else:
            if len(data) < _HDR.size + 2 * count:
                raise FrameError("pulse frame length does not match its header")
            state = np.frombuffer(data, np.uint8, count, _HDR.size).copy()
            kernel = native.load("bb84")
            if kernel is not None:
                return cls(rnd, pulses, _decode_slots_native(kernel, data, count, pulses),
                           state, version)
            seg = np.frombuffer(data, np.uint8, offset=_HDR.size + count)
            if seg.size == count and (not count or int(seg.max()) < 0x80):
                deltas = seg  # all one-byte varints: the bytes are the deltas
            else:
                try:
                    raw, end = messages.decode_varints(data, _HDR.size + count, count)
                except messages.MessageError as exc:
                    raise FrameError(f"pulse frame slot deltas: {exc}") from None
                if end != len(data) or (count and int(raw.max()) >= MAX_PULSES):
                    raise FrameError("pulse frame length does not match its header")
                deltas = raw.astype(np.int64)
        slots = np.cumsum(deltas, dtype=np.int64)
        if count and (slots[-1] >= pulses or (count > 1 and np.any(deltas[1:] == 0))):
            raise FrameError("pulse frame slots out of order or outside the round")
        return cls(rnd, pulses, slots, state, version)


def _decode_slots_native(kernel: ModuleType, data: bytes, count: int, pulses: int
                         ) -> np.ndarray:
    """A version-2 frame's slots from its varint deltas, compiled: the checks and
    errors of `PulseFrame.decode`'s numpy path, in its order."""
    slots = np.empty(count, np.int64)
    try:
        # Deltas below MAX_PULSES (checked next) cannot wrap the running sum.
        end, top, zero_step, _ = kernel.varints_decode(data, _HDR.size + count, count,
                                                       slots, True)
    except ValueError as exc:
        raise FrameError(f"pulse frame slot deltas: {exc}") from None
    if end != len(data) or (count and top >= MAX_PULSES):
        raise FrameError("pulse frame length does not match its header")
    if count and (slots[-1] >= pulses or zero_step):
        raise FrameError("pulse frame slots out of order or outside the round")
    return slots


def _photons(state: np.ndarray) -> np.ndarray:
    return (state & 0x1F).astype(np.int64)


# Slots per chunk of the fast paths: temporaries stay cache-sized instead of a few
# hundred MB of fresh pages per array (page faults cost as much as the arithmetic).
_CHUNK = 1 << 20
_MASK31 = np.uint32(0x7FFFFFFF)


def _words(src: Random, n: int) -> np.ndarray:
    """n uniform 64-bit words: a numpy generator's raw output, or SecretRng keystream."""
    if isinstance(src, np.random.Generator):
        return src.bit_generator.random_raw(n)  # type: ignore[no-any-return]
    return np.asarray(src.integers(0, 1 << 64, n, dtype=np.uint64))


def _below(p: float, bits: int) -> int:
    """Threshold t with P(u < t) = p (to 2^-bits) for u uniform on [0, 2^bits)."""
    return min(max(round(p * 2.0**bits), 0), (1 << bits) - 1)


def _poisson_tails(mu: float, kmax: int = 31) -> list[int]:
    """t[k] = P(N > k) * 2^64 for N ~ Poisson(mu), k = 0 .. kmax-1 (u < t[k] <=> N > k:
    the inverse CDF on a 64-bit uniform). Tails are summed from the small end, so
    they keep their relative precision where 1 - CDF would cancel."""
    if mu <= 0.0:
        return [0] * kmax
    terms = 400
    pmf = [math.exp(-mu + j * math.log(mu) - math.lgamma(j + 1)) for j in range(terms)]
    tails = []
    for k in range(kmax):
        tail = -math.expm1(-mu) if k == 0 else math.fsum(pmf[k + 1 :])
        tails.append(_below(tail, 64))
    return tails


def emit_dense(params: LinkParams, round_no: int, rng: np.random.Generator,
               secret: Random | None = None) -> tuple[SlotRecord, PulseFrame]:
    """Alice's source drawing every slot (the record holds all of them): `emit` before
    its sparse form, kept as the per-slot reference it is tested against.

    Alice's source for one round of `params.pulses` slots. `secret` draws what the
    key depends on (intensity class, basis, bit; a KME passes `SecretRng`), `rng` the
    photon numbers; without `secret`, `rng` draws everything (research runs).

    Same distribution as `emit_reference`, drawn cheaper: one secret 64-bit word per
    slot gives the intensity class (low 32 bits against the cumulative probabilities),
    the basis (31 bits) and the bit (top bit), independent because they are disjoint
    bits of a uniform word; one raw 64-bit physics word per slot gives the photon
    number by the Poisson inverse CDF, walked only for the slots that have a photon.
    Class and basis probabilities are thus exact to 2^-32 and 2^-31 (the reference's
    floats: 2^-53), photon numbers to 2^-64. Every slot with a photon is in the
    frame, as before, so Eve sees the same pulses.
    """
    sec = rng if secret is None else secret
    n = params.pulses
    if n > MAX_PULSES:
        raise ValueError(f"at most {MAX_PULSES} pulses per round")
    probs = np.asarray(params.intensity_probs, float)
    cum = np.cumsum(probs) / probs.sum()
    t_int = [np.uint32(_below(float(c), 32)) for c in cum[:2]]
    t_basis = np.uint32(_below(params.basis_bias, 31))
    tails = np.array([_poisson_tails(mu) for mu in params.intensities],
                     np.uint64).T.copy()  # tails[k, class]
    intensity = np.empty(n, np.uint8)
    basis = np.empty(n, np.uint8)
    bit = np.empty(n, np.uint8)
    slots: list[np.ndarray] = []
    states: list[np.ndarray] = []
    for lo in range(0, n, _CHUNK):
        c = min(_CHUNK, n - lo)
        half = _words(sec, c).view(np.uint32).reshape(c, 2)  # little-endian: lo, hi
        low, high = half[:, 0], half[:, 1]
        cls = intensity[lo : lo + c]
        np.greater_equal(low, t_int[0], out=cls, casting="unsafe")
        cls += low >= t_int[1]
        bas = basis[lo : lo + c]
        np.greater_equal(high & _MASK31, t_basis, out=bas, casting="unsafe")
        bt = bit[lo : lo + c]
        np.right_shift(high, 31, out=bt, casting="unsafe")
        r = _words(rng, c)
        idx = np.flatnonzero(r < tails[0][cls])
        rs, rc = r[idx], cls[idx]
        photons = np.ones(idx.size, np.uint8)
        live = np.arange(idx.size)
        for k in range(1, tails.shape[0]):  # photons > k; capped at 31 like the frame
            live = live[rs[live] < tails[k][rc[live]]]
            if not live.size:
                break
            photons[live] += 1
        states.append(photons | (bas[idx] << 5) | (bt[idx] << 6))
        slots.append(idx + lo)
    sent_per = np.bincount(intensity, minlength=3).astype(np.int64)
    record = SlotRecord(sent_per, np.zeros(0, np.int64), intensity, basis, bit)
    sent = np.concatenate(slots).astype(np.int64, copy=False) if slots else np.zeros(0, np.int64)
    state = np.concatenate(states).astype(np.uint8) if states else np.zeros(0, np.uint8)
    return record, PulseFrame(round_no, n, sent, state)


class SparseSlotRecord(AliceRecord):
    """Alice's record of the slots that carried photons (the frame's slots), with the
    vacuum slots' settings drawn only for the slots Bob announces (`lookup`).

    A vacuum slot's class, basis and bit influence nothing before Bob's detections are
    fixed (no photon leaves Alice), so drawing them at announcement time gives the same
    joint distribution as drawing them at emission: the classes are a draw without
    replacement from the vacuum slots' class counts (`sent_per_intensity` stays exact),
    the basis and bit come from the secret source like every other slot's.
    """

    def __init__(self, sent_per: np.ndarray, slots: np.ndarray, intensity: np.ndarray,
                 basis: np.ndarray, bit: np.ndarray, pulses: int, vacuum_left: np.ndarray,
                 basis_bias: float, secret: Random, bitmap: np.ndarray | None = None,
                 spare: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """`bitmap`: the slots' bits (`_bitmap(pulses)` with them set) if the caller
        already made it. `spare`: buffers whose prefixes are `intensity`, `basis` and
        `bit`, with room after them for the vacuum slots Bob announces (the compiled
        path inserts there instead of copying the arrays)."""
        self._extra = np.zeros(0, np.int64)
        super().__init__(sent_per, slots, intensity, basis, bit)
        self.pulses = pulses
        self._spare = spare
        # Which slots are in `slots`, one bit each, and the count before each 64-bit
        # word: an index is a rank, a few passes over the query instead of a binary
        # search into tens of millions of slots.
        if bitmap is None:
            self._words = _bitmap(pulses)
            self._set(np.asarray(slots, np.int64))
        else:
            self._words = bitmap
            self._set(np.zeros(0, np.int64))
        self._vacuum_left = vacuum_left.astype(np.int64)  # undrawn vacuum slots per class
        self._basis_bias = basis_bias
        self._secret = secret

    def __repr__(self) -> str:  # the arrays are Alice's secrets
        return f"SparseSlotRecord(pulses={self.pulses}, sent={self.intensity.size})"

    # With the kernel, announced vacuum slots wait in `_extra` and are merged into
    # `slots` when it is read: the protocol reads the settings by index only, and
    # re-making tens of millions of slots for a few dark clicks was most of sifting.
    @property  # type: ignore[override]
    def slots(self) -> np.ndarray:
        if self._extra.size:
            base = self._slots
            self._slots = _insert(base, np.searchsorted(base, self._extra), self._extra)
            self._extra = np.zeros(0, np.int64)
        return self._slots

    @slots.setter
    def slots(self, value: np.ndarray) -> None:
        self._slots = value
        self._extra = np.zeros(0, np.int64)

    def lookup(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, np.int64)
        kernel = native.load("bb84")
        if kernel is not None:  # checks every slot's range itself, before any change
            slots = np.ascontiguousarray(slots)
            idx = np.empty(slots.size, np.int64)
            found = np.empty(slots.size, bool)
            if kernel.rank_lookup(self._words, self._before, self.pulses, slots, idx,
                                  found):
                return idx
            return self._insert_vacuum(slots, idx, found)
        if slots.size and (slots.min() < 0 or slots.max() >= self.pulses):
            raise ValueError("announced slot outside the sent pulse train")
        w = slots >> 6
        b = (slots & 63).astype(np.uint64)
        word = self._words[w]
        idx = self._before[w] + np.bitwise_count(word & ((np.uint64(1) << b) - np.uint64(1)))
        found = ((word >> b) & np.uint64(1)).astype(bool)
        if found.all():
            return idx.astype(np.int64)
        return self._insert_vacuum(slots, idx.astype(np.int64), found)

    def _insert_vacuum(self, slots: np.ndarray, idx: np.ndarray, found: np.ndarray
                       ) -> np.ndarray:
        new = np.unique(slots[~found])
        # Where they go in slot order: their ranks among the slots already there.
        self._draw_vacuum(new, idx[~found][np.unique(slots[~found], return_index=True)[1]])
        self._set(new)
        # Every index moves up by the number of newly inserted slots below it.
        return idx.astype(np.int64) + np.searchsorted(new, slots)

    def _set(self, slots: np.ndarray) -> None:
        if slots.size < 4096:  # the few vacuum slots Bob announces
            np.bitwise_or.at(self._words, slots >> 6,
                             np.uint64(1) << (slots & 63).astype(np.uint64))
        else:
            self._set_many(slots)
        counts = np.bitwise_count(self._words).astype(np.int64)
        self._before = np.cumsum(counts) - counts

    def _set_many(self, slots: np.ndarray) -> None:
        kernel = native.load("bb84")
        if kernel is not None:
            kernel.set_bits(self._words, np.ascontiguousarray(slots, np.int64))
            return
        flags = np.zeros(self._words.size * 64, bool)
        flags[slots] = True
        self._words |= np.packbits(flags, bitorder="little").view("<u8")

    def _draw_vacuum(self, new: np.ndarray, pos: np.ndarray) -> None:
        k = new.size
        left = self._vacuum_left
        if k > int(left.sum()):
            raise ValueError("more vacuum slots announced than were sent")
        # Classes of k of the vacuum slots: a draw without replacement from the counts.
        # They are announced in the sift reply anyway; the seed still comes from the
        # secret source so they are unpredictable while the pulses are in flight.
        gen = np.random.default_rng(int(self._secret.integers(0, 1 << 63)))
        got = gen.multivariate_hypergeometric(left, k)
        self._vacuum_left = left - got
        cls = gen.permutation(np.repeat(np.arange(3, dtype=np.uint8), got))
        basis = (self._secret.random(k) >= self._basis_bias).astype(np.uint8)
        bit = np.asarray(self._secret.integers(0, 2, k, dtype=np.uint8), np.uint8)
        kernel = native.load("bb84")
        if kernel is None:
            self.slots = _insert(self.slots, pos, new)
            self.intensity = _insert(self.intensity, pos, cls)
            self.basis = _insert(self.basis, pos, basis)
            self.bit = _insert(self.bit, pos, bit)
            return
        extra = np.concatenate([self._extra, new]) if self._extra.size else new
        self._extra = np.sort(extra)
        n = self.intensity.size
        spare = self._spare
        if spare is None or any(b.size < n + k for b in spare):
            spare = self._spare = tuple(  # type: ignore[assignment]
                np.empty(n + max(k, n // 64), np.uint8) for _ in range(3))
            for buf, arr in zip(spare, (self.intensity, self.basis, self.bit), strict=True):
                buf[:n] = arr
        assert spare is not None
        pos = np.ascontiguousarray(pos, np.int64)
        for buf, vals in zip(spare, (cls, basis, bit), strict=True):
            kernel.insert_inplace(buf, n, pos, np.ascontiguousarray(vals, np.uint8), 1)
        self.intensity, self.basis, self.bit = (b[: n + k] for b in spare)


def _bitmap(pulses: int) -> np.ndarray:
    """An all-clear slot bitmap of a round: little-endian 64-bit words."""
    return np.zeros(-(-max(pulses, 1) // 64) * 8, np.uint8).view("<u8")


def _insert(arr: np.ndarray, pos: np.ndarray, values: np.ndarray) -> np.ndarray:
    """np.insert(arr, pos, values) for sorted `pos` (searchsorted's): one copy pass,
    compiled when `_qkdgw_bb84` is there (np.insert sorts and masks the whole array)."""
    kernel = native.load("bb84")
    if kernel is None:
        return np.insert(arr, pos, values)
    arr = np.ascontiguousarray(arr)
    vals = np.ascontiguousarray(np.asarray(values).astype(arr.dtype, copy=False))
    out = np.empty(arr.size + vals.size, arr.dtype)
    kernel.insert_sorted(arr, np.ascontiguousarray(pos, np.int64), vals,
                         arr.dtype.itemsize, out)
    return out


def _mixture_tables(params: LinkParams, kmax: int = 31
                    ) -> tuple[int, list[int], list[int], np.ndarray]:
    """What the sparse source draws against: P(N > 0) * 2^64 for the photon number N of
    a slot (class mixed in); t[k-1] = P(N > k | N > 0) * 2^64, k = 1 .. kmax-1; and
    P(class mu | N = j) * 2^32 for j = 0 .. kmax (j = kmax: N >= kmax, as the frame
    caps it) with the class probabilities of a vacuum slot (for the counts)."""
    probs = np.asarray(params.intensity_probs, float)
    probs = probs / probs.sum()
    terms = 400
    pmf = []
    for mu in params.intensities:
        if mu <= 0.0:
            pmf.append([1.0] + [0.0] * (terms - 1))
        else:
            pmf.append([math.exp(-mu + j * math.log(mu) - math.lgamma(j + 1))
                        for j in range(terms)])
    q = math.fsum(float(p) * -math.expm1(-mu) for p, mu in zip(probs, params.intensities,
                                                              strict=True))
    tails = []
    for k in range(1, kmax):
        tail = math.fsum(float(p) * math.fsum(f[k + 1 :]) for p, f in zip(probs, pmf,
                                                                         strict=True))
        tails.append(_below(tail / q, 64) if q > 0 else 0)
    t_mu = []
    for j in range(kmax + 1):
        w = [float(p) * (f[j] if j < kmax else math.fsum(f[kmax:]))
             for p, f in zip(probs, pmf, strict=True)]
        tot = w[0] + w[1]
        t_mu.append(_below(w[0] / tot, 32) if tot > 0 else 0)
    vac = np.array([float(p) * f[0] for p, f in zip(probs, pmf, strict=True)])
    return _below(q, 64), tails, t_mu, vac / vac.sum()


def emit(params: LinkParams, round_no: int, rng: np.random.Generator,
         secret: Random | None = None) -> tuple[SparseSlotRecord, PulseFrame]:
    """Alice's source for one round of `params.pulses` slots, at a cost in the slots
    that carry photons (a third of them with the example source), not in all slots.

    The joint law of (class, photon number, basis, bit) per slot is that of
    `emit_dense`, factored the other way round: the physics `rng` draws whether a slot
    carries photons (16 raw bits per slot against P(N > 0), refined by 48 more bits on
    the one tie value) and, for those that do, N from the class-mixed Poisson law given
    N > 0 (one raw 64-bit word); the `secret` source then draws the class given N (low
    32 bits of one word), the basis (31 bits) and the bit (top bit). A photon number
    says nothing more about the class than Bayes allows, as in a real source. Vacuum
    slots get their class counts now (a multinomial) and their basis and bit only if Bob
    announces them (`SparseSlotRecord.lookup`). Every slot with a photon is in the
    frame, as before, so Eve sees the same pulses.
    """
    sec = rng if secret is None else secret
    n = params.pulses
    if n > MAX_PULSES:
        raise ValueError(f"at most {MAX_PULSES} pulses per round")
    t_any, tails_l, t_mu_l, p_vac_cls = _mixture_tables(params)
    tails = np.array(tails_l, np.uint64)
    t_mu = np.array(t_mu_l, np.uint32)
    t_basis = np.uint32(_below(params.basis_bias, 31))
    kernel = native.load("bb84")
    bitmap = spare = None
    if kernel is not None:
        bitmap = _bitmap(n)
        sent, intensity, basis, bit, state, n_nu, spare = _emit_pulses_native(
            kernel, n, rng, sec, t_any, tails, t_mu, t_basis, bitmap)
        # A pulse's class is mu (0) or nu (1): vacuum pulses carry no photon.
        per_class = np.array([sent.size - n_nu, n_nu, 0], np.int64)
    else:
        sent, intensity, basis, bit, state = _emit_pulses(
            n, rng, sec, t_any, tails, t_mu, t_basis)
        per_class = np.bincount(intensity, minlength=3).astype(np.int64)
    # The vacuum slots' class counts: aggregate and never used for the key, drawn from
    # a generator seeded by the secret source.
    vac_gen = np.random.default_rng(int(sec.integers(0, 1 << 63)))
    vacuum_left = vac_gen.multinomial(n - sent.size, p_vac_cls).astype(np.int64)
    sent_per = per_class + vacuum_left
    record = SparseSlotRecord(sent_per, sent, intensity, basis, bit, n,
                              vacuum_left, params.basis_bias, sec, bitmap, spare)
    return record, PulseFrame(round_no, n, sent, state)


_Pulses = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_CAP_MARGIN = 1.01  # over the expected pulses of a round (tests set 0: growth)


def _emit_pulses_native(kernel: ModuleType, n: int, rng: np.random.Generator,
                        sec: Random, t_any: int, tails: np.ndarray, t_mu: np.ndarray,
                        t_basis: np.uint32, bitmap: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                   np.ndarray, int,
                                   tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`_emit_pulses` with its loops compiled (`_qkdgw_bb84`): the same words drawn in
    the same order, the same outputs bit for bit, written straight into round-sized
    arrays (no per-chunk pieces to concatenate); also sets the pulses' bits in `bitmap`
    and returns how many are of class nu, and the class, basis and bit buffers (room
    after the pulses for the vacuum slots Bob will announce)."""
    hi16, lo48 = t_any >> 48, t_any & ((1 << 48) - 1)
    # Room for the expected pulses plus a chunk (the scan writes a whole chunk's
    # candidates); grown in the rare round that needs more.
    cap = min(n, int(n * t_any / 2.0**64 * _CAP_MARGIN) + _CHUNK)
    sent = np.empty(cap, np.int64)
    out8 = [np.empty(cap, np.uint8) for _ in range(4)]  # state, class, basis, bit
    pos = n_nu = 0
    for lo in range(0, n, _CHUNK):
        c = min(_CHUNK, n - lo)
        if pos + c > sent.size:
            grow = max(sent.size * 5 // 4, pos + c)
            sent = np.concatenate([sent[:pos], np.empty(grow - pos, np.int64)])
            out8 = [np.concatenate([a[:pos], np.empty(grow - pos, np.uint8)]) for a in out8]
        u16 = _words(rng, -(-c // 4)).view(np.uint16)[:c]
        n_ties = kernel.count_eq(u16, c, hi16)
        tie_words = _words(rng, n_ties) if n_ties else np.zeros(0, np.uint64)
        m = kernel.carry_scan(u16, c, hi16, tie_words, lo48, lo, sent[pos:], bitmap)
        r = _words(rng, m)
        w = _words(sec, m)
        n_nu += kernel.emit_fill(m, r, w, tails, t_mu, int(t_basis),
                                 *(a[pos : pos + m] for a in out8))
        pos += m
    state, cls, bas, bit = (a[:pos] for a in out8)
    return sent[:pos], cls, bas, bit, state, n_nu, (out8[1], out8[2], out8[3])


def _emit_pulses(n: int, rng: np.random.Generator, sec: Random, t_any: int,
                 tails: np.ndarray, t_mu: np.ndarray, t_basis: np.uint32) -> _Pulses:
    """The slots that carry photons and their (class, basis, bit, state), chunk by
    chunk: the numpy reference of `_emit_pulses_native`."""
    hi16, lo48 = np.uint16(t_any >> 48), np.uint64(t_any & ((1 << 48) - 1))
    slots: list[np.ndarray] = []
    cls_l: list[np.ndarray] = []
    bas_l: list[np.ndarray] = []
    bit_l: list[np.ndarray] = []
    states: list[np.ndarray] = []
    for lo in range(0, n, _CHUNK):
        c = min(_CHUNK, n - lo)
        u16 = _words(rng, -(-c // 4)).view(np.uint16)[:c]
        carries = u16 < hi16
        ties = np.flatnonzero(u16 == hi16)
        if ties.size:
            carries[ties[(_words(rng, ties.size) >> np.uint64(16)) < lo48]] = True
        idx = np.flatnonzero(carries)
        photons = _photon_numbers(_words(rng, idx.size), tails)
        half = _words(sec, idx.size).view(np.uint32).reshape(idx.size, 2)
        low, high = half[:, 0], half[:, 1]
        cls = (low >= t_mu[photons]).astype(np.uint8)
        bas = ((high & _MASK31) >= t_basis).astype(np.uint8)
        bt = (high >> 31).astype(np.uint8)
        states.append(photons | (bas << 5) | (bt << 6))
        slots.append(idx + lo)
        cls_l.append(cls)
        bas_l.append(bas)
        bit_l.append(bt)
    sent = np.concatenate(slots).astype(np.int64, copy=False) if slots else np.zeros(
        0, np.int64)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)

    return sent, cat(cls_l), cat(bas_l), cat(bit_l), cat(states)


def _photon_numbers(r: np.ndarray, tails: np.ndarray) -> np.ndarray:
    """1 + #{k >= 1: r < tails[k-1]} (tails decreasing): N given N > 0, capped at 31."""
    photons = np.ones(r.size, np.uint8)
    live = np.flatnonzero(r < tails[0]) if tails.size else np.zeros(0, np.int64)
    for k in range(1, tails.size + 1):
        if not live.size:
            break
        photons[live] += 1
        if k < tails.size:
            live = live[r[live] < tails[k]]
    return photons


def emit_reference(params: LinkParams, round_no: int, rng: np.random.Generator,
         secret: Random | None = None) -> tuple[SlotRecord, PulseFrame]:
    """The plain per-slot form of `emit` (one float per draw, `rng.poisson` on an
    array of means): the statistical reference the tests hold `emit` to.

    Alice's source for one round of `params.pulses` slots. `secret` draws what the
    key depends on (intensity class, basis, bit; a KME passes `SecretRng`), `rng` the
    photon numbers; without `secret`, `rng` draws everything (research runs)."""
    sec = rng if secret is None else secret
    n = params.pulses
    if n > MAX_PULSES:
        raise ValueError(f"at most {MAX_PULSES} pulses per round")
    cum = np.cumsum(params.intensity_probs)
    # Inverse-CDF on one uniform per slot: same distribution as rng.choice, ~5x faster.
    intensity = np.minimum(np.searchsorted(cum / cum[-1], sec.random(n), side="right"),
                           2).astype(np.uint8)
    basis = (sec.random(n) >= params.basis_bias).astype(np.uint8)
    bit = sec.integers(0, 2, n, dtype=np.uint8)
    means = np.array(params.intensities)[intensity]
    photons = rng.poisson(means)
    sent = np.flatnonzero(photons > 0)
    state = (np.minimum(photons[sent], 31).astype(np.uint8) | (basis[sent] << 5)
             | (bit[sent] << 6))
    sent_per = np.bincount(intensity, minlength=3).astype(np.int64)
    record = SlotRecord(sent_per, np.zeros(0, np.int64), intensity, basis, bit)
    return record, PulseFrame(round_no, n, sent.astype(np.int64), state.astype(np.uint8))


def attack(frame: PulseFrame, mode: str, fraction: float, rng: np.random.Generator,
           basis_bias: float = 0.5) -> PulseFrame:
    """Eve on the fibre at Alice's output."""
    if mode not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must be in [0, 1]")
    st = frame.state.copy()
    hit = rng.random(st.size) < fraction
    photons = _photons(st)
    basis = (st >> 5) & 1
    bit = (st >> 6) & 1
    keep = np.ones(st.size, bool)
    if mode == "intercept-resend":
        # Ideal detector: she gets a result on every pulse, right when the bases match,
        # and resends one photon in her basis and result (through the real fibre).
        e_basis = (rng.random(st.size) >= basis_bias).astype(np.uint8)
        e_bit = np.where(e_basis == basis, bit, rng.integers(0, 2, st.size, dtype=np.uint8))
        new = 1 | (e_basis << 5) | (e_bit << 6)
        st = np.where(hit, new, st).astype(np.uint8)
    elif mode == "pns":
        # Blocks single photons, keeps one of each multi-photon pulse, forwards the
        # rest over a lossless line.
        keep = ~(hit & (photons == 1))
        multi = hit & (photons >= 2)
        st = np.where(multi, ((photons - 1) | (basis << 5) | (bit << 6) | 0x80), st)
        st = st.astype(np.uint8)
    else:  # noise: depolarise
        rb = rng.integers(0, 2, st.size, dtype=np.uint8)
        rv = rng.integers(0, 2, st.size, dtype=np.uint8)
        st = np.where(hit, (photons | (rb << 5) | (rv << 6)).astype(np.uint8), st)
        st = st.astype(np.uint8)
    return PulseFrame(frame.round, frame.pulses, frame.slots[keep], st[keep], frame.version)


def measure(frame: PulseFrame, params: LinkParams, rng: np.random.Generator,
            secret: Random | None = None) -> BobRecord:
    """Bob's receiver: fibre and detector loss, basis choice, misalignment, dark clicks.
    `secret` draws Bob's bases and the bits of double and dark clicks, `rng` the
    physics (as in `emit`).

    Same distribution as `measure_reference`, drawn per photon: Bob's basis from 32
    secret bits per pulse; every photon of a pulse takes one raw 64-bit physics word,
    below P(right detector) = eta c it clicks the right detector, below P(any) = eta the
    wrong one, else it is lost. That is the joint law of the reference's two binomials
    (detected ~ Bin(n, eta), right ~ Bin(detected, c)) photon by photon, exact to 2^-64;
    the thresholds are indexed by the state's top three bits and Bob's basis. Dark
    clicks in the pulses' slots are i.i.d. Bernoulli(d) per detector, drawn as a
    Binomial(size, d) count on a uniform subset of that size (as in `measure_prev`,
    the binomial form this replaced and is tested against statistically). The loops
    run compiled when `_qkdgw_bb84` is there (`_photon_clicks` and `_collect` are
    their numpy reference, the same output bit for bit).
    """
    sec = rng if secret is None else secret
    st = frame.state
    size = st.size
    t_basis = np.uint32(_below(params.basis_bias, 32))
    # Thresholds by (state >> 5) << 1 | Bob's basis = bypass, bit, basis, Bob's basis.
    right = np.empty(16, np.uint64)
    anyd = np.empty(16, np.uint64)
    for key in range(16):
        bp, s_basis, b_basis = key >> 3, (key >> 1) & 1, key & 1
        eta = params.detector_efficiency if bp else params.eta_sys
        c = 1.0 - params.misalignment if s_basis == b_basis else 0.5
        right[key] = _below(eta * c, 64)
        anyd[key] = _below(eta, 64)
    dark = _dark_among_pulses(rng, size, params.dark_per_detector)
    kernel = native.load("bb84")
    slots_all = np.ascontiguousarray(frame.slots, np.int64)
    # Bob's clicks go straight into pulse-sized arrays (a click is a subset).
    out_slots = np.empty(size, np.int64)
    out_basis = np.empty(size, np.uint8)
    out_bits = np.empty(size, np.uint8)
    cap = min(size, _CHUNK)
    flags = np.empty(cap, np.uint8)  # per pulse: right (1) and wrong (2) detector click
    b_basis = np.empty(cap, np.uint8)
    both = np.empty(cap, np.int64)
    pos = 0
    for lo in range(0, size, _CHUNK):
        c = min(_CHUNK, size - lo)
        s = np.ascontiguousarray(st[lo : lo + c], np.uint8)
        bw = _words(sec, -(-c // 2)).view(np.uint32)[:c]
        sl = slots_all[lo : lo + c]
        if kernel is not None:
            r = _words(rng, kernel.photon_sum(s))
            local = []
            for det in dark:
                a, b = np.searchsorted(det, (lo, lo + c))
                local.append(np.ascontiguousarray(det[a:b] - lo, np.int64))
            n_sel, n_both = kernel.measure_chunk(
                c, s, bw, r, right, anyd, int(t_basis), local[0], local[1], sl,
                out_slots[pos:], out_basis[pos:], out_bits[pos:], both)
            if n_both:
                out_bits[pos + both[:n_both]] = sec.integers(0, 2, n_both, dtype=np.uint8)
            pos += n_sel
            continue
        r = _words(rng, int(np.sum(s & np.uint8(0x1F), dtype=np.int64)))
        b_basis[:c], flags[:c] = _photon_clicks(s, bw, r, right, anyd, t_basis)
        for bit, det in zip((1, 2), dark, strict=True):
            a, b = np.searchsorted(det, (lo, lo + c))
            if b > a:
                flags[det[a:b] - lo] |= np.uint8(bit)
        n_sel, n_both = _collect(flags[:c], s, b_basis[:c], sl, out_slots[pos:],
                                 out_basis[pos:], out_bits[pos:], both)
        if n_both:
            out_bits[pos + both[:n_both]] = sec.integers(0, 2, n_both, dtype=np.uint8)
        pos += n_sel
    return _with_dark_clicks(frame, size, [out_slots[:pos]], [out_basis[:pos]],
                             [out_bits[:pos]], params, rng, sec)


def _photon_clicks(s: np.ndarray, bw: np.ndarray, r: np.ndarray, right: np.ndarray,
                   anyd: np.ndarray, t_basis: np.uint32) -> tuple[np.ndarray, np.ndarray]:
    """Bob's bases and click flags of one chunk (with the dark clicks and `_collect`,
    the numpy reference of the kernel's measure_chunk): photon j of pulse i takes word
    r[j] in pulse order."""
    b_basis = (bw >= t_basis).view(np.uint8)
    key = ((s >> 4) & np.uint8(0xFE)) | b_basis
    photons = (s & np.uint8(0x1F)).astype(np.int64)
    owner = np.repeat(np.arange(s.size), photons)
    kp = key[owner]
    hit_c = r < right[kp]
    hit_w = (r < anyd[kp]) & ~hit_c
    flags = (np.bincount(owner[hit_c], minlength=s.size) > 0).view(np.uint8).copy()
    flags |= (np.bincount(owner[hit_w], minlength=s.size) > 0).view(np.uint8) << 1
    return b_basis, flags


def _collect(flags: np.ndarray, s: np.ndarray, b_basis: np.ndarray, slots: np.ndarray,
             out_slots: np.ndarray, out_basis: np.ndarray, out_bits: np.ndarray,
             both: np.ndarray) -> tuple[int, int]:
    """The clicked pulses of a chunk into the outputs (the last step of measure_chunk's
    numpy reference): slot, basis, and the state's bit on a right-detector click, its
    complement otherwise; `both` gets the output positions of double clicks."""
    sel = np.flatnonzero(flags)
    f = flags[sel]
    n = sel.size
    out_slots[:n] = slots[sel]
    out_basis[:n] = b_basis[sel]
    out_bits[:n] = ((s[sel] >> 6) & 1) ^ (f & 1) ^ 1
    dbl = np.flatnonzero(f == 3)
    both[: dbl.size] = dbl
    return n, dbl.size


def measure_prev(frame: PulseFrame, params: LinkParams, rng: np.random.Generator,
                 secret: Random | None = None) -> BobRecord:
    """The binomial form of `measure` (two binomials per multi-photon pulse, where
    `measure` draws a word per photon): kept as the statistical reference the
    per-photon draw is tested against, per pulse category.

    Bob's receiver: fibre and detector loss, basis choice, misalignment, dark clicks.
    `secret` draws Bob's bases and the bits of double and dark clicks, `rng` the
    physics (as in `emit`).

    Same distribution as `measure_reference`, drawn cheaper: Bob's basis from 32
    secret bits per pulse; a single-photon pulse (most of them) is resolved by one raw
    64-bit physics word against the probabilities of "right detector" (eta c) and
    "either detector" (eta), which is what the two binomials give for one photon;
    multi-photon pulses keep the binomials. Dark clicks in the pulses' slots are
    i.i.d. Bernoulli(d) per detector, drawn as a Binomial(size, d) count on a uniform
    subset of that size instead of one uniform per pulse and detector.
    """
    sec = rng if secret is None else secret
    st = frame.state
    size = st.size
    d = params.dark_per_detector
    t_basis = np.uint32(_below(params.basis_bias, 32))
    # Thresholds per (bypass, bases match): P(right detector), P(any detector).
    right = np.empty(4, np.uint64)
    anyd = np.empty(4, np.uint64)
    for bp in (0, 1):
        eta = params.detector_efficiency if bp else params.eta_sys
        for match in (0, 1):
            c = 1.0 - params.misalignment if match else 0.5
            right[2 * bp + match] = _below(eta * c, 64)
            anyd[2 * bp + match] = _below(eta, 64)
    dark = _dark_among_pulses(rng, size, d)
    out_slots: list[np.ndarray] = []
    out_basis: list[np.ndarray] = []
    out_bits: list[np.ndarray] = []
    for lo in range(0, size, _CHUNK):
        c = min(_CHUNK, size - lo)
        s = st[lo : lo + c]
        photons = s & 0x1F
        s_basis = (s >> 5) & 1
        s_bit = (s >> 6) & 1
        bypass = s >> 7
        b_basis = (_words(sec, -(-c // 2)).view(np.uint32)[:c] >= t_basis).astype(np.uint8)
        combo = (bypass << 1) | (b_basis == s_basis)
        r = _words(rng, c)
        click_c = r < right[combo]
        click_w = (r < anyd[combo]) & ~click_c
        multi = np.flatnonzero(photons > 1)
        if multi.size:
            eta = np.where(bypass[multi] != 0, params.detector_efficiency, params.eta_sys)
            m = rng.binomial(photons[multi], eta)
            cm = np.where(combo[multi] & 1, 1.0 - params.misalignment, 0.5)
            jc = rng.binomial(m, cm)
            click_c[multi] = jc > 0
            click_w[multi] = m - jc > 0
        for det, clicks in zip(dark, (click_c, click_w), strict=True):
            a, b = np.searchsorted(det, (lo, lo + c))
            clicks[det[a:b] - lo] = True
        clicked = click_c | click_w
        bits = np.where(click_c, s_bit, 1 - s_bit).astype(np.uint8)
        both = click_c & click_w
        nb = int(np.count_nonzero(both))
        if nb:
            bits[both] = sec.integers(0, 2, nb, dtype=np.uint8)
        out_slots.append(frame.slots[lo : lo + c][clicked])
        out_basis.append(b_basis[clicked])
        out_bits.append(bits[clicked])
    return _with_dark_clicks(frame, size, out_slots, out_basis, out_bits, params, rng, sec)


def _dark_among_pulses(rng: np.random.Generator, size: int, d: float) -> list[np.ndarray]:
    """Sorted pulse indices with a dark click in the right, then the wrong detector."""
    dark = []
    for _ in range(2):
        k = int(rng.binomial(size, d)) if size else 0
        dark.append(np.sort(rng.choice(size, k, replace=False)) if k else
                    np.zeros(0, np.int64))
    return dark


def _with_dark_clicks(frame: PulseFrame, size: int, out_slots: list[np.ndarray],
                      out_basis: list[np.ndarray], out_bits: list[np.ndarray],
                      params: LinkParams, rng: np.random.Generator, sec: Random
                      ) -> BobRecord:
    """Bob's record from his photon detections (per chunk) plus the dark clicks in the
    slots no photon reached: a click in either detector with probability Y0, a random
    bit (a dark click knows nothing of the state)."""
    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        # One part (what `measure` passes) is used as it is: Bob's clicks are
        # millions with a clean detector, and each copy of them cost a pass.
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    slots, basis, bits = cat(out_slots, np.int64), cat(out_basis, np.uint8), cat(
        out_bits, np.uint8)
    empty = frame.pulses - size
    n_dark = int(rng.binomial(empty, params.dark_count_prob)) if empty > 0 else 0
    if n_dark:
        cand = np.unique(rng.integers(0, frame.pulses, n_dark, dtype=np.int64))
        # frame.slots is sorted: a binary search per candidate, where np.isin would
        # sort all the pulses' slots for a handful of dark clicks.
        pos = np.minimum(np.searchsorted(frame.slots, cand), max(size - 1, 0))
        cand = cand[frame.slots[pos] != cand] if size else cand
        slots, basis, bits = _add_dark_clicks(slots, basis, bits, cand, params, sec)
    return BobRecord(slots.astype(np.int64, copy=False), basis, bits)


def _add_dark_clicks(slots: np.ndarray, basis: np.ndarray, bits: np.ndarray,
                     dark: np.ndarray, params: LinkParams, sec: Random
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bob's detections plus dark clicks at the slots `dark` (none a photon reached):
    each with Bob's own basis choice and a random bit, all in slot order. Shared by
    `measure` and its reference so both draw `sec` in the same order."""
    d_basis = (sec.random(dark.size) >= params.basis_bias).astype(np.uint8)
    d_bits = sec.integers(0, 2, dark.size, dtype=np.uint8)
    # `dark` is sorted and few: inserting at its positions is the stable sort of the
    # concatenation (side="right": an equal slot would follow), without the sort.
    pos = np.searchsorted(slots, dark, side="right")
    return (_insert(slots, pos, dark), _insert(basis, pos, d_basis),
            _insert(bits, pos, d_bits))


def measure_reference(frame: PulseFrame, params: LinkParams, rng: np.random.Generator,
            secret: Random | None = None) -> BobRecord:
    """The plain per-pulse form of `measure` (binomials and uniforms for every pulse):
    the statistical reference the tests hold `measure` to.

    Bob's receiver: fibre and detector loss, basis choice, misalignment, dark clicks.
    `secret` draws Bob's bases and the bits of double and dark clicks, `rng` the
    physics (as in `emit`)."""
    sec = rng if secret is None else secret
    st = frame.state
    size = st.size
    photons = _photons(st)
    s_basis = (st >> 5) & 1
    s_bit = (st >> 6) & 1
    bypass = (st >> 7).astype(bool)
    eta = np.where(bypass, params.detector_efficiency, params.eta_sys)
    b_basis = (sec.random(size) >= params.basis_bias).astype(np.uint8)
    m = rng.binomial(photons, eta)
    c = np.where(b_basis == s_basis, 1.0 - params.misalignment, 0.5)
    jc = rng.binomial(m, c)
    d = params.dark_per_detector
    click_c = (jc > 0) | (rng.random(size) < d)
    click_w = (m - jc > 0) | (rng.random(size) < d)
    clicked = click_c | click_w
    bits = np.where(click_c, s_bit, 1 - s_bit).astype(np.uint8)
    both = click_c & click_w
    bits[both] = sec.integers(0, 2, int(both.sum()), dtype=np.uint8)
    slots = frame.slots[clicked]
    basis = b_basis[clicked]
    bits = bits[clicked]
    # Dark clicks in the slots no photon reached: a click in either detector with
    # probability Y0, a random bit (a dark click knows nothing of the state).
    empty = frame.pulses - size
    n_dark = int(rng.binomial(empty, params.dark_count_prob)) if empty > 0 else 0
    if n_dark:
        cand = np.unique(rng.integers(0, frame.pulses, n_dark, dtype=np.int64))
        cand = cand[~np.isin(cand, frame.slots, assume_unique=True)]
        slots, basis, bits = _add_dark_clicks(slots, basis, bits, cand, params, sec)
    return BobRecord(slots.astype(np.int64), basis, bits)
