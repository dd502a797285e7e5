"""The compiled Cascade kernels (qkd/native/cascade.c) against the numpy reference, bit
for bit: the same messages on the wire, the same corrections and the same leakage, for
every variant over many seeds and edge sizes; and bad arguments end in ValueError."""

from __future__ import annotations

import os

import numpy as np
import pytest

from qkd import native
from qkd.sim import cascade as cc
from qkd.sim import messages as m
from qkd.sim.reconcile import reconcile_verified

if os.environ.get("QKDGW_NATIVE", "1") == "0":
    pytest.skip("QKDGW_NATIVE=0 asks for the references only", allow_module_level=True)

NAT = native.load("cascade")


def test_the_kernel_is_built() -> None:
    # A missing build must show here, not as a silently slower run.
    assert NAT is not None, "reinstall with a C compiler present (pip install -e .)"


def _transcript(a: np.ndarray, b: np.ndarray, q: float, variant: str, seed: int,
                nat: bool, monkeypatch: pytest.MonkeyPatch
                ) -> tuple[list[bytes], np.ndarray, np.ndarray, int]:
    monkeypatch.setenv("QKDGW_NATIVE", "1" if nat else "0")
    alice, bob = cc.CascadeAlice(a), cc.CascadeBob(b, q, variant, seed)
    assert (bob._nat is not None) == nat
    wire: list[bytes] = []
    while not bob.done:
        for x in bob.messages_to_send():
            wire.append(x)
            alice.receive_message(x)
        for x in alice.messages_to_send():
            wire.append(x)
            bob.receive_message(x)
    wire += bob.messages_to_send()
    return wire, bob.bits, bob.leak_per_frame, bob.revealed_bits


_CASES = [(1, 1, 0.02), (2, 63, 0.05), (3, 64, 0.1), (1, 65, 0.02), (64, 64, 0.02),
          (65, 65, 0.08), (5, 1000, 0.01), (70, 4096, 0.03), (130, 257, 0.04)]


