"""The compiled BB84 kernels (`_qkdgw_bb84`) against the numpy paths they replace, bit
for bit: the same inputs (the same seeded physics generator and the same secret
keystream) give the same outputs, over many seeds and sizes with the edge sizes, and a
hostile frame or message gets the same error class (and message) from both decoders.

Each comparison runs the caller twice, once with QKDGW_NATIVE=0 (the numpy reference)
and once with the kernel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from qkd import native
from qkd.link import quantum as q
from qkd.link.csprng import SecretRng
from qkd.sim import messages as m
from qkd.sim.params import LinkParams

K = native.load("bb84")
pytestmark = pytest.mark.skipif(K is None, reason="_qkdgw_bb84 not built (no C compiler)")

PARAMS = LinkParams(distance_km=25.0, detector_efficiency=0.8, misalignment=0.03,
                    dark_count_prob=1e-6, pulses=100_000, mu=0.9, nu=0.2,
                    p_mu=0.6, p_nu=0.25, basis_bias=0.3)
SIZES = [0, 1, 2, 63, 64, 65, 1000, 4095, 4096, 4097, 70_001]


class _SeededSecret(SecretRng):
    """A SecretRng whose keystream is a fixed numpy stream, so two runs draw alike."""

    def __init__(self, seed: int) -> None:
        self._g = np.random.default_rng(seed)

    def _stream(self, length: int) -> np.ndarray:
        return self._g.integers(0, 256, length, dtype=np.uint8)


def _both(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], Any]) -> tuple[Any, Any]:
    """(numpy reference result, kernel result) of fn()."""
    monkeypatch.setenv("QKDGW_NATIVE", "0")
    assert native.load("bb84") is None
    ref = fn()
    monkeypatch.setenv("QKDGW_NATIVE", "1")
    assert native.load("bb84") is not None
    return ref, fn()


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except Exception as exc:  # the class and message are what is compared
        return ("error", type(exc), str(exc))


def _same_record(a: Any, b: Any) -> None:
    for name in ("slots", "intensity", "basis", "bit"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


@pytest.mark.parametrize("pulses", [0, 1, 63, 64, 65, 4097, 70_001])
@pytest.mark.parametrize("seed", range(4))
def test_emit_is_bit_for_bit_the_numpy_path(pulses: int, seed: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(q, "_CHUNK", 1 << 14)  # several chunks and a partial last one
    # A strong source in half the cases: multi-photon pulses up to the 31 cap.
    params = PARAMS.with_(pulses=pulses, mu=0.9 if seed % 2 else 6.0, nu=0.2)

    def run() -> Any:
        return q.emit(params, 3, np.random.default_rng(seed), _SeededSecret(100 + seed))
    (ra, fa), (rb, fb) = _both(monkeypatch, run)
    _same_record(ra, rb)
    assert np.array_equal(ra.sent_per_intensity, rb.sent_per_intensity)
    assert np.array_equal(fa.slots, fb.slots) and np.array_equal(fa.state, fb.state)
    assert fa.encode() == fb.encode()
    if pulses >= 4097:
        assert fb.slots.size > 100  # the comparison covered pulses


def test_emit_ties_and_growth_are_the_numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ties of the 16-bit draw are one slot in 2^16 (about 15 here); no margin on the
    # first estimate makes the kernel's output arrays grow chunk by chunk.
    monkeypatch.setattr(q, "_CHUNK", 1 << 12)
    monkeypatch.setattr(q, "_CAP_MARGIN", 0.0)
    params = PARAMS.with_(pulses=1_000_000, mu=2.0, nu=0.5)

    def run() -> Any:
        return q.emit(params, 1, np.random.default_rng(5), _SeededSecret(6))
    (ra, fa), (rb, fb) = _both(monkeypatch, run)
    _same_record(ra, rb)
    assert np.array_equal(fa.state, fb.state) and fb.slots.size > 500_000


@pytest.mark.parametrize(("distance", "dark", "eve"), [
    (25.0, 1e-7, None), (25.0, 1e-7, "pns"), (25.0, 0.05, None), (25.0, 0.05, "pns"),
    (0.0, 0.05, "intercept-resend"), (3000.0, 0.02, None), (25.0, 0.3, "noise")])
@pytest.mark.parametrize("seed", range(3))
def test_measure_is_bit_for_bit_the_numpy_path(distance: float, dark: float,
                                               eve: str | None, seed: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(q, "_CHUNK", 1 << 14)
    params = PARAMS.with_(distance_km=distance, dark_count_prob=dark, pulses=200_000,
                          mu=0.9 if seed else 4.0)
    monkeypatch.setenv("QKDGW_NATIVE", "0")
    _, frame = q.emit(params, 1, np.random.default_rng(seed))
    if eve:
        frame = q.attack(frame, eve, 0.5, np.random.default_rng(9))

    def run() -> Any:
        return q.measure(frame, params, np.random.default_rng(10 + seed),
                         _SeededSecret(20 + seed))
    a, b = _both(monkeypatch, run)
    for x, y in ((a.slots, b.slots), (a.basis, b.basis), (a.bit, b.bit)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert b.slots.size > 100


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 5000])
def test_measure_small_frames(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    params = PARAMS.with_(dark_count_prob=0.2, pulses=max(size * 3, 1))
    monkeypatch.setenv("QKDGW_NATIVE", "0")
    _, frame = q.emit(params, 1, np.random.default_rng(size))
    frame = q.PulseFrame(1, params.pulses, frame.slots[:size], frame.state[:size])

    def run() -> Any:
        return q.measure(frame, params, np.random.default_rng(1), _SeededSecret(2))
    a, b = _both(monkeypatch, run)
    for x, y in ((a.slots, b.slots), (a.basis, b.basis), (a.bit, b.bit)):
        assert np.array_equal(x, y)


def test_sparse_lookup_and_vacuum_draws_are_the_numpy_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    params = PARAMS.with_(pulses=200_003)
    rng = np.random.default_rng(4)
    asks = [np.sort(rng.choice(params.pulses, k, replace=False)) for k in (0, 1, 64, 5000)]
    asks.append(np.arange(params.pulses))  # every slot: all vacuum slots drawn at once

    def run() -> Any:
        rec, _ = q.emit(params, 1, np.random.default_rng(7), _SeededSecret(8))
        out = [rec.lookup(a).copy() for a in asks]
        out.append(_outcome(lambda: rec.lookup(np.array([params.pulses]))))
        out.append(_outcome(lambda: rec.lookup(np.array([-1]))))
        return rec, out
    (ra, oa), (rb, ob) = _both(monkeypatch, run)
    _same_record(ra, rb)
    for x, y in zip(oa[:-2], ob[:-2], strict=True):
        assert np.array_equal(x, y)
    assert oa[-2] == ob[-2] and oa[-2][0] == "error"  # out of range: same ValueError
    assert oa[-1] == ob[-1] and oa[-1][0] == "error"


@pytest.mark.parametrize("seed", range(6))
def test_insert_is_np_insert(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n in (0, 1, 63, 64, 65, 3000):
        for dtype in (np.int64, np.uint8):
            arr = rng.integers(0, 100, n).astype(dtype)
            k = int(rng.integers(0, 70))
            pos = np.sort(rng.integers(0, n + 1, k))  # repeats and both ends included
            vals = rng.integers(0, 100, k).astype(dtype)
            want = np.insert(arr, pos, vals)
            assert np.array_equal(q._insert(arr, pos, vals), want)
            buf = np.concatenate([arr, rng.integers(0, 100, k + 3).astype(dtype)])
            assert K is not None
            K.insert_inplace(buf, n, pos.astype(np.int64), vals, arr.dtype.itemsize)
            assert np.array_equal(buf[: n + k], want)
    with pytest.raises(ValueError, match="non-decreasing"):
        q._insert(np.arange(5), np.array([3, 1]), np.array([0, 0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        q._insert(np.arange(5), np.array([6]), np.array([0]))
    assert K is not None
    with pytest.raises(ValueError, match="room"):  # no room for the insertion
        K.insert_inplace(np.zeros(5, np.uint8), 5, np.array([1], np.int64),
                         np.zeros(1, np.uint8), 1)
    with pytest.raises(ValueError, match="non-decreasing"):
        K.insert_inplace(np.zeros(9, np.uint8), 5, np.array([3, 1], np.int64),
                         np.zeros(2, np.uint8), 1)
    with pytest.raises(ValueError, match="room"):  # n + k would wrap past the check
        K.insert_inplace(np.zeros(9, np.uint8), 2**63 - 1, np.array([0], np.int64),
                         np.zeros(1, np.uint8), 1)


def _frame_cases() -> list[bytes]:
    """Valid frames (one-byte and long deltas) and hostile variants of them."""
    out: list[bytes] = []
    rng = np.random.default_rng(3)
    hdr = q._HDR.size
    for count in SIZES[:9]:
        gaps = rng.integers(1, 6, count)
        if count > 3:
            gaps[count // 2] = 300  # one two-byte varint
        slots = np.cumsum(gaps) - 1
        frame = q.PulseFrame(7, int(slots[-1]) + 10 if count else 10, slots.astype(np.int64),
                             rng.integers(1, 256, count, dtype=np.uint8))
        data = frame.encode()
        out.append(data)
        out += [data[:-1], data + b"\x00", data[: hdr + count] + b"\x80" * (len(data) - hdr
                                                                            - count)]
        if count > 1:
            body = bytearray(data)
            body[hdr + count + 1] = 0  # a repeated slot
            out.append(bytes(body))
            body = bytearray(data)
            body[hdr + count] = 0x80  # a one-byte delta turned into a continuation
            out.append(bytes(body))
    slots = np.array([0, 1, 200, 20_000, 3_000_000, 2**31 - 2], np.int64)
    data = q.PulseFrame(4, 2**31 - 1, slots, np.arange(1, 7, dtype=np.uint8)).encode()
    out += [data, data[:-1], data + b"\x00", data[: hdr + 6] + b"\x80" * 6,
            data[: hdr + 6] + b"\x00\x00" + data[hdr + 8 :]]
    past = q.PulseFrame(4, 100, np.array([0, 100]), np.ones(2, np.uint8)).encode()
    out.append(past)
    head = q._HDR.pack(q.MAGIC, q.VERSION, 1, 1000, 3) + b"\x01\x01\x01"
    out += [head + b"\x01\x02\x03", head + b"\x01\x02", head + b"\x81\x00\x01\x01",
            head + b"\x01" + b"\xff" * 9 + b"\x01\x01",  # 10-byte varint: at or above 2^63
            head + b"\x01" + b"\xff" * 8 + b"\x7f\x01",  # 9-byte: above MAX_PULSES
            head + b"\xff" * 12,  # truncated: no terminator
            q._HDR.pack(q.MAGIC, q.VERSION, 1, 0, 0), q._HDR.pack(q.MAGIC, q.VERSION, 1, 5, 0)
            + b"\x00"]
    return out


def test_frame_decode_matches_the_numpy_path_on_valid_and_hostile_frames(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cases = _frame_cases()
    rng = np.random.default_rng(11)
    for data in list(cases[:20]):  # random byte flips of the valid ones
        for _ in range(20):
            b = bytearray(data)
            if len(b) > q._HDR.size:
                b[int(rng.integers(q._HDR.size, len(b)))] = int(rng.integers(0, 256))
            cases.append(bytes(b))

    def run() -> list[Any]:
        res = []
        for data in cases:
            got = _outcome(lambda d=data: q.PulseFrame.decode(d))  # type: ignore[misc]
            if got[0] == "ok":
                got = ("ok", got[1].slots.tolist(), got[1].state.tolist())
            res.append(got)
        return res
    ref, fast = _both(monkeypatch, run)
    assert ref == fast
    kinds = {r[0] if r[0] == "ok" else r[2] for r in ref}
    assert "ok" in kinds and len(kinds) >= 4  # valid frames and several kinds of error
    assert all(r[1] is q.FrameError for r in ref if r[0] == "error")


@pytest.mark.parametrize("count", SIZES)
def test_frame_encode_matches_the_numpy_path(count: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(count)
    top = 1 << int(rng.integers(2, 31))
    slots = np.unique(rng.integers(0, top, count)).astype(np.int64)
    frame = q.PulseFrame(2, top, slots, rng.integers(0, 256, slots.size, dtype=np.uint8))
    bad = q.PulseFrame(2, top, slots[::-1].copy(), frame.state)  # decreasing: invalid
    a, b = _both(monkeypatch, lambda: (frame.encode(), bad.encode()))
    assert a == b


@pytest.mark.parametrize("top", [1, 0x7F, 0x80, 1 << 14, 1 << 35, (1 << 63) - 1, 1 << 63,
                                 (1 << 64) - 1])
def test_varint_codec_matches_the_numpy_path(top: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(top % 1000)
    for n in (0, 1, 63, 64, 65, 1000, 4095, 4096, 4097, 20_000):
        v = (rng.integers(0, 1 << 62, n, dtype=np.uint64) % np.uint64(top)).astype(np.uint64)
        if n:
            v[int(rng.integers(0, n))] = np.uint64(top)
        enc_a, enc_b = _both(monkeypatch, lambda v=v: m.encode_varints(v))  # type: ignore[misc]
        assert enc_a == enc_b
        dec = _both(monkeypatch,
                    lambda e=enc_a, n=n: _outcome(  # type: ignore[misc]
                        lambda: m.decode_varints(b"xy" + e, 2, n)))
        if dec[0][0] == "ok":
            assert np.array_equal(dec[0][1][0], dec[1][1][0])
            assert dec[0][1][1] == dec[1][1][1]
            assert np.array_equal(dec[1][1][0], v)
        else:  # values at or above 2^63 are not decodable: the same error both ways
            assert dec[0] == dec[1] and top >= 1 << 63 and n


@pytest.mark.parametrize("n", [1, 64, 65, 1000, 5000])
def test_varint_decoder_rejects_what_the_numpy_path_rejects(
        n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    good = m.encode_varints(np.arange(n, dtype=np.uint64) * 3)
    cases = [(good, n), (good, n + 1), (good[:-1], n), (good, 10**12), (good + b"\x00", n)]
    over = bytearray(good)
    over[0] |= 0x80
    cases.append((bytes(over[:1]) + b"\x00" + bytes(over[1:]), n))  # over-long
    cases.append((b"\xff" * 9 + b"\x01" + good, n))  # 10 bytes: at or above 2^63
    cases.append((b"\xff" * 9 + b"\x01" + good[: -2 - n // 4], n))  # ... and truncated
    cases.append((good[: n // 2] + b"\x80\x00" + good[n // 2 :], n))  # over-long inside
    cases.append((b"\x80" * (2 * n), n))  # no terminator at all
    rng = np.random.default_rng(2)
    for _ in range(40):
        b = bytearray(good)
        for _ in range(3):
            b[int(rng.integers(0, len(b)))] = int(rng.choice([0, 0x80, 0xFF, 0x7F]))
        cases.append((bytes(b), n))

    def run() -> list[Any]:
        res = []
        for data, count in cases:
            got = _outcome(lambda d=data, c=count: m.decode_varints(d, 0, c))  # type: ignore[misc]
            res.append(got if got[0] == "error" else ("ok", got[1][0].tolist(), got[1][1]))
        return res
    ref, fast = _both(monkeypatch, run)
    assert ref == fast
    msgs = {r[2] for r in ref if r[0] == "error"}
    assert {"message truncated", "over-long varint", "varint at or above 2^63"} <= msgs, msgs
    assert all(r[1] is m.MessageError for r in ref if r[0] == "error")
    # A packed detections message through the full decoder, both ways.
    msg = m.PackedDetections(np.arange(0, 3 * n, 3), np.zeros(n, np.uint8)).encode()
    typ = msg[:1]
    bases = m._bits(np.ones(5, np.uint8))

    def packed(deltas: list[int], tail: bytes = bases) -> bytes:
        return typ + m._varint(len(deltas)) + b"".join(map(m._varint, deltas)) + tail
    top = (1 << 62) - 1
    hostile = [msg, msg[:-700], msg[:5] + b"\xff" * 20 + msg[25:], msg[:-1], msg + b"\x00",
               packed([7, 1, 2, 3, 4]), packed([7, 0, 2, 3, 4]),  # a repeated slot
               packed([1 << 62, 1, 1, 1, 1]), packed([top, 1, 1, 1, 1]),  # out of range
               packed([top] * 5), packed([top] * 4 + [3]),  # sums past 2^62 and 2^64
               packed([1, 2, 3]), packed([1, 2, 3, 4, 5], b""),  # basis count, no bases
               typ + m._varint(10**9) + b"\x01" * 20]
    for bad in hostile:
        a, b = _both(monkeypatch, lambda d=bad: _outcome(lambda: m.decode(d)))  # type: ignore[misc]
        assert a[0] == b[0]
        if a[0] == "ok":
            assert np.array_equal(a[1].slots, b[1].slots)
            assert np.array_equal(a[1].bases, b[1].bases)
        else:
            assert a[1:] == b[1:] and a[1] is m.MessageError


@pytest.mark.parametrize("seed", range(5))
def test_carry_scan_resolves_ties_in_slot_order(seed: int) -> None:
    # Many ties (a small alphabet of 16-bit values), each settled by its own tie word.
    rng = np.random.default_rng(seed)
    c, hi16, lo48 = 5000, 3, int(rng.integers(0, 1 << 48))
    u16 = rng.integers(0, 6, c).astype(np.uint16)
    n_ties = int(np.count_nonzero(u16 == hi16))
    ties = rng.integers(0, 1 << 64, n_ties, dtype=np.uint64)
    out = np.empty(c, np.int64)
    assert K is not None
    assert K.count_eq(u16, c, hi16) == n_ties
    bitmap = q._bitmap(1000 + c)
    got = out[: K.carry_scan(u16, c, hi16, ties, lo48, 1000, out, bitmap)]
    flags = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
    assert np.flatnonzero(flags).tolist() == got.tolist()
    want, k = [], 0
    for i, u in enumerate(u16.tolist()):
        if u == hi16:
            if int(ties[k]) >> 16 < lo48:
                want.append(1000 + i)
            k += 1
        elif u < hi16:
            want.append(1000 + i)
    assert got.tolist() == want and n_ties > 500


def test_kernels_reject_bad_buffers() -> None:
    assert K is not None
    z8 = np.zeros(8, np.uint8)
    with pytest.raises(ValueError):
        K.carry_scan(np.zeros(4, np.uint16), 8, 1, np.zeros(0, np.uint64), 0, 0,
                     np.zeros(8, np.int64))  # u16 shorter than the count
    with pytest.raises(ValueError, match="bitmap"):
        K.carry_scan(np.zeros(4, np.uint16), 4, 1, np.zeros(0, np.uint64), 0, 62,
                     np.zeros(4, np.int64), np.zeros(1, np.uint64))  # slots 62..65
    with pytest.raises(ValueError, match="tie words"):
        K.carry_scan(np.full(4, 7, np.uint16), 4, 7, np.zeros(0, np.uint64), 0, 0,
                     np.zeros(4, np.int64))
    with pytest.raises(ValueError):
        K.emit_fill(8, np.zeros(8, np.uint64), np.zeros(8, np.uint64),
                    np.zeros(30, np.uint64), np.zeros(32, np.uint32), 0, z8, z8, z8,
                    np.zeros(7, np.uint8))
    z64 = np.zeros(8, np.int64)
    ok_args = (8, np.ones(8, np.uint8), np.zeros(8, np.uint32), np.zeros(8, np.uint64),
               np.full(16, 2**64 - 1, np.uint64), np.full(16, 2**64 - 1, np.uint64), 0,
               np.zeros(0, np.int64), np.array([7], np.int64), z64, z64.copy(), z8.copy(),
               z8.copy(), z64.copy())
    # Control: every photon clicks its right detector, pulse 7 also has a wrong-detector
    # dark click (a double click).
    assert K.measure_chunk(*ok_args) == (8, 1)
    for at, bad in ((3, np.zeros(7, np.uint64)), (4, np.zeros(15, np.uint64)),
                    (8, np.array([8], np.int64)), (8, np.array([2, 2], np.int64)),
                    (10, np.zeros(7, np.int64))):
        args = list(ok_args)
        args[at] = bad
        with pytest.raises(ValueError):
            K.measure_chunk(*args)
    with pytest.raises(ValueError):
        K.varints_decode(b"\x01\x02", 3, 1, np.zeros(1, np.uint64), False)
    with pytest.raises(ValueError):
        K.varints_decode(b"\x01\x02", 0, 2, np.zeros(1, np.uint64), False)
    with pytest.raises(ValueError):
        K.varints_encode(np.zeros(3, np.uint8), False)
    with pytest.raises(ValueError, match="bitmap"):
        K.rank_lookup(np.zeros(1, np.uint64), np.zeros(1, np.int64), 65,
                      np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, bool))
    with pytest.raises(ValueError, match="outside"):
        K.set_bits(np.zeros(1, np.uint64), np.array([64], np.int64))
    # Counts so large that count * itemsize wraps: refused, not a read past the buffer.
    huge = 2**62 + 1
    with pytest.raises(ValueError):
        K.count_eq(b"ab", huge, 0)
    with pytest.raises(ValueError):
        K.carry_scan(np.zeros(4, np.uint16), huge, 1, np.zeros(0, np.uint64), 0, 0,
                     np.zeros(8, np.int64))
    with pytest.raises(ValueError):
        K.varints_decode(b"\x01\x02", 0, 2**61 + 1, np.zeros(1, np.uint64), False)
    with pytest.raises(ValueError, match="bitmap"):
        K.rank_lookup(np.zeros(1, np.uint64), np.zeros(1, np.int64), 2**63 - 1,
                      np.array([2**40], np.int64), np.zeros(1, np.int64), np.zeros(1, bool))
    # Positive control: the same calls with fitting buffers succeed.
    assert K.count_eq(b"ab", 1, int.from_bytes(b"ab", "little")) == 1
    assert K.varints_decode(b"\x01\x02", 0, 2, np.zeros(2, np.uint64), False)[0] == 2
    K.set_bits(np.zeros(1, np.uint64), np.array([63], np.int64))


@pytest.mark.parametrize("count", [0, 1, 2, 63, 64, 65, 4097])
def test_one_byte_fast_paths_match_the_numpy_path(count: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels' one-byte shortcuts (every delta below 128) against the numpy path
    at their edges: a delta of 127 or 128 at either end, a zero delta first or later,
    decreasing slots (encoded, never decoded), trailing bytes after the varints."""
    rng = np.random.default_rng(count + 5)
    frames: list[q.PulseFrame] = []
    for last in (127, 128, 0):
        gaps = rng.integers(1, 128, count)
        if count:
            gaps[-1] = last or gaps[-1]
        if count > 1:
            gaps[0] = 128 if last == 0 else 0
        slots = np.cumsum(gaps).astype(np.int64)
        state = rng.integers(0, 256, count, dtype=np.uint8)
        frames.append(q.PulseFrame(3, int(slots[-1]) + 1 if count else 1, slots, state))
        frames.append(q.PulseFrame(3, 10**6, slots[::-1].copy(), state))
    enc_a, enc_b = _both(monkeypatch, lambda: [f.encode() for f in frames])
    assert enc_a == enc_b
    cases = enc_a + [e + b"\x05" for e in enc_a]
    if count:
        cases += [e[:-1] + b"\x80" for e in enc_a]  # last delta turned into a continuation

    def run() -> list[Any]:
        res = []
        for data in cases:
            got = _outcome(lambda d=data: q.PulseFrame.decode(d))  # type: ignore[misc]
            res.append(("ok", got[1].slots.tolist()) if got[0] == "ok" else got)
        return res
    ref, fast = _both(monkeypatch, run)
    assert ref == fast
    assert any(r[0] == "ok" for r in ref) and (count < 2 or any(r[0] == "error" for r in ref))
    raw = rng.integers(0, 128, count, dtype=np.uint8).tobytes()
    for data in (raw, raw + b"\x81\x01", b"\x00" + raw):
        a, b = _both(monkeypatch, lambda d=data: _outcome(  # type: ignore[misc]
            lambda: m.decode_varints(d, 0, count)))
        assert a[0] == b[0] == "ok"
        assert np.array_equal(a[1][0], b[1][0]) and a[1][1] == b[1][1]
        assert np.array_equal(a[1][0], np.frombuffer(data, np.uint8, count))


