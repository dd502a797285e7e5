"""The emulated quantum channel between two KMEs, split at the fibre so that an
eavesdropper process can sit on it. Sans-I/O: functions from settings and bytes to
bytes and records; the caller moves the frames over a real connection.

Same physics as `qkd.sim.channel` (weak coherent pulses, Poisson photon numbers,
per-photon loss, misalignment e_d, two detectors with dark clicks, double clicks to a
random bit; afterpulsing and dead time are not emulated here), but split in three:

    Alice  `emit()`     chooses intensity, basis and bit for every slot, draws the
                        photon number, and puts the pulses that carry photons into a
                        *pulse frame*. What the frame shows is what a pulse physically
                        carries: photon number and polarisation, never the intensity
                        class (that is what makes decoy states work).
    Eve    `attack()`   may rewrite the frame: intercept-resend, photon-number
                        splitting, depolarising noise, on a fraction of the pulses.
    Bob    `measure()`  applies the fibre and detector loss to each photon, his random
                        basis, misalignment and dark clicks, and keeps his click record.

Fibre loss is applied at Bob's end, to every pulse except those flagged `bypass`: a
PNS attacker replaces the fibre by a lossless line, which in this emulation means
setting that flag on the pulses she forwards. Vacuum slots are not sent; Bob's dark
clicks cover every slot of the round.

Frame (little-endian): b"QKDQ" | version u8 | round u32 | pulses u64 | count u64 |
slot deltas u32[count] | state u8[count], state = photons (5 bits, capped at 31) |
basis << 5 | bit << 6 | bypass << 7.

On the wire between two KMEs that frame is *sealed* (`seal` / `unseal`): the pulses'
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

import struct
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qkd.common.errors import QkdError
from qkd.link.csprng import SecretRng
from qkd.sim.channel import AliceRecord, BobRecord
from qkd.sim.params import LinkParams

MAGIC = b"QKDQ"
VERSION = 1
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
        return aead.decrypt(direction + struct.pack("<Q", counter), data[_SEAL_HDR.size:],
                            hdr)
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

    def encode(self) -> bytes:
        deltas = np.diff(self.slots, prepend=0).astype("<u4")
        return (_HDR.pack(MAGIC, VERSION, self.round, self.pulses, self.slots.size)
                + deltas.tobytes() + self.state.astype(np.uint8).tobytes())

    @classmethod
    def decode(cls, data: bytes) -> PulseFrame:
        if len(data) < _HDR.size:
            raise FrameError("pulse frame truncated")
        magic, version, rnd, pulses, count = _HDR.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise FrameError("not a pulse frame of this version")
        if pulses > MAX_PULSES or len(data) != _HDR.size + 5 * count or count > pulses:
            raise FrameError("pulse frame length does not match its header")
        deltas = np.frombuffer(data, "<u4", count, _HDR.size).astype(np.int64)
        slots = np.cumsum(deltas)
        if count and (slots[-1] >= pulses or (count > 1 and np.any(deltas[1:] == 0))):
            raise FrameError("pulse frame slots out of order or outside the round")
        state = np.frombuffer(data, np.uint8, count, _HDR.size + 4 * count).copy()
        return cls(rnd, pulses, slots, state)


def _photons(state: np.ndarray) -> np.ndarray:
    return (state & 0x1F).astype(np.int64)


def emit(params: LinkParams, round_no: int, rng: np.random.Generator,
         secret: Random | None = None) -> tuple[SlotRecord, PulseFrame]:
    """Alice's source for one round of `params.pulses` slots. `secret` draws what the
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
    return PulseFrame(frame.round, frame.pulses, frame.slots[keep], st[keep])


def measure(frame: PulseFrame, params: LinkParams, rng: np.random.Generator,
            secret: Random | None = None) -> BobRecord:
    """Bob's receiver: fibre and detector loss, basis choice, misalignment, dark clicks.
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
        slots = np.concatenate([slots, cand])
        basis = np.concatenate([basis, (sec.random(cand.size) >= params.basis_bias
                                        ).astype(np.uint8)])
        bits = np.concatenate([bits, sec.integers(0, 2, cand.size, dtype=np.uint8)])
        order = np.argsort(slots, kind="stable")
        slots, basis, bits = slots[order], basis[order], bits[order]
    return BobRecord(slots.astype(np.int64), basis, bits)
