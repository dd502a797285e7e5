"""The compiled sifting pass (bb84.sift_select) and the Detections encoder's check
(bb84.increasing_in) against the numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from qkd import native
from qkd.sim import constants as c
from qkd.sim import messages as m
from qkd.sim.protocol import _Party

kernel = native.load("bb84")
pytestmark = pytest.mark.skipif(kernel is None, reason="compiled kernels not built")


def _party() -> _Party:
    from qkd.sim.protocol import SessionResult

    p = _Party.__new__(_Party)
    p.result = SessionResult()
    return p


def _both(a: np.ndarray, b: np.ndarray, i: np.ndarray) -> None:
    fast, ref = _party(), _party()
    zf, xf = fast._sift_counts(a, b, i)
    zr, xr = ref._sift_counts_reference(a, b, i)
    assert zf.dtype == zr.dtype and np.array_equal(zf, zr)
    assert xf.dtype == xr.dtype and np.array_equal(xf, xr)
    for name in ("n_z", "n_x", "sifted_bits", "test_bits"):
        assert getattr(fast.result, name) == getattr(ref.result, name), name


@pytest.mark.parametrize("n", [0, 1, 2, 7, 63, 64, 65, 127, 128, 129, 1000, 4099])
@pytest.mark.parametrize("seed", range(8))
def test_matches_reference(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed * 1000 + n)
    a = rng.integers(0, 2, n, dtype=np.uint8)
    b = rng.integers(0, 2, n, dtype=np.uint8)
    i = rng.integers(0, 3, n, dtype=np.uint8)
    _both(a, b, i)


@pytest.mark.parametrize("seed", range(4))
def test_odd_values_match_reference(seed: int) -> None:
    # Bases outside {0, 1} and classes >= 3 (not produced by the protocol): the kernel
    # still selects and counts exactly as the reference does.
    rng = np.random.default_rng(seed)
    n = 3000
    a = rng.integers(0, 4, n, dtype=np.uint8)
    b = rng.integers(0, 4, n, dtype=np.uint8)
    i = rng.integers(0, 256, n, dtype=np.uint8)
    _both(a, b, i)


def test_all_same_basis() -> None:
    n = 130
    z = np.zeros(n, np.uint8)
    _both(z, z, np.full(n, 2, np.uint8))
    o = np.ones(n, np.uint8)
    _both(o, o, np.ones(n, np.uint8))
    _both(z, o, np.zeros(n, np.uint8))  # nothing matches


def test_non_contiguous_and_other_dtypes_use_a_correct_path() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(0, 2, 2000, dtype=np.uint8)[::2]
    b = rng.integers(0, 2, 2000, dtype=np.uint8)[::2]
    i = rng.integers(0, 3, 2000, dtype=np.uint8)[::2]
    _both(a, b, i)
    _both(a.astype(bool), b.astype(np.int64), i.astype(np.int16))


def test_kernel_checks_sizes() -> None:
    a = np.zeros(10, np.uint8)
    out = np.empty(10, np.int64)
    with pytest.raises(ValueError):
        kernel.sift_select(a, a[:9], a, 0, 1, out, out.copy())
    with pytest.raises(ValueError):
        kernel.sift_select(a, a, a, 0, 1, out[:9], out.copy())
    with pytest.raises(ValueError):
        kernel.sift_select(a, a, a, 0, 1, out, np.empty(9, np.int64))
    # positive control: the right sizes pass
    assert kernel.sift_select(a, a, a, 0, 1, out, out.copy())[:2] == (10, 0)


# --- PackedDetections.body: one checking pass, the encoder delta-codes -----------------

def _slots(rng: np.random.Generator, n: int, big: bool) -> np.ndarray:
    gaps = rng.geometric(0.3, n).astype(np.int64)
    if big and n:  # some multi-byte deltas, up to 2^40
        sel = rng.random(n) < 0.05
        gaps[sel] = rng.integers(128, 1 << 40, int(sel.sum()))
    return np.cumsum(gaps) - 1 + (int(rng.integers(0, 1 << 20)) if big else 0)


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 127, 128, 129, 5000])
@pytest.mark.parametrize("seed", range(6))
def test_packed_detections_body_matches_reference(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed * 7919 + n)
    for big in (False, True):
        slots = _slots(rng, n, big)
        bases = rng.integers(0, 2, n, dtype=np.uint8)
        msg = m.PackedDetections(slots, bases)
        assert msg.body() == msg.body_reference()
        back = m.decode(msg.encode())
        assert np.array_equal(back.slots, slots) and np.array_equal(back.bases, bases)


def test_packed_detections_body_at_the_limits() -> None:
    for slots in ([0], [c.ID_LIMIT - 1], [0, c.ID_LIMIT - 1], [127], [128],
                  [5, 6, 7, c.ID_LIMIT - 1]):
        msg = m.PackedDetections(np.array(slots, np.int64), np.zeros(len(slots), np.uint8))
        assert msg.body() == msg.body_reference()


@pytest.mark.parametrize("slots", [[-1], [c.ID_LIMIT], [3, 3], [4, 3], [0, 1, 2, 2, 5],
                                   [0, 5, 1 << 62], [0, 1, -5], [-(1 << 63), 0]])
def test_packed_detections_body_refuses_as_reference(slots: list[int]) -> None:
    msg = m.PackedDetections(np.array(slots, np.int64), np.zeros(len(slots), np.uint8))
    with pytest.raises(ValueError, match="strictly increasing") as fast:
        msg.body()
    with pytest.raises(ValueError, match="strictly increasing") as ref:
        msg.body_reference()
    assert str(fast.value) == str(ref.value)


@pytest.mark.parametrize("seed", range(20))
def test_increasing_in_matches_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 200))
    v = np.sort(rng.integers(-3, 300, n)).astype(np.int64)
    if n > 1 and seed % 2:
        v[int(rng.integers(1, n))] = v[0]  # a repeat or a decrease somewhere
    limit = int(rng.integers(0, 400))
    want = bool(n == 0 or (v[0] >= 0 and (np.diff(v) > 0).all() and v[-1] < limit))
    assert kernel.increasing_in(v, limit) is want
    with pytest.raises(ValueError):
        kernel.increasing_in(np.zeros(3, np.uint8), 10)


# --- one party's sifting in one pass (bb84.sift_pick) -----------------------------------


def _ref_alice(idx: np.ndarray, basis: np.ndarray, intensity: np.ndarray, bit: np.ndarray,
               other: np.ndarray) -> tuple[_Party, tuple[np.ndarray, ...]]:
    p = _party()
    a_basis, inten = basis[idx], intensity[idx]
    zsel, xsel = p._sift_counts_reference(a_basis, other, inten)
    return p, (a_basis, inten, bit[idx[zsel]], bit[idx[xsel]], inten[xsel])


def _ref_bob(basis: np.ndarray, intensity: np.ndarray, bit: np.ndarray,
             other: np.ndarray) -> tuple[_Party, tuple[np.ndarray, ...]]:
    p = _party()
    zsel, xsel = p._sift_counts_reference(basis, other, intensity)
    return p, (np.zeros(0, np.uint8), np.zeros(0, np.uint8), bit[zsel], bit[xsel],
               intensity[xsel])


def _same(fast: _Party, got: tuple[np.ndarray, ...] | None, ref: _Party,
          want: tuple[np.ndarray, ...]) -> None:
    assert got is not None
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == np.uint8 and np.array_equal(g, w)
    for name in ("n_z", "n_x", "sifted_bits", "test_bits"):
        assert getattr(fast.result, name) == getattr(ref.result, name), name


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 128, 1000, 4099])
@pytest.mark.parametrize("seed", range(8))
def test_pick_matches_reference(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed * 104729 + n)
    m_ = n * 3 + 1  # Alice's record: more slots than announced
    basis = rng.integers(0, 2, m_, dtype=np.uint8)
    intensity = rng.integers(0, 3 if seed % 2 else 256, m_, dtype=np.uint8)
    bit = rng.integers(0, 2, m_, dtype=np.uint8)
    idx = np.sort(rng.choice(m_, n, replace=False)).astype(np.int64)
    other = rng.integers(0, 2, n, dtype=np.uint8)
    fast = _party()
    got = fast._pick(idx, basis, intensity, bit, other)
    ref, want = _ref_alice(idx, basis, intensity, bit, other)
    _same(fast, got, ref, want)
    # Bob: his own record, entry by entry
    b_int, b_basis, b_bit = intensity[:n], basis[:n], bit[:n]
    fast = _party()
    got = fast._pick(None, other, b_int, b_bit, b_basis)
    ref, want = _ref_bob(other, b_int, b_bit, b_basis)
    _same(fast, got, ref, want)


def test_pick_falls_back_on_other_dtypes() -> None:
    a = np.zeros(5, np.uint8)
    assert _party()._pick(None, a.astype(bool), a, a, a) is None
    assert _party()._pick(np.zeros(5, np.int32), a, a, a, a) is None
    assert _party()._pick(None, a[:4], a, a, a) is None
    assert _party()._pick(np.zeros(5, np.int64), a, a[:4], a, a) is None
    assert _party()._pick(None, a, a, a, a) is not None  # positive control


def test_pick_kernel_checks_bounds_and_sizes() -> None:
    u = np.zeros(10, np.uint8)

    def call(idx: np.ndarray, use_idx: bool = True, rec: np.ndarray = u,
             other: np.ndarray = u, out: int = 10) -> tuple:
        bufs = [np.empty(out, np.uint8) for _ in range(5)]
        return kernel.sift_pick(use_idx, idx, rec, rec, rec, other, 0, 1, *bufs)

    ok = np.arange(10, dtype=np.int64)
    assert call(ok)[:2] == (10, 0)  # positive control
    for bad in (10, -1, 1 << 62):
        idx = ok.copy()
        idx[3] = bad
        with pytest.raises(ValueError, match="index out of range"):
            call(idx)
    with pytest.raises(ValueError):
        call(ok[:9])  # idx shorter than the announced bases
    with pytest.raises(ValueError):
        call(ok, out=9)  # an output too small
    with pytest.raises(ValueError):
        kernel.sift_pick(True, ok, u, u[:9], u, u, 0, 1, *[np.empty(10, np.uint8)] * 5)
    with pytest.raises(ValueError):
        call(b"", use_idx=False, other=u[:9])  # Bob: record and bases differ


def test_session_same_with_the_reference_sifting(monkeypatch: pytest.MonkeyPatch) -> None:
    # A whole session with the compiled sifting and with the numpy one: the same report.
    from qkd.sim.params import LinkParams
    from qkd.sim.protocol import _Party as P
    from qkd.sim.session import run_session

    params = LinkParams(distance_km=5, pulses=10**7, mu=0.6, nu=0.15, p_mu=0.5,
                        p_nu=0.35, detector_efficiency=0.25)
    fast = run_session(params, seed=3)
    monkeypatch.setattr(P, "_pick", lambda self, *a: None)
    monkeypatch.setattr(P, "_sift_counts", P._sift_counts_reference)
    monkeypatch.setattr(m.PackedDetections, "body", m.PackedDetections.body_reference)
    ref = run_session(params, seed=3)
    assert fast["sifted_bits"] > 1000  # the session did sift
    def untimed(r: dict) -> dict:
        return {k: v for k, v in r.items() if not k.startswith("time_")}

    # 1e7 pulses: through Cascade and verification (the finite key is still 0)
    assert untimed(fast) == untimed(ref) and fast["leaked_ec_bits"] > 0


# --- ParityQuery.body in one compiled pass (bb84.parity_query_body) ---------------------


@pytest.mark.parametrize("seed", range(40))
def test_parity_query_body_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.choice([0, 1, 2, 63, 64, 65, 300]))
    k = int(rng.choice([0, 1, 5]))
    top = int(rng.choice([100, 1 << 20, c.ID_LIMIT]))
    nodes = np.unique(rng.integers(0, top, n)).astype(np.int64)
    of = rng.integers(0, top, k).astype(np.int64)
    op = rng.integers(0, 64, k).astype(np.int64)
    msg = m.ParityQuery(nodes, of, op)
    assert msg.body() == msg.body_reference()
    back = m.decode(msg.encode())
    assert np.array_equal(back.nodes, nodes) and np.array_equal(back.opens_frame, of)


_BIG = c.ID_LIMIT


@pytest.mark.parametrize("nodes, of, op", [
    ([1, 2], [0], []),                 # lengths
    ([-1, 2], [], []),                 # negative node
    ([1, 2], [-1], [0]),               # negative frame
    ([1, 2], [0], [-5]),               # negative pass
    ([1, _BIG], [], []),               # node at the limit
    ([1], [_BIG], [0]),                # frame at the limit
    ([1], [0], [_BIG]),                # pass at the limit
    ([3, 3], [], []),                  # repeat
    ([5, 2, 9], [], []),               # decrease
    ([0, -(1 << 63)], [], []),         # a wrapping gap: what the reference does
    ([-1], [_BIG], [0]),               # two faults: the reference's first
    ([4, 2], [_BIG], [0]),
])
def test_parity_query_body_refuses_as_reference(nodes: list[int], of: list[int],
                                                op: list[int]) -> None:
    msg = m.ParityQuery(np.array(nodes, np.int64), np.array(of, np.int64),
                        np.array(op, np.int64))
    try:
        want: bytes | str = msg.body_reference()
    except ValueError as exc:
        want = str(exc)
    try:
        got: bytes | str = msg.body()
    except ValueError as exc:
        got = str(exc)
    assert got == want


def test_parity_query_body_kernel_refuses_non_64_bit() -> None:
    z = np.arange(3, dtype=np.int64)
    assert kernel.parity_query_body(z[:0], z[:0], z, 10) == b"\x00\x03\x00\x00\x00"
    with pytest.raises(ValueError):
        kernel.parity_query_body(z[:0], z[:0], np.zeros(3, np.uint8), 10)


# --- ParityQuery.parse: node ids as running sums from the decoder ----------------------


def _parse_both(body: bytes) -> tuple[object, object]:
    out = []
    for parse in (m.ParityQuery.parse, m.ParityQuery.parse_reference):
        r = m._Reader(body)
        try:
            q = parse(r)
            r.end()
            out.append(("ok", q.nodes.dtype, q.nodes.tolist(), q.opens_frame.tolist(),
                        q.opens_pass.tolist()))
        except m.MessageError as exc:
            out.append(("err", str(exc)))
    return out[0], out[1]


def _vi(*vals: int) -> bytes:
    return b"".join(m._varint(v) for v in vals)


@pytest.mark.parametrize("seed", range(60))
def test_parity_query_parse_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.choice([0, 1, 2, 63, 64, 65, 300]))
    top = int(rng.choice([100, 1 << 20, c.ID_LIMIT]))
    nodes = np.unique(rng.integers(0, top, n)).astype(np.int64)
    of = rng.integers(0, 50, 2).astype(np.int64)
    body = m.ParityQuery(nodes, of, of + 1).body_reference()
    fast, ref = _parse_both(body)
    assert fast == ref and fast[0] == "ok"
    # hostile: truncations and byte flips of a valid body decode (or fail) as the reference
    for _ in range(20):
        b = bytearray(body)
        if b and rng.random() < 0.5:
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        cut = int(rng.integers(0, len(b) + 1))
        fast, ref = _parse_both(bytes(b[:cut] if rng.random() < 0.3 else b))
        assert fast == ref


@pytest.mark.parametrize("body", [
    _vi(0, 1, c.ID_LIMIT - 1),              # the largest node: accepted
    _vi(0, 1, c.ID_LIMIT),                  # a gap at the limit
    _vi(0, 2, c.ID_LIMIT - 2, 0),           # sum(gap + 1) == ID_LIMIT: accepted
    _vi(0, 2, c.ID_LIMIT - 2, 1),           # one above
    _vi(0, 5) + _vi(*[c.ID_LIMIT - 1] * 5),  # the sums wrap 2^64
    _vi(0, 3, 1, 2),                        # truncated
    _vi(0, 1) + b"\x80\x00",                # over-long
    _vi(0, 1) + b"\xff" * 9 + b"\x01",      # at or above 2^63
    _vi(0, 1 << 40),                        # a huge count
    _vi(1, c.ID_LIMIT, 0, 0),               # a frame out of range
    _vi(0, 0),                              # no nodes
])
def test_parity_query_parse_edges_as_reference(body: bytes) -> None:
    fast, ref = _parse_both(body)
    assert fast == ref


def test_parity_query_parse_random_bytes_as_reference() -> None:
    rng = np.random.default_rng(99)
    outcomes = set()
    for _ in range(3000):
        n = int(rng.integers(0, 24))
        body = bytes(rng.integers(0, 256, n, dtype=np.uint8))
        if rng.random() < 0.5:
            body = _vi(0, int(rng.integers(0, 8))) + body
        fast, ref = _parse_both(body)
        assert fast == ref
        outcomes.add(fast[0] if fast[0] == "ok" else fast[1])
    assert "ok" in outcomes and len(outcomes) >= 3  # the fuzz reached more than one branch
