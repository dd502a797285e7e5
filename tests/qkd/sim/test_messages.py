from __future__ import annotations

import numpy as np
import pytest

from qkd.sim import messages as m


@pytest.mark.parametrize("msg", [
    m.CascadeHello("option8", 0.0213, 16384, 12, 2**62 + 5),
    m.CascadeDone(12345),
    m.EstimationResult((1, 2, 3), "too noisy"),
    m.VerifyResult(True),
])
def test_roundtrip_plain(msg: m.Message) -> None:
    assert m.decode(msg.encode()) == msg


def test_roundtrip_arrays() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, 1001, dtype=np.uint8)
    r = m.decode(m.ParityReply(bits).encode())
    assert isinstance(r, m.ParityReply) and np.array_equal(r.bits, bits)
    assert r.revealed_bits() == 1001
    ids = np.array([0, 5, 2**33], np.int64)
    q = m.decode(m.ParityQuery(ids).encode())
    assert isinstance(q, m.ParityQuery) and np.array_equal(q.nodes, ids)
    assert q.opens_frame.size == 0 and q.revealed_bits() == 0
    slots = np.array([3, 10, 10**12], np.int64)
    d = m.decode(m.Detections(slots, np.array([0, 1, 1], np.uint8)).encode())
    assert isinstance(d, m.Detections) and np.array_equal(d.slots, slots)
    s = m.decode(m.SiftReply(np.array([1, 0, 1], np.uint8), np.array([0, 2, 1], np.uint8)).encode())
    assert isinstance(s, m.SiftReply) and s.intensities.tolist() == [0, 2, 1]
    v = m.decode(m.VerifyHash(bits[:70], bits[:50]).encode())
    assert isinstance(v, m.VerifyHash) and v.revealed_bits() == 50
    p = m.decode(m.PrivacyAmp(7, bits[:20], "").encode())
    assert isinstance(p, m.PrivacyAmp) and p.out_bits == 7


def test_malformed() -> None:
    data = m.ParityReply(np.ones(100, np.uint8)).encode()
    with pytest.raises(m.MessageError):
        m.decode(data[:-1])
    with pytest.raises(m.MessageError):
        m.decode(data + b"\0")
    with pytest.raises(m.MessageError):
        m.decode(b"\xee")
    with pytest.raises(m.MessageError):
        m.decode(b"")


def test_parity_query_varint_encoding() -> None:
    # Node ids travel as LEB128 gaps: first id, then id_i - id_(i-1) - 1. Gaps below 128
    # take one byte, below 16384 two, ... ; values on every byte boundary round-trip.
    edges = [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**35, 2**56 - 1]
    ids = np.cumsum(np.array(edges, np.int64) + 1) - 1
    of, op = np.array([0, 127, 128, 300]), np.array([0, 13, 1, 2])
    data = m.ParityQuery(ids, of, op).encode()
    q = m.decode(data)
    assert isinstance(q, m.ParityQuery)
    assert np.array_equal(q.nodes, ids)
    assert q.opens_frame.tolist() == of.tolist() and q.opens_pass.tolist() == op.tolist()
    gap_bytes = 1 + 1 + 1 + 2 + 2 + 3 + 3 + 4 + 6 + 8  # 2^35: 36 bits, 2^56 - 1: 56 bits
    open_bytes = 1 + 1 + 2 + 2 + 4 * 1
    assert len(data) == 1 + 1 + open_bytes + 1 + gap_bytes
    # A dense run costs one byte per node (all gaps 0), not four.
    run = np.arange(1000, 1256, dtype=np.int64)
    assert len(m.ParityQuery(run).encode()) == 1 + 1 + 1 + 2 + 256