def _emit_fill_reference(r: np.ndarray, w: np.ndarray, tails: np.ndarray,
                         t_mu: np.ndarray, t_basis: int) -> tuple[list[int], ...]:
    """emit_fill's documented law, one pulse at a time: the leading run of tails."""
    st, cl, ba, bi = [], [], [], []
    for x, y in zip(r.tolist(), w.tolist(), strict=True):
        ph = 1
        while ph - 1 < tails.size and x < int(tails[ph - 1]):
            ph += 1
        low, high = y & 0xFFFFFFFF, y >> 32
        c, b, v = int(low >= int(t_mu[ph])), int((high & 0x7FFFFFFF) >= t_basis), high >> 31
        st.append(ph | b << 5 | v << 6)
        cl.append(c)
        ba.append(b)
        bi.append(v)
    return st, cl, ba, bi


@pytest.mark.parametrize("nt", [0, 1, 2, 3, 4, 30])
@pytest.mark.parametrize("monotone", [True, False])
def test_emit_fill_counts_photons_as_the_leading_run(nt: int, monotone: bool) -> None:
    """The branch-free count is used only for non-increasing tails; other tails (never
    made by _mixture_tables) still get the leading run."""
    rng = np.random.default_rng(nt * 2 + monotone)
    tails = np.sort(rng.integers(0, 1 << 63, nt, dtype=np.uint64) * np.uint64(2))[::-1]
    if not monotone and nt >= 2:
        tails[nt // 2], tails[-1] = tails[-1], tails[nt // 2]  # a later tail above
    tails = np.ascontiguousarray(tails)
    m = 3000
    r = rng.integers(0, 1 << 63, m, dtype=np.uint64) * np.uint64(2)
    if nt:  # words at, just below and just above every tail
        picks = rng.integers(0, nt, m // 2)
        r[: m // 2] = tails[picks] + rng.integers(-1, 2, m // 2).astype(np.uint64)
    w = rng.integers(0, 1 << 63, m, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    t_mu = rng.integers(0, 1 << 32, 32, dtype=np.uint64).astype(np.uint32)
    outs = [np.zeros(m, np.uint8) for _ in range(4)]
    ones = K.emit_fill(m, r, w, tails, t_mu, 1 << 30, *outs)
    ref = _emit_fill_reference(r, w, tails, t_mu, 1 << 30)
    assert [o.tolist() for o in outs] == list(ref)
    assert ones == sum(ref[1])
    if nt >= 3:  # the words exercise several photon numbers (a positive control)
        assert len({s & 0x1F for s in ref[0]}) >= 3


@pytest.mark.parametrize("count", [0, 1, 63, 64, 65, 4097, 70_001])
def test_seal_frame_is_seal_of_encode(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """seal_frame writes what seal(encode()) writes, byte for byte, with and without
    the kernel, for one-byte deltas, a long delta (its fallback), a version-1 frame and
    a frame whose states do not match its slots; unseal opens it."""
    rng = np.random.default_rng(count + 17)
    secret, nonce = rng.bytes(32), rng.bytes(16)
    slots = np.cumsum(rng.integers(1, 100, count)).astype(np.int64)
    state = rng.integers(0, 256, count, dtype=np.uint8)
    frames = [q.PulseFrame(9, int(slots[-1]) + 1 if count else 1, slots, state),
              q.PulseFrame(9, 1 << 31, slots, state, q.VERSION_U32),
              q.PulseFrame(9, 1 << 31, slots, np.zeros(count + 1, np.uint8))]
    if count:
        far = slots.copy()
        far[-1] += 1 << 20  # one delta of three bytes
        frames.append(q.PulseFrame(9, 1 << 31, far, state))

    def run() -> list[tuple[bytes, bytes]]:
        return [(q.seal_frame(secret, nonce, 5, f, 3), q.seal(secret, nonce, 5, f.encode(), 3))
                for f in frames]
    ref, fast = _both(monkeypatch, run)
    assert ref == fast
    for (a, b), f in zip(fast, frames, strict=True):
        assert a == b and isinstance(a, bytes)
        assert q.unseal(secret, a, 5, nonce) == f.encode()
    assert fast[0][0] != q.seal(secret, nonce, 5, frames[0].encode(), 4)  # the counter counts


def test_varints_encode_into_checks_its_buffer() -> None:
    slots = np.arange(1, 11, dtype=np.int64)
    out = np.zeros(23, np.uint8)
    assert K.varints_encode(slots, True, b"abc", bytes(10), out) == 23  # positive control
    assert bytes(out) == b"abc" + bytes(10) + bytes([1] * 10)
    with pytest.raises(ValueError, match="varints_encode out"):
        K.varints_encode(slots, True, b"abc", bytes(10), np.zeros(22, np.uint8))
    with pytest.raises(ValueError, match="out needs deltas"):
        K.varints_encode(slots, False, b"", b"", out)
    assert K.varints_encode(slots * 200, True, b"abc", bytes(10), out) == -1
