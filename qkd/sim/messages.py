"""Classical-channel messages of the post-processing protocol and their byte encoding.

Every message is a small frozen dataclass; `encode()` gives `type byte || body` and
`decode()` reverses it, rejecting truncated or oversized bodies. Bit strings travel
packed (numpy.packbits, big-endian bit order) with their exact bit count, so what a
party reveals is counted from the bits actually carried.

The channel is assumed authenticated (the KME layer adds the MAC); these encodings only
have to be unambiguous.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from qkd import native
from qkd.common.errors import QkdError
from qkd.sim import constants as c


class MessageError(QkdError, ValueError):
    """A message could not be decoded (truncated, wrong type, inconsistent lengths)."""


_REGISTRY: dict[int, type[Message]] = {}


def _register(cls: type[Message]) -> type[Message]:
    if cls.TYPE in _REGISTRY:
        raise RuntimeError(f"duplicate message type {cls.TYPE}")
    _REGISTRY[cls.TYPE] = cls
    return cls


# Below this many values the plain vectorised varint paths are used (per-call cost).
_SMALL = 4096


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise MessageError("message truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def bits(self) -> np.ndarray:
        (nbits,) = self.unpack("!Q")
        if nbits > 8 * self.remaining():  # before any arithmetic on a peer's count
            raise MessageError("message truncated")
        raw = np.frombuffer(self.take((nbits + 7) // 8), np.uint8)
        if nbits % 8 and int(raw[-1]) & ((1 << (8 - nbits % 8)) - 1):
            raise MessageError("non-zero padding bits")
        return np.unpackbits(raw, count=nbits)

    def array(self, dtype: str) -> np.ndarray:
        (count,) = self.unpack("!Q")
        dt = np.dtype(dtype).newbyteorder("<")
        if count > self.remaining() // dt.itemsize:
            raise MessageError("message truncated")
        raw = self.take(count * dt.itemsize)
        return np.frombuffer(raw, dt).astype(np.dtype(dtype).newbyteorder("="))

    def _varint_spans(self, count: int
                      ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The checks both decoders share: the values themselves when all are one byte
        (consumed), else (rest, starts, ends, lens) of the `count` varints (not consumed)."""
        if count > self.remaining():
            raise MessageError("message truncated")
        rest = np.frombuffer(self.data[self.pos :], np.uint8)
        if rest[:count].max() < 0x80:  # all single-byte
            self.pos += count
            return rest[:count].astype(np.uint64)
        ends = np.flatnonzero(rest < 0x80)[:count]
        if ends.size < count:
            raise MessageError("message truncated")
        starts = np.empty(count, np.int64)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        lens = ends - starts + 1
        if int(lens.max()) > c.VARINT_MAX_BYTES:
            raise MessageError("varint at or above 2^63")
        if ((lens > 1) & (rest[ends] == 0)).any():
            raise MessageError("over-long varint")
        return rest, starts, ends, lens

    def varints(self, count: int) -> np.ndarray:
        """`count` canonical unsigned LEB128 varints below 2^63 (at most 9 bytes, no
        redundant trailing zero byte), so every value fits an int64."""
        kernel = native.load("bb84")
        if kernel is not None:  # the same checks and errors, compiled, at every size
            if count == 0:
                return np.zeros(0, np.uint64)
            if count > self.remaining():  # before allocating for a peer's count
                raise MessageError("message truncated")
            out = np.empty(count, np.uint64)
            try:
                self.pos, _, _, _ = kernel.varints_decode(self.data, self.pos, count, out,
                                                          False)
            except ValueError as exc:
                raise MessageError(str(exc)) from None
            return out
        if count < _SMALL:  # Cascade's queries: fewer numpy calls win
            return self.varints_reference(count)
        spans = self._varint_spans(count)
        if isinstance(spans, np.ndarray):
            return spans
        rest, starts, ends, lens = spans
        # One pass per byte position over the values that reach it: a long run of
        # one-byte values with a few long ones costs about what all-short ones do.
        vals = (rest[starts] & 0x7F).astype(np.uint64)
        sel = np.flatnonzero(lens > 1)
        j = 1
        while sel.size:
            vals[sel] |= (rest[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
            sel = sel[lens[sel] > j + 1]
            j += 1
        self.pos += int(ends[-1]) + 1
        return vals

    def varints_reference(self, count: int) -> np.ndarray:
        """The plain vectorised decoder (`varints` for short arrays; for long ones the
        per-byte-position path, which tests compare with this)."""
        if count == 0:
            return np.zeros(0, np.uint64)
        spans = self._varint_spans(count)
        if isinstance(spans, np.ndarray):
            return spans
        rest, starts, ends, lens = spans
        used = int(ends[-1]) + 1
        shift = (np.arange(used) - np.repeat(starts, lens)) * 7
        vals = np.bitwise_or.reduceat(
            (rest[:used] & 0x7F).astype(np.uint64) << shift.astype(np.uint64), starts)
        self.pos += used
        return vals

    def varint(self) -> int:
        v = 0
        for i in range(c.VARINT_MAX_BYTES):
            (b,) = self.take(1)
            v |= (b & 0x7F) << (7 * i)
            if b < 0x80:
                if b == 0 and i > 0:
                    raise MessageError("over-long varint")
                return v
        raise MessageError("varint at or above 2^63")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise MessageError("trailing bytes after message body")


def _bits(b: np.ndarray) -> bytes:
    b = np.asarray(b, np.uint8)
    return struct.pack("!Q", b.size) + np.packbits(b).tobytes()


def _array(a: np.ndarray, dtype: str) -> bytes:
    a = np.asarray(a).astype(np.dtype(dtype).newbyteorder("<"))
    return struct.pack("!Q", a.size) + a.tobytes()




def _running_ids(first_plus: np.ndarray) -> np.ndarray:
    """Cumulative sum of positive steps (each in [1, 2^62]) minus one, rejecting any sum
    at or above 2^62: a uint64 cumsum that wraps shows up as a decrease."""
    cs = np.cumsum(first_plus.astype(np.uint64))
    if cs.size and ((cs[1:] <= cs[:-1]).any() or int(cs[-1]) > c.ID_LIMIT):
        raise MessageError("id out of range")
    return cs.astype(np.int64) - 1


_VARINT_LIMITS = np.left_shift(np.uint64(1), np.arange(7, 64, 7, dtype=np.uint64))


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _varints(v: np.ndarray) -> bytes:
    """Unsigned LEB128 encoding of each value (1 byte below 128, 2 below 16384, ...).

    One pass per byte position over the values that reach it, so a long array with a
    few large values costs about what an all-small one does (`_varints_reference` is
    the plain form it is tested against)."""
    kernel = native.load("bb84")
    if kernel is not None:  # the same bytes, compiled, at every size
        v = np.ascontiguousarray(np.asarray(v).astype(np.uint64, copy=False))
        return kernel.varints_encode(v, False)  # type: ignore[no-any-return]
    if len(v) < _SMALL:  # Cascade's queries: fewer numpy calls win
        return _varints_reference(v)
    v = np.asarray(v).astype(np.uint64, copy=False)
    top = int(v.max())
    if top < 0x80:
        return v.astype(np.uint8).tobytes()
    nb = np.ones(v.size, np.int64)
    for limit in _VARINT_LIMITS[: (top.bit_length() - 1) // 7]:
        nb += v >= limit
    start = np.cumsum(nb) - nb
    out = np.empty(int(start[-1] + nb[-1]), np.uint8)
    out[start] = (v & np.uint64(0x7F)).astype(np.uint8) | ((nb > 1) << 7).astype(np.uint8)
    sel = np.flatnonzero(nb > 1)
    j = 1
    while sel.size:
        byte = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        out[start[sel] + j] = byte.astype(np.uint8) | ((nb[sel] > j + 1) << 7).astype(
            np.uint8)
        sel = sel[nb[sel] > j + 1]
        j += 1
    return out.tobytes()


def _varints_reference(v: np.ndarray) -> bytes:
    """The plain vectorised LEB128 encoder `_varints` replaced (tests compare them)."""
    if len(v) == 0:
        return b""
    v = np.asarray(v).astype(np.uint64)
    if int(v.max()) < 0x80:
        return v.astype(np.uint8).tobytes()
    nb = np.searchsorted(_VARINT_LIMITS, v, side="right") + 1  # bytes per value
    last = np.cumsum(nb) - 1  # index of each value's last byte
    idx = np.repeat(np.arange(v.size), nb)
    j = np.arange(idx.size) - np.repeat(last - nb + 1, nb)  # byte index within value
    out = ((v[idx] >> (7 * j).astype(np.uint64)) & np.uint64(0x7F)).astype(np.uint8)
    out |= 0x80
    out[last] &= 0x7F
    return out.tobytes()


def encode_varints(v: np.ndarray) -> bytes:
    """Unsigned LEB128 of each (non-negative) value, for other wire formats."""
    return _varints(v)


def decode_varints(data: bytes, offset: int, count: int) -> tuple[np.ndarray, int]:
    """`count` canonical varints from data[offset:] (uint64) and the offset after them;
    MessageError if they are truncated, over-long or at or above 2^63."""
    r = _Reader(data)
    r.pos = offset
    vals = r.varints(count)
    return vals, r.pos


class Message:
    TYPE: ClassVar[int]

    def body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def parse(cls, r: _Reader) -> Message:
        raise NotImplementedError

    def encode(self) -> bytes:
        return bytes([self.TYPE]) + self.body()

    # Bits of secret-correlated information this message reveals (parities, hash tags).
    def revealed_bits(self) -> int:
        return 0


def decode(data: bytes) -> Message:
    if not data:
        raise MessageError("empty message")
    cls = _REGISTRY.get(data[0])
    if cls is None:
        raise MessageError(f"unknown message type {data[0]}")
    r = _Reader(data[1:])
    try:
        msg = cls.parse(r)
    except (struct.error, ValueError) as exc:
        if isinstance(exc, MessageError):
            raise
        raise MessageError(f"bad {cls.__name__}: {exc}") from exc
    r.end()
    return msg


# --- Cascade ---------------------------------------------------------------------------


@_register
@dataclass(frozen=True)
class CascadeHello(Message):
    """Bob -> Alice: the reconciliation run both sides will follow."""

    TYPE: ClassVar[int] = c.MSG_CASCADE_HELLO
    variant: str
    qber_estimate: float
    frame_bits: int
    frames: int
    seed: int  # public seed of the pass permutations

    def body(self) -> bytes:
        v = self.variant.encode()
        return struct.pack("!B", len(v)) + v + struct.pack(
            "!dIIQ", self.qber_estimate, self.frame_bits, self.frames, self.seed
        )

    @classmethod
    def parse(cls, r: _Reader) -> CascadeHello:
        (ln,) = r.unpack("!B")
        v = bytes(r.take(ln)).decode()
        q, fb, fr, seed = r.unpack("!dIIQ")
        return cls(v, q, fb, fr, seed)


@_register
@dataclass(frozen=True, eq=False)
class ParityQuery(Message):
    """Bob -> Alice: the parities Bob wants this round (layout agreed in CascadeHello).

    `opens`: (frame, pass) pairs, each asking for the parities of all top-level blocks of
    that pass in that frame (the start of a pass). `nodes`: strictly increasing node ids
    (binary-search sub-blocks). The reply carries the opens' parities first (in order,
    blocks in order), then one parity per node.

    Encoding: the counts, the open frames and passes, then the node ids as gaps
    (first id, then id_i - id_(i-1) - 1), every number an unsigned LEB128 varint.
    Node ids are numbered level by level within a pass, frames side by side, so a
    round's queries cluster and most gaps take one or two bytes.
    """

    TYPE: ClassVar[int] = c.MSG_PARITY_QUERY
    nodes: np.ndarray
    opens_frame: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    opens_pass: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def body(self) -> bytes:
        kernel = native.load("bb84")
        arrs = [np.ascontiguousarray(a, np.int64)
                for a in (self.opens_frame, self.opens_pass, self.nodes)]
        if kernel is not None and all(a.ndim == 1 for a in arrs):
            # One compiled pass instead of a dozen numpy calls on a small array (a round
            # sends hundreds of queries): the same checks, errors and bytes.
            return kernel.parity_query_body(*arrs, c.ID_LIMIT)  # type: ignore[no-any-return]
        return self.body_reference()

    def body_reference(self) -> bytes:
        """The numpy encoder (the compiled path is tested against it)."""
        nodes = np.asarray(self.nodes, np.int64)
        of = np.asarray(self.opens_frame, np.int64)
        op = np.asarray(self.opens_pass, np.int64)
        if of.size != op.size:
            raise ValueError("opens_frame and opens_pass differ in length")
        if (nodes.size and nodes[0] < 0) or (of.size and min(of.min(), op.min()) < 0):
            raise ValueError("negative node, frame or pass")
        if max(nodes[-1:].max(initial=0), of.max(initial=0), op.max(initial=0)) >= c.ID_LIMIT:
            raise ValueError("node, frame or pass at or above 2^62")
        gaps = np.diff(nodes, prepend=-1) - 1
        if gaps.size and gaps.min() < 0:
            raise ValueError("node ids must be strictly increasing")
        return (_varint(of.size) + _varints(of) + _varints(op) + _varint(nodes.size)
                + _varints(gaps))

    @classmethod
    def parse(cls, r: _Reader) -> ParityQuery:
        kernel = native.load("bb84")
        if kernel is None:
            return cls.parse_reference(r)
        of = r.varints(r.varint())
        op = r.varints(of.size)
        if of.size and (int(of.max()) >= c.ID_LIMIT or int(op.max()) >= c.ID_LIMIT):
            raise MessageError("frame or pass out of range")
        count = r.varint()
        if count == 0:
            return cls(np.zeros(0, np.int64), of.astype(np.int64), op.astype(np.int64))
        if count > r.remaining():  # before allocating for a peer's count
            raise MessageError("message truncated")
        # The gaps' running sums S (mod 2^64) from the decoder itself: node_i = S_i + i.
        sums = np.empty(count, np.uint64)
        try:
            r.pos, top, _, wrapped = kernel.varints_decode(r.data, r.pos, count, sums, True)
        except ValueError as exc:
            raise MessageError(str(exc)) from None
        if top >= c.ID_LIMIT:
            raise MessageError("node id out of range")
        # _running_ids refuses exactly when sum(gap + 1) > ID_LIMIT; a wrapped S is
        # above it too.
        if wrapped or int(sums[-1]) + count > c.ID_LIMIT:
            raise MessageError("id out of range")
        nodes = sums.view(np.int64)
        nodes += np.arange(count, dtype=np.int64)
        return cls(nodes, of.astype(np.int64), op.astype(np.int64))

    @classmethod
    def parse_reference(cls, r: _Reader) -> ParityQuery:
        """The numpy decoder (the compiled path is tested against it)."""
        # Every bound is checked on the unsigned values before a cast or a sum.
        of = r.varints(r.varint())
        op = r.varints(of.size)
        if of.size and (int(of.max()) >= c.ID_LIMIT or int(op.max()) >= c.ID_LIMIT):
            raise MessageError("frame or pass out of range")
        gaps = r.varints(r.varint())
        if gaps.size and int(gaps.max()) >= c.ID_LIMIT:
            raise MessageError("node id out of range")
        nodes = _running_ids(gaps + np.uint64(1))
        return cls(nodes, of.astype(np.int64), op.astype(np.int64))


@_register
@dataclass(frozen=True, eq=False)
class ParityReply(Message):
    """Alice -> Bob: the requested parities, in request order."""

    TYPE: ClassVar[int] = c.MSG_PARITY_REPLY
    bits: np.ndarray

    def body(self) -> bytes:
        return _bits(self.bits)

    @classmethod
    def parse(cls, r: _Reader) -> ParityReply:
        return cls(r.bits())

    def revealed_bits(self) -> int:
        return int(self.bits.size)


@_register
@dataclass(frozen=True)
class CascadeDone(Message):
    """Bob -> Alice: reconciliation finished; both count the same leakage."""

    TYPE: ClassVar[int] = c.MSG_CASCADE_DONE
    leaked_bits: int

    def body(self) -> bytes:
        return struct.pack("!Q", self.leaked_bits)

    @classmethod
    def parse(cls, r: _Reader) -> CascadeDone:
        return cls(*r.unpack("!Q"))


def _check_version(r: _Reader, name: str) -> None:
    (v,) = r.unpack("!B")
    if v != c.FRAME_CHECK_VERSION:
        raise MessageError(f"{name} version {v} not supported (this side speaks "
                           f"{c.FRAME_CHECK_VERSION}); run the same release on both sides")


@_register
@dataclass(frozen=True, eq=False)
class FrameCheck(Message):
    """Alice -> Bob after a Cascade run: one Toeplitz tag per frame of that run.

    `attempt` counts the runs of this group (0 = the first Cascade run, then one per
    retry); `seed` (frame_bits + tag_bits - 1 bits, fresh per attempt) is shared by all
    frames, `tags` holds frames * tag_bits bits, frame after frame. Every tag bit is
    revealed information about Alice's frame and is counted like a Cascade parity.

    Encoding: version u8 | attempt u8 | tag_bits u8 | frames u32 | seed bits | tag bits.
    """

    TYPE: ClassVar[int] = c.MSG_FRAME_CHECK
    attempt: int
    tag_bits: int
    seed: np.ndarray
    tags: np.ndarray  # (frames, tag_bits) uint8

    def body(self) -> bytes:
        tags = np.asarray(self.tags, np.uint8)
        if tags.ndim != 2 or tags.shape[1] != self.tag_bits:
            raise ValueError("tags must be (frames, tag_bits)")
        return (struct.pack("!BBBI", c.FRAME_CHECK_VERSION, self.attempt, self.tag_bits,
                            tags.shape[0]) + _bits(self.seed) + _bits(tags.ravel()))

    @classmethod
    def parse(cls, r: _Reader) -> FrameCheck:
        _check_version(r, "FrameCheck")
        attempt, t, frames = r.unpack("!BBI")
        if not 1 <= t <= c.FRAME_TAG_MAX_BITS:
            raise MessageError(f"FrameCheck tag_bits {t} outside 1..{c.FRAME_TAG_MAX_BITS}")
        if frames > c.FRAME_CHECK_MAX_FRAMES:
            raise MessageError(f"FrameCheck frames {frames} above "
                               f"{c.FRAME_CHECK_MAX_FRAMES}")
        seed = r.bits()
        tags = r.bits()
        if tags.size != frames * t:
            raise MessageError(f"FrameCheck carries {tags.size} tag bits, expected "
                               f"frames * tag_bits = {frames * t}")
        return cls(attempt, t, seed, tags.reshape(frames, t))

    def revealed_bits(self) -> int:
        return int(np.asarray(self.tags).size)


@_register
@dataclass(frozen=True, eq=False)
class FrameCheckResult(Message):
    """Bob -> Alice: which frames of the checked run had a different tag (`bad`, one bit
    per frame of that run, in order). Both sides then know what follows: with attempts
    left a new Cascade run on exactly the bad frames (its CascadeHello comes next),
    otherwise the bad frames are dropped by both.

    Encoding: version u8 | attempt u8 | bad bits.
    """

    TYPE: ClassVar[int] = c.MSG_FRAME_CHECK_RESULT
    attempt: int
    bad: np.ndarray

    def body(self) -> bytes:
        return struct.pack("!BB", c.FRAME_CHECK_VERSION, self.attempt) + _bits(self.bad)

    @classmethod
    def parse(cls, r: _Reader) -> FrameCheckResult:
        _check_version(r, "FrameCheckResult")
        (attempt,) = r.unpack("!B")
        bad = r.bits()
        if bad.size > c.FRAME_CHECK_MAX_FRAMES:
            raise MessageError(f"FrameCheckResult covers {bad.size} frames, above "
                               f"{c.FRAME_CHECK_MAX_FRAMES}")
        return cls(attempt, bad)


# --- sifting, estimation, verification, privacy amplification -------------------------


def _slots_and_bases(deltas: np.ndarray, r: _Reader) -> tuple[np.ndarray, np.ndarray]:
    """Detections' slots from their deltas (first slot, then steps of at least one),
    checked, and the bases bit string after them (one per slot)."""
    if deltas.size and (int(deltas.max()) >= c.ID_LIMIT
                        or int(deltas[1:].min(initial=1)) == 0):
        raise MessageError("slot out of range or not strictly increasing")
    # slot = running sum of (delta) = running sum of (delta + [1, 0, 0, ...]) - 1
    steps = deltas.copy()
    if steps.size:
        steps[0] += np.uint64(1)
    slots = _running_ids(steps)
    bases = r.bits()
    if bases.size != slots.size:
        raise MessageError("basis count differs from slot count")
    return slots, bases


@_register
@dataclass(frozen=True, eq=False)
class Detections(Message):
    """Bob -> Alice: slots with a registered click (delta-coded) and Bob's basis for each."""

    TYPE: ClassVar[int] = c.MSG_DETECTIONS
    slots: np.ndarray
    bases: np.ndarray

    def body(self) -> bytes:
        slots = np.asarray(self.slots, np.int64)
        deltas = np.diff(slots, prepend=0)
        if slots.size and (slots[0] < 0 or slots[-1] >= c.ID_LIMIT
                           or deltas[1:].min(initial=1) < 1):
            raise ValueError("slots must be strictly increasing in [0, 2^62)")
        return _array(deltas, "u8") + _bits(self.bases)

    @classmethod
    def parse(cls, r: _Reader) -> Detections:
        return cls(*_slots_and_bases(r.array("u8"), r))


@_register
@dataclass(frozen=True, eq=False)
class PackedDetections(Detections):
    """Detections with the slot deltas as LEB128 varints (one byte each for the usual
    gap of a few slots, instead of a u64): what Bob sends; Alice reads both forms.

    Body: count varint | slot deltas (first slot, then slot_i - slot_(i-1)) varints |
    Bob's bases as a bit string."""

    TYPE: ClassVar[int] = c.MSG_DETECTIONS_PACKED

    def body(self) -> bytes:
        slots = np.asarray(self.slots, np.int64)
        kernel = native.load("bb84")
        if kernel is not None and slots.ndim == 1:
            # Checked in one pass, then delta-coded by the encoder itself: no deltas
            # array (the bytes are `body_reference`'s, tested).
            slots = np.ascontiguousarray(slots)
            if not kernel.increasing_in(slots, c.ID_LIMIT):
                raise ValueError("slots must be strictly increasing in [0, 2^62)")
            return kernel.varints_encode(slots, True, _varint(slots.size)) + _bits(  # type: ignore[no-any-return]
                self.bases)
        return self.body_reference()

    def body_reference(self) -> bytes:
        """The numpy encoder (the compiled path is tested against it)."""
        slots = np.asarray(self.slots, np.int64)
        deltas = np.empty(slots.size, np.int64)
        if slots.size:
            deltas[0] = slots[0]
            np.subtract(slots[1:], slots[:-1], out=deltas[1:])
            if slots[0] < 0 or slots[-1] >= c.ID_LIMIT or deltas[1:].min(initial=1) < 1:
                raise ValueError("slots must be strictly increasing in [0, 2^62)")
        return _varint(slots.size) + _varints(deltas) + _bits(self.bases)

    @classmethod
    def parse(cls, r: _Reader) -> PackedDetections:
        count = r.varint()
        kernel = native.load("bb84")
        if kernel is None or count == 0:
            return cls(*_slots_and_bases(r.varints(count), r))
        # The deltas' decoding, running sum and checks in one compiled pass, with the
        # errors of `_slots_and_bases` (the reference) in its order.
        if count > r.remaining():
            raise MessageError("message truncated")
        slots = np.empty(count, np.int64)
        try:
            r.pos, top, zero_step, wrapped = kernel.varints_decode(r.data, r.pos, count,
                                                                   slots, True)
        except ValueError as exc:
            raise MessageError(str(exc)) from None
        if top >= c.ID_LIMIT or zero_step:
            raise MessageError("slot out of range or not strictly increasing")
        if wrapped or not 0 <= int(slots[-1]) < c.ID_LIMIT:
            raise MessageError("id out of range")
        bases = r.bits()
        if bases.size != slots.size:
            raise MessageError("basis count differs from slot count")
        return cls(slots, bases)


@_register
@dataclass(frozen=True, eq=False)
class SiftReply(Message):
    """Alice -> Bob: her basis and intensity class (0=mu, 1=nu, 2=vacuum) for each slot."""

    TYPE: ClassVar[int] = c.MSG_SIFT_REPLY
    bases: np.ndarray
    intensities: np.ndarray

    def body(self) -> bytes:
        i = np.asarray(self.intensities, np.uint8)
        return _bits(self.bases) + _bits(i >> 1) + _bits(i & 1)

    @classmethod
    def parse(cls, r: _Reader) -> SiftReply:
        b = r.bits()
        hi = r.bits()
        lo = r.bits()
        if not b.size == hi.size == lo.size:
            raise MessageError("inconsistent sift reply lengths")
        if (hi & lo).any():
            raise MessageError("intensity class 3 does not exist")
        return cls(b, (hi << 1) | lo)


@_register
@dataclass(frozen=True, eq=False)
class TestBits(Message):
    """Bob -> Alice: his bits on the sifted test-basis (X) slots (discarded afterwards)."""

    TYPE: ClassVar[int] = c.MSG_TEST_BITS
    bits: np.ndarray

    def body(self) -> bytes:
        return _bits(self.bits)

    @classmethod
    def parse(cls, r: _Reader) -> TestBits:
        return cls(r.bits())


@_register
@dataclass(frozen=True)
class EstimationResult(Message):
    """Alice -> Bob: test-basis error counts per intensity and her go/abort decision."""

    TYPE: ClassVar[int] = c.MSG_ESTIMATION_RESULT
    errors: tuple[int, int, int]
    abort_reason: str  # empty when going on

    def body(self) -> bytes:
        r = self.abort_reason.encode()
        return struct.pack("!QQQH", *self.errors, len(r)) + r

    @classmethod
    def parse(cls, r: _Reader) -> EstimationResult:
        a, b, c, ln = r.unpack("!QQQH")
        return cls((a, b, c), bytes(r.take(ln)).decode())


@_register
@dataclass(frozen=True, eq=False)
class VerifyHash(Message):
    """Alice -> Bob: Toeplitz seed and the tag of her reconciled key."""

    TYPE: ClassVar[int] = c.MSG_VERIFY_HASH
    seed: np.ndarray
    tag: np.ndarray

    def body(self) -> bytes:
        return _bits(self.seed) + _bits(self.tag)

    @classmethod
    def parse(cls, r: _Reader) -> VerifyHash:
        return cls(r.bits(), r.bits())

    def revealed_bits(self) -> int:
        return int(self.tag.size)


@_register
@dataclass(frozen=True)
class VerifyResult(Message):
    """Bob -> Alice: whether his tag matched."""

    TYPE: ClassVar[int] = c.MSG_VERIFY_RESULT
    ok: bool

    def body(self) -> bytes:
        return struct.pack("!B", 1 if self.ok else 0)

    @classmethod
    def parse(cls, r: _Reader) -> VerifyResult:
        (v,) = r.unpack("!B")
        if v > 1:
            raise MessageError("verify result byte is neither 0 nor 1")
        return cls(v == 1)


@_register
@dataclass(frozen=True, eq=False)
class PrivacyAmp(Message):
    """Alice -> Bob: final key length and the Toeplitz seed (0 length = abort)."""

    TYPE: ClassVar[int] = c.MSG_PRIVACY_AMP
    out_bits: int
    seed: np.ndarray
    abort_reason: str = ""

    def body(self) -> bytes:
        r = self.abort_reason.encode()
        return struct.pack("!QH", self.out_bits, len(r)) + r + _bits(self.seed)

    @classmethod
    def parse(cls, r: _Reader) -> PrivacyAmp:
        n, ln = r.unpack("!QH")
        reason = bytes(r.take(ln)).decode()
        return cls(n, r.bits(), reason)