@pytest.mark.parametrize("variant", cc.VARIANTS)
@pytest.mark.parametrize("frames,n,q", _CASES)
def test_native_matches_reference(variant: str, frames: int, n: int, q: float,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if NAT is None:
        pytest.fail("the compiled kernel is missing")
    for seed in range(3):
        rng = np.random.default_rng([seed, frames, n])
        a = rng.integers(0, 2, (frames, n), dtype=np.uint8)
        b = a ^ (rng.random((frames, n)) < q).astype(np.uint8)
        # Estimate off by a factor, too: other block sizes, more cascading.
        est = q * (0.5 if seed == 2 else 1.0)
        ref = _transcript(a, b, est, variant, seed, False, monkeypatch)
        fast = _transcript(a, b, est, variant, seed, True, monkeypatch)
        assert fast[0] == ref[0]
        assert np.array_equal(fast[1], ref[1])
        assert np.array_equal(fast[2], ref[2]) and fast[3] == ref[3]


def test_native_matches_reference_with_frame_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    retried = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        a = rng.integers(0, 2, (48, 2048), dtype=np.uint8)
        b = a ^ (rng.random(a.shape) < 0.04).astype(np.uint8)
        out = []
        for nat in ("0", "1"):
            monkeypatch.setenv("QKDGW_NATIVE", nat)
            out.append(reconcile_verified(a, b, 0.01, "original", seed, 32, 2))
        retried += out[0].first_run_bad
        assert np.array_equal(out[0].corrected, out[1].corrected)
        assert np.array_equal(out[0].keep, out[1].keep)
        assert out[0].leaked_bits == out[1].leaked_bits and out[0].runs == out[1].runs
    assert retried > 0  # the retries ran on both paths


def test_hostile_replies_refused_on_the_native_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QKDGW_NATIVE", "1")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, (8, 4096), dtype=np.uint8)
    b = a ^ (rng.random(a.shape) < 0.02).astype(np.uint8)
    alice, bob = cc.CascadeAlice(a), cc.CascadeBob(b, 0.02, "option8", 1)
    refused, replies = False, 0
    while not bob.done:
        for x in bob.messages_to_send():
            alice.receive_message(x)
        for x in alice.messages_to_send():
            replies += 1
            if replies == 3:
                x = m.ParityReply(1 - m.decode(x).bits).encode()  # type: ignore[attr-defined]
            try:
                bob.receive_message(x)
            except m.MessageError:
                refused = True
                break
        if refused:
            break
    assert refused or np.any(bob.bits != a)  # never silently "fine"


def test_scatter_matches_ufunc_at_and_checks_bounds() -> None:
    if NAT is None:
        pytest.fail("the compiled kernel is missing")
    rng = np.random.default_rng(0)
    for op, uf in ((0, np.bitwise_or), (1, np.bitwise_xor), (2, np.bitwise_and)):
        arr = rng.integers(0, 2**63, 50, dtype=np.uint64)
        idx = rng.integers(0, 50, 200).astype(np.int64)  # repeats on purpose
        val = rng.integers(0, 2**63, 200, dtype=np.uint64)
        ref = arr.copy()
        uf.at(ref, idx, val)
        NAT.scatter(op, arr, idx, val)
        assert np.array_equal(arr, ref)
    arr = np.zeros(4, np.uint64)
    with pytest.raises(ValueError, match="outside the array"):
        NAT.scatter(0, arr, np.array([4], np.int64), np.ones(1, np.uint64))
    with pytest.raises(ValueError, match="outside the array"):
        NAT.scatter(0, arr, np.array([-1], np.int64), np.ones(1, np.uint64))
    with pytest.raises(ValueError, match="op must be"):
        NAT.scatter(3, arr, np.array([0], np.int64), np.ones(1, np.uint64))
    with pytest.raises(ValueError, match="one per index"):
        NAT.scatter(0, arr, np.array([0, 1], np.int64), np.ones(3, np.uint64))
    with pytest.raises(ValueError, match="writable"):
        NAT.scatter(0, b"\0" * 8, np.array([0], np.int64), np.ones(1, np.uint64))
    # arr sharing memory with idx: the first write would turn idx[1] into 2^40, past the
    # bounds checked before it. Refused; the same words as separate arrays are fine.
    shared = np.array([1, 0], np.int64)
    with pytest.raises(ValueError, match="share memory"):
        NAT.scatter(0, shared.view(np.uint64), shared, np.array([1 << 40], np.uint64))
    with pytest.raises(ValueError, match="share memory"):
        NAT.scatter(0, shared.view(np.uint64), np.array([0], np.int64), shared.view(np.uint64)[1:])
    NAT.scatter(0, shared.copy().view(np.uint64), shared, np.array([1 << 40], np.uint64))


def test_descend_and_touched_check_their_arguments() -> None:
    if NAT is None:
        pytest.fail("the compiled kernel is missing")
    z = np.zeros(8, np.uint64)
    rb = np.zeros(4, np.int64)
    one = np.zeros(1, np.int64)
    outs = [np.zeros(1, np.int64) for _ in range(7)] + [np.zeros(8, np.int64)] * 2
    with pytest.raises(ValueError, match="outside the layout"):  # level 0 is a leaf
        NAT.descend(z, z, z, z, rb, 1, 2, one, one, one, one, *outs)
    with pytest.raises(ValueError, match="same length"):
        NAT.descend(z, z[:4], z, z, rb, 1, 2, one, one, one, one, *outs)
    with pytest.raises(ValueError, match="shorter"):
        NAT.descend(z, z, z, z, rb, 1, 2, one, one, one, one, *outs[:7], one, one)
    far = np.array([1], np.int64)
    with pytest.raises(ValueError, match="outside the parity arrays"):
        NAT.descend(z, z, z, z, np.array([0, 100], np.int64), 1, 2, one * 0, far, one * 0,
                    one * 0, *outs)
    seg = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="flip"):
        NAT.touched(0, z, z, z, np.zeros(4, np.int64), seg, seg, seg, seg, seg,
                    np.array([0], np.int64), np.array([4], np.int64), 1, 4, one, one)
    with pytest.raises(ValueError, match="segment outside"):
        NAT.touched(0, z, z, z, np.zeros(4, np.int64), seg, seg, seg, np.array([1], np.int64),
                    seg, seg, seg, 1, 4, one, one)
    with pytest.raises(ValueError, match="mode"):
        NAT.touched(2, z, z, z, np.zeros(4, np.int64), seg, seg, seg, seg, seg, seg, seg, 1,
                    4, one, one)


