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
