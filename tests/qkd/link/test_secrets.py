"""A round's secrets come from the OS, not from the numpy generator the link core is
given (issue 9.2). Two core pairs with the same numpy seeds must make different keys,
nonces and post-processing seeds; the positive control (test hook
`core._TEST_SEEDED_SECRETS`, the old seeding) makes them equal bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from qkd.link import core as lc
from qkd.link.csprng import SecretRng
from qkd.sim import messages as m
from tests.support.link_pair import committed, connect, pair, pump


def _one_round() -> tuple[list[tuple[str, bytes]], list[bytes], bytes]:
    """(Alice's committed blocks, every a2b post-processing frame, ROUND_START body)."""
    a, b = pair()
    connect(a, b)
    a.start_round(0.0)
    a2b: list[bytes] = []

    def tap(name: str, _i: int, frame: bytes) -> bytes:
        if name == "a2b":
            a2b.append(frame)
        return frame

    ev = pump(a, b, tap)
    got = committed(ev, "alice")
    assert got and got[0].blocks == committed(ev, "bob")[0].blocks
    pp = [f[1:] for f in a2b if f[0] == lc.PP]
    start = next(f for f in a2b if f[0] == lc.ROUND_START)
    return got[0].blocks, pp, start[lc._CTRL.size:]


def _seeds(pp: list[bytes]) -> list[bytes]:
    out = []
    for raw in pp:
        msg = m.decode(raw)
        if isinstance(msg, m.VerifyHash | m.PrivacyAmp):
            out.append(np.asarray(msg.seed).tobytes())
    return out


def test_same_numpy_seeds_give_different_keys_nonces_and_seeds() -> None:
    blocks1, pp1, start1 = _one_round()
    blocks2, pp2, start2 = _one_round()
    assert len(_seeds(pp1)) == 2  # the verification and the privacy-amplification seed
    assert {k for k, _ in blocks1}.isdisjoint(k for k, _ in blocks2)  # IDs: the nonce
    assert {v for _, v in blocks1}.isdisjoint(v for _, v in blocks2)
    assert start1 != start2
    s1, s2 = _seeds(pp1), _seeds(pp2)
    assert all(x != y for x, y in zip(s1, s2, strict=True))
    # Alice's SiftReply (her bases and intensity classes) differs too.
    assert pp1[0] != pp2[0]


def test_control_old_seeding_reproduces_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lc, "_TEST_SEEDED_SECRETS", True)
    blocks1, pp1, start1 = _one_round()
    blocks2, pp2, start2 = _one_round()
    assert blocks1 == blocks2 and start1 == start2
    assert _seeds(pp1) == _seeds(pp2) and pp1 == pp2


def test_secret_rng_draws() -> None:
    r1, r2 = SecretRng(), SecretRng()
    assert r1.bytes(32) != r2.bytes(32)
    assert "os-seeded" in repr(r1)
    bits = r1.integers(0, 2, 80_000, dtype=np.uint8)
    assert bits.dtype == np.uint8 and set(np.unique(bits)) == {0, 1}
    assert abs(bits.mean() - 0.5) < 0.01
    u = r1.random(80_000)
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01
    six = r1.integers(0, 6, 60_000)
    assert six.min() == 0 and six.max() == 5
    assert np.all(np.abs(np.bincount(six) - 10_000) < 600)
    big = r1.integers(0, 2**63)
    assert isinstance(big, int) and 0 <= big < 2**63
    with pytest.raises(ValueError):
        r1.integers(5, 5)