@pytest.mark.parametrize("nat", [False, True])
def test_alice_refusals_on_both_paths(nat: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same hostile queries are refused with the same errors by the compiled answer.
    from tests.qkd.sim.test_cascade import test_alice_rejects_bad_queries

    monkeypatch.setenv("QKDGW_NATIVE", "1" if nat else "0")
    assert (cc.CascadeAlice(np.zeros((1, 8), np.uint8))._nat is not None) == nat
    test_alice_rejects_bad_queries()


@pytest.mark.parametrize("frames,n", [(1, 1), (2, 63), (64, 64), (65, 65), (130, 1000)])
def test_answer_matches_reference_on_random_queries(frames: int, n: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Random sorted node sets over random opened passes (not only those a search asks),
    # answered by both paths: the same parities, and the same refusals.
    for seed in range(4):
        rng = np.random.default_rng([seed, frames, n])
        a = rng.integers(0, 2, (frames, n), dtype=np.uint8)
        lay = cc._Layout("option8", 0.02, n, frames, seed)
        npass = len(lay.passes)
        parties = []
        for nat in (False, True):
            monkeypatch.setenv("QKDGW_NATIVE", "1" if nat else "0")
            al = cc.CascadeAlice(a)
            al.receive_message(m.CascadeHello("option8", 0.02, n, frames, seed).encode())
            parties.append(al)
        pairs = rng.permutation(frames * npass)[: max(1, frames * npass // 3)]
        of, op = pairs // npass, pairs % npass
        ids = np.unique(rng.integers(0, lay.total_ids, 200))
        ok = parties[0]._opened.copy()
        ok[of, op] = True
        _p, _d, f, _c = lay.decode(ids)
        good = ids[ok[f, _p]]
        replies = []
        for al in parties:
            al.receive_message(m.ParityQuery(good, of, op).encode())
            replies.append(m.decode(al.messages_to_send()[0]).bits)
        assert replies[0].size == int(lay.nb[op].sum()) + good.size
        assert np.array_equal(replies[0], replies[1])
        if good.size < ids.size:  # a node of a pass not opened: both refuse
            for al in parties:
                with pytest.raises(m.MessageError, match="not started"):
                    al.receive_message(m.ParityQuery(ids).encode())


def test_answer_checks_its_arguments() -> None:
    if NAT is None:
        pytest.fail("the compiled kernel is missing")
    lay = cc._Layout("option8", 0.02, 256, 3, 0)
    pre = np.zeros((lay.pre_rows, lay.words), np.uint64)
    opened = np.ones((3, len(lay.passes)), bool)
    e = np.zeros(0, np.int64)

    def call(of: np.ndarray = e, op: np.ndarray = e, ids: np.ndarray = e,
             pre: np.ndarray = pre, opened: np.ndarray = opened, frames: int = 3,
             out: np.ndarray | None = None) -> int:
        if out is None:
            out = np.zeros(10000, np.uint8)
        return NAT.answer(pre, lay.words, of, op, lay.pre_base, lay.nb, lay.kk, ids,  # type: ignore[union-attr]
                          lay.seg_id, lay.seg_w, lay.seg_p, lay.seg_d, lay.seg_pre,
                          lay.seg_w0, opened, frames, len(lay.passes), lay.total_ids, out)

    assert call(ids=np.array([0, 1], np.int64)) == 0
    assert call(ids=np.array([lay.total_ids], np.int64)) == 1
    assert call(ids=np.array([-1], np.int64)) == 1
    assert call(ids=np.array([3, 3], np.int64)) == 1  # not strictly increasing
    assert call(ids=np.array([0], np.int64), opened=np.zeros_like(opened)) == 2
    with pytest.raises(ValueError, match="opening outside"):
        call(of=np.array([3], np.int64), op=np.array([0], np.int64))
    with pytest.raises(ValueError, match="opening outside"):
        call(of=np.array([0], np.int64), op=np.array([len(lay.passes)], np.int64))
    with pytest.raises(ValueError, match="differ in length"):
        call(of=np.array([0], np.int64))
    with pytest.raises(ValueError, match="out too short"):
        call(of=np.array([0], np.int64), op=np.array([0], np.int64), out=np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match="out too short"):
        call(ids=np.array([0, 1], np.int64), out=np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match="prefix rows"):
        call(of=np.array([0], np.int64), op=np.array([0], np.int64), pre=pre[:4])
    with pytest.raises(ValueError, match="frames \\* npass"):
        call(opened=opened[:2])
    with pytest.raises(ValueError, match="inconsistent"):
        call(frames=65)
    with pytest.raises(ValueError, match="writable"):
        call(out=np.zeros(8, np.uint8)[::2])


@pytest.mark.parametrize("frames,n", [(0, 5), (1, 0), (1, 1), (63, 7), (64, 64), (65, 65),
                                      (128, 63), (130, 1000)])
def test_pack_matches_reference(frames: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng([frames, n])
    a = rng.integers(0, 2, (frames, n), dtype=np.uint8)
    a[a == 1] = rng.integers(1, 256, int(a.sum()), dtype=np.uint8)  # any nonzero is a one
    lay = cc._Layout("option8", 0.02, max(n, 1), max(frames, 1), 0)
    lay.words = (frames + 63) // 64  # the packing depends on the frame count only
    got = lay.packed(a)
    monkeypatch.setenv("QKDGW_NATIVE", "0")
    ref = lay.packed(a)
    assert got.shape == ref.shape == (n + 1, (frames + 63) // 64)
    assert np.array_equal(got, ref)


def test_pack_checks_its_arguments() -> None:
    if NAT is None:
        pytest.fail("the compiled kernel is missing")
    a = np.ones((3, 5), np.uint8)
    NAT.pack(a, 3, 5, np.zeros(6, np.uint64))
    with pytest.raises(ValueError, match="frames \\* n bytes"):
        NAT.pack(a, 3, 6, np.zeros(7, np.uint64))
    with pytest.raises(ValueError, match="frames \\* n bytes"):
        NAT.pack(a, 3, 5, np.zeros(5, np.uint64))
    with pytest.raises(ValueError, match="non-negative"):
        NAT.pack(a, -1, 5, np.zeros(6, np.uint64))
    with pytest.raises(ValueError, match="writable"):
        NAT.pack(a, 3, 5, bytes(48))
    with pytest.raises(ValueError, match="contiguous"):
        NAT.pack(a.T, 3, 5, np.zeros(6, np.uint64))


def test_answer_refuses_tables_that_point_outside_the_prefix_rows() -> None:
    # The segment tables are Alice's own, but the kernel must not trust them either.
    if NAT is None:
        pytest.fail("the compiled kernel is missing")
    lay = cc._Layout("option8", 0.02, 256, 3, 0)
    pre = np.zeros((lay.pre_rows, lay.words), np.uint64)
    opened = np.ones((3, len(lay.passes)), bool)
    ids = np.array([0], np.int64)
    last = np.array([lay.total_ids - 1], np.int64)
    # (table, segment, value, id): each makes a node's rows or frame leave the arrays.
    for field, seg, value, node, msg in (
            ("seg_pre", 0, lay.pre_rows, ids, "prefix rows"),
            ("seg_pre", 0, -1, ids, "prefix rows"),
            ("seg_w", -1, 1, last, "frame outside"),
            ("seg_d", -1, 62, last, "prefix rows"),
            ("seg_d", 0, 63, ids, "segment table")):
        tab = {k: getattr(lay, k).copy() for k in ("seg_w", "seg_d", "seg_pre")}
        tab[field][seg] = value
        big = node
        with pytest.raises(ValueError, match=msg):
            NAT.answer(pre, lay.words, np.zeros(0, np.int64), np.zeros(0, np.int64),
                       lay.pre_base, lay.nb, lay.kk, big, lay.seg_id, tab["seg_w"],
                       lay.seg_p, tab["seg_d"], tab["seg_pre"], lay.seg_w0, opened, 3,
                       len(lay.passes), lay.total_ids, np.zeros(8, np.uint8))