@pytest.mark.parametrize("bad", [
    np.array([5, 5]),  # not strictly increasing
    np.array([7, 3]),
    np.array([-1, 3]),
])
def test_parity_query_rejects_unsorted(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        m.ParityQuery(bad).encode()


def test_parity_query_malformed() -> None:
    data = m.ParityQuery(np.array([3, 700, 100000], np.int64), np.array([1]),
                         np.array([2])).encode()
    for cut in range(1, len(data)):
        with pytest.raises(m.MessageError):
            m.decode(data[:cut])
    with pytest.raises(m.MessageError):
        m.decode(data + b"\0")
    # an 11-byte varint (or one above 2^64) is refused
    with pytest.raises(m.MessageError):
        m.decode(bytes([m.ParityQuery.TYPE, 0, 1]) + b"\xff" * 10 + b"\x01")
    with pytest.raises(m.MessageError):
        m.decode(bytes([m.ParityQuery.TYPE, 0, 1]) + b"\xff" * 9 + b"\x02")
    # a count larger than the message cannot allocate anything
    with pytest.raises(m.MessageError):
        m.decode(bytes([m.ParityQuery.TYPE, 0]) + b"\xff\xff\xff\xff\x0f")


# --- issue 16.3: peer input the decoders must refuse -------------------------------------

@pytest.mark.parametrize("hexmsg", [
    # ParityQuery: gaps of 2^62-1 whose running sum wrapped to negative, unsorted node ids
    "060004ffffffffffffffff3fffffffffffffffff3fffffffffffffffff3f00",
    # ParityQuery opening frame -1 (a 64-bit varint cast to int64)
    "060202ffffffffffffffffff01020000",
    # VerifyResult 0x41 read as true
    "0f41",
    # over-long varints (0 written as 0x80 0x00; 1 as 0x81 0x00)
    "06808000",
    "0600028100",
    # a 10-byte varint (>= 2^63)
    "060001ffffffffffffffffff7f",
])
def test_issue16_reproducers_rejected(hexmsg: str) -> None:
    with pytest.raises(m.MessageError):
        m.decode(bytes.fromhex(hexmsg))


def test_detections_deltas_at_or_above_2_63_rejected() -> None:
    good = m.Detections(np.array([3, 7]), np.array([0, 1], np.uint8)).encode()
    assert isinstance(m.decode(good), m.Detections)  # positive control
    body = bytearray(good)
    # the second delta (little-endian u64 at offset 1 + 8 + 8) set to 2^63 + 1
    body[17:25] = (2**63 + 1).to_bytes(8, "little")
    with pytest.raises(m.MessageError):
        m.decode(bytes(body))
    body[17:25] = (0).to_bytes(8, "little")  # a repeated slot
    with pytest.raises(m.MessageError):
        m.decode(bytes(body))
    big = [2**61, 2**61, 2**61]  # each delta in range, the sum past 2^62
    raw = bytes([10]) + (3).to_bytes(8, "big") + b"".join(d.to_bytes(8, "little") for d in big)
    raw += (3).to_bytes(8, "big") + b"\x00"
    with pytest.raises(m.MessageError):
        m.decode(raw)


def test_padding_bits_must_be_zero() -> None:
    good = m.ParityReply(np.array([1, 0, 1], np.uint8)).encode()
    assert m.decode(good).bits.tolist() == [1, 0, 1]  # type: ignore[attr-defined]
    bad = good[:-1] + bytes([good[-1] | 0x01])
    with pytest.raises(m.MessageError):
        m.decode(bad)


def test_bit_count_beyond_message_rejected_before_allocation() -> None:
    with pytest.raises(m.MessageError):
        m.decode(bytes([4]) + (2**64 - 1).to_bytes(8, "big"))
    with pytest.raises(m.MessageError):
        m.decode(bytes([10]) + (2**61).to_bytes(8, "big"))


def test_sift_reply_intensity_3_rejected() -> None:
    ok = m.SiftReply(np.array([1], np.uint8), np.array([2], np.uint8)).encode()
    assert isinstance(m.decode(ok), m.SiftReply)
    hi_lo = bytes([11]) + b"".join((1).to_bytes(8, "big") + b"\x80" for _ in range(3))
    with pytest.raises(m.MessageError):
        m.decode(hi_lo)


def test_link_counts_bad_query_as_peer_fault() -> None:
    # The link's Work.run counts ValueError (MessageError) as the peer's fault and any
    # other exception as an internal error; before the fix these queries decoded and
    # CascadeAlice raised IndexError (internal error).
    from qkd.link.core import Work

    for hexmsg in ("060202ffffffffffffffffff01020000",
                   "060004ffffffffffffffff3fffffffffffffffff3fffffffffffffffff3f00"):
        w = Work("pp", None, lambda h=hexmsg: m.decode(bytes.fromhex(h))).run()  # type: ignore[arg-type]
        assert isinstance(w.error, m.MessageError)
    w = Work("pp", None, lambda: [][1]).run()  # type: ignore[arg-type]
    assert isinstance(w.error, RuntimeError)  # control: a bug stays an internal error


@pytest.mark.parametrize("top", [1, 127, 128, 300, 2**14, 2**35, 2**62 - 1])
def test_varints_are_bit_for_bit_the_reference_encoder(top: int) -> None:
    rng = np.random.default_rng(top % 1000)
    v = rng.integers(0, 100, 50_000).astype(np.uint64)  # above _SMALL: the fast paths
    assert v.size > m._SMALL
    v[rng.integers(0, v.size, 40)] = rng.integers(0, top, 40, dtype=np.uint64, endpoint=True)
    v[-1] = top
    fast = m._varints(v)
    assert fast == m._varints_reference(v)
    back, end = m.decode_varints(fast, 0, v.size)
    assert end == len(fast) and np.array_equal(back, v)
    ref = m._Reader(fast + b"\x05")
    assert np.array_equal(ref.varints_reference(v.size), back) and ref.remaining() == 1


def test_packed_detections_roundtrip_size_and_rejections() -> None:
    rng = np.random.default_rng(4)
    slots = np.cumsum(rng.geometric(0.1, 200_000)).astype(np.int64)
    slots[-1] = 2**40  # one long gap
    bases = rng.integers(0, 2, slots.size, dtype=np.uint8)
    packed = m.PackedDetections(slots, bases).encode()
    old = m.Detections(slots, bases).encode()
    assert len(packed) < len(old) / 5
    for data in (packed, old):  # a peer may send either form
        d = m.decode(data)
        assert isinstance(d, m.Detections)
        assert np.array_equal(d.slots, slots) and np.array_equal(d.bases, bases)
    small = m.PackedDetections(np.array([3, 7]), np.array([0, 1], np.uint8)).encode()
    assert small == bytes([m.c.MSG_DETECTIONS_PACKED, 2, 3, 4]) + m._bits(np.array([0, 1]))
    for bad in (small[:3] + b"\x00" + small[4:],  # a repeated slot
                small[:-1],  # truncated
                small[:2] + b"\xff" * 9 + b"\x7f" + small[3:]):  # a delta >= 2^63
        with pytest.raises(m.MessageError):
            m.decode(bad)
    with pytest.raises(ValueError):
        m.PackedDetections(np.array([5, 5]), np.zeros(2, np.uint8)).encode()


def test_long_varint_path_rejects_what_the_short_one_does() -> None:
    good = m._varints(np.full(m._SMALL + 10, 300, np.uint64))
    assert m.decode_varints(good, 0, m._SMALL + 10)[0].tolist() == [300] * (m._SMALL + 10)
    for bad in (good[:-1],  # truncated
                good[:-2] + b"\xac\x80\x00",  # over-long last value
                good[:-2] + b"\xff" * 9 + b"\x7f"):  # at or above 2^63
        with pytest.raises(m.MessageError):
            m.decode_varints(bad, 0, m._SMALL + 10)
