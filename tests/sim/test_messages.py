from __future__ import annotations

import numpy as np
import pytest

from qkd.sim import messages as m


@pytest.mark.parametrize("msg", [
    m.CascadeHello("option8", 0.0213, 16384, 12, 2**62 + 5),
    m.PassRequest(13),
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
