"""Cascade: corrects the frames, counts every revealed parity, reaches its efficiency."""

from __future__ import annotations

import numpy as np
import pytest

from qkd.sim import messages as m
from qkd.sim.cascade import (
    VARIANTS,
    CascadeAlice,
    CascadeBob,
    _Layout,
    block_sizes,
    reconcile_frames,
    reuses_subblocks,
)
from qkd.sim.theory import h2


def _bsc(frames: int, n: int, q: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, (frames, n), dtype=np.uint8)
    return a, a ^ (rng.random((frames, n)) < q).astype(np.uint8)


def test_block_sizes_follow_the_paper() -> None:
    # Demystifying Cascade, opt. (8) at Q = 2 %: a = log2(50) - 0.5 = 5.14 -> k1 = 64,
    # k2 = 2^ceil(8.57) = 512, k3 = 4096, then n/2; 14 passes.
    s = block_sizes("option8", 0.02, 16384)
    assert s[:3] == [64, 512, 4096] and s[3:] == [8192] * 11
    # Original (Brassard-Salvail): ceil(0.73/0.02) = 37, doubling, 4 passes.
    assert block_sizes("original", 0.02, 10**6) == [37, 74, 148, 296]
    assert block_sizes("option7", 0.02, 16384)[:2] == [64, 256]
    with pytest.raises(ValueError, match="variant"):
        block_sizes("turbo", 0.02, 100)


@pytest.mark.parametrize("variant", VARIANTS)
def test_corrects_frames(variant: str) -> None:
    a, b = _bsc(32, 4096, 0.03, 1)
    res = reconcile_frames(a, b, 0.03, variant, seed=9)
    failed = np.any(res.corrected != a, axis=1).sum()
    # FER of these variants at n=4096, Q=3 % is well below 1/32 (original ~1e-3,
    # the 10-14 pass variants far less), so a fixed seed must give zero failures.
    assert failed == 0
    # Shannon: no scheme can correct with fewer than n h(Q) bits; Cascade stays above.
    n_err = int(np.count_nonzero(a != b))
    assert res.leaked_bits > 0.9 * 32 * 4096 * h2(n_err / (32 * 4096))


def test_efficiency_of_improved_variant() -> None:
    # Demystifying Cascade reports f ~1.05-1.08 for opt. (8) around Q = 1-5 % at n=1e4;
    # with 2^14-bit frames we must stay within the 1.10.
    for q, seed in ((0.01, 2), (0.03, 3), (0.05, 4)):
        a, b = _bsc(48, 1 << 14, q, seed)
        res = reconcile_frames(a, b, q, "option8", seed=seed)
        assert np.array_equal(res.corrected, a)
        f = res.leaked_bits / (a.size * h2(q))
        assert 1.0 < f < 1.10, (q, f)


def test_leakage_counted_from_messages() -> None:
    a, b = _bsc(8, 2048, 0.02, 5)
    alice = CascadeAlice(a)
    bob = CascadeBob(b, 0.02, "option8", seed=3)
    parity_bits = 0
    while not bob.done:
        for data in bob.messages_to_send():
            alice.receive_message(data)
        for data in alice.messages_to_send():
            msg = m.decode(data)
            assert isinstance(msg, m.ParityReply)
            parity_bits += msg.bits.size
            bob.receive_message(data)
    for data in bob.messages_to_send():
        alice.receive_message(data)
    assert alice.done and alice.bob_reported_leak == parity_bits
    assert alice.revealed_bits == bob.revealed_bits == parity_bits
    assert int(bob.leak_per_frame.sum()) == parity_bits


def test_no_errors_costs_only_block_parities() -> None:
    a, _ = _bsc(4, 4096, 0.0, 6)
    res = reconcile_frames(a, a.copy(), 0.02, "original", seed=1)
    sizes = block_sizes("original", 0.02, 4096)
    assert res.leaked_bits == 4 * sum(-(-4096 // k) for k in sizes)
    assert np.array_equal(res.corrected, a)


def test_alice_rejects_bad_queries() -> None:
    a, _b = _bsc(2, 1024, 0.02, 7)
    alice = CascadeAlice(a)
    with pytest.raises(m.MessageError):
        alice.receive_message(m.ParityQuery(np.array([1])).encode())  # before hello
    alice.receive_message(m.CascadeHello("option8", 0.02, 1024, 2, 1).encode())
    with pytest.raises(m.MessageError, match="outside the layout"):
        alice.receive_message(m.ParityQuery(np.array([10**9])).encode())
    with pytest.raises(m.MessageError, match="not started"):
        alice.receive_message(m.ParityQuery(np.array([0])).encode())  # pass not started
    with pytest.raises(m.MessageError, match="outside the layout"):
        alice.receive_message(m.ParityQuery(np.zeros(0, np.int64), np.array([2]),
                                            np.array([0])).encode())  # frame 2 of 2
    with pytest.raises(m.MessageError, match="outside the layout"):
        alice.receive_message(m.ParityQuery(np.zeros(0, np.int64), np.array([0]),
                                            np.array([14])).encode())  # pass 15 of 14
    open0 = m.ParityQuery(np.zeros(0, np.int64), np.array([1]), np.array([0]))
    alice.receive_message(open0.encode())
    reply = m.decode(alice.messages_to_send()[0])
    assert isinstance(reply, m.ParityReply) and reply.bits.size == 1024 // 64  # k1 = 64
    # The top-level parities are those of frame 1's 64-bit blocks, in order.
    assert np.array_equal(reply.bits, a[1].reshape(16, 64).sum(axis=1) % 2)
    with pytest.raises(m.MessageError, match="twice"):
        alice.receive_message(open0.encode())
    # Frame 1 / pass 0 is open now: its nodes can be asked, frame 0's still cannot.
    lay = _Layout("option8", 0.02, 1024, 2, 1)
    node = lay.ids(np.array([0]), np.array([2]), np.array([1]), np.array([5]))  # bits 20..23
    alice.receive_message(m.ParityQuery(node).encode())
    reply = m.decode(alice.messages_to_send()[0])
    assert isinstance(reply, m.ParityReply) and reply.bits.tolist() == [a[1, 20:24].sum() % 2]
    with pytest.raises(m.MessageError, match="not started"):
        alice.receive_message(m.ParityQuery(node - lay.wid[0, 2]).encode())  # frame 0
    with pytest.raises(m.MessageError, match="second"):
        alice.receive_message(m.CascadeHello("option8", 0.02, 1024, 2, 1).encode())
    bad = CascadeAlice(a)
    with pytest.raises(m.MessageError, match="layout"):
        bad.receive_message(m.CascadeHello("option8", 0.02, 2048, 2, 1).encode())


def _reference_cascade(a: np.ndarray, b: np.ndarray, lay: _Layout) -> tuple[np.ndarray, int]:
    """One frame, written as plainly as possible: the sequential algorithm the vectorised
    engine must reproduce bit for bit (same layout, same batch rule)."""
    b = b.copy()
    reuse = reuses_subblocks(lay.variant)
    passes = lay.passes

    def par(bits: np.ndarray, p: int, d: int, c: int) -> int:
        ps = passes[p]
        leaves = ps.gather[c << d : (c + 1) << d]
        return int(np.append(bits, 0)[leaves].sum() % 2)

    # known: parities in the cascade (top-level blocks; every learnt one when reusing);
    # disclosed: every parity Alice revealed or that followed from revealed ones. The
    # leak is the number of distinct parities Alice revealed: a search through a
    # sub-block disclosed before uses it, it never asks again.
    known: dict[tuple[int, int, int], int] = {}
    disclosed: dict[tuple[int, int, int], int] = {}
    for row in lay.padding_rows():  # padding only: parity 0, known to both for free
        pp, dd, cc = (int(v[0]) for v in lay.decode_rows(np.array([row])))
        disclosed[(pp, dd, cc)] = 0
    leak = 0
    for p, ps in enumerate(passes):
        for blk in range(ps.nb):
            known[(p, ps.D, blk)] = disclosed[(p, ps.D, blk)] = par(a, p, ps.D, blk)
            leak += 1
        odd = [(p, ps.D, blk) for blk in range(ps.nb)
               if known[(p, ps.D, blk)] != par(b, p, ps.D, blk)]
        while odd:
            lowest = min(x[0] for x in odd)
            searches = [list(x) for x in odd if x[0] == lowest]
            rest = [x for x in odd if x[0] != lowest]
            learned = []
            while any(s[1] > 0 for s in searches):
                moved = True
                while moved:  # free descent through known left children
                    moved = False
                    for s in searches:
                        q, d, c = s
                        left, right = (q, d - 1, 2 * c), (q, d - 1, 2 * c + 1)
                        if d > 0 and left not in disclosed and right in disclosed:
                            # right sibling known (padding only): left = parent ^ right
                            disclosed[left] = disclosed[(q, d, c)] ^ disclosed[right]
                            known[left] = disclosed[left]
                            learned.append(left)
                        if d == 0 or left not in disclosed:
                            continue
                        go_left = disclosed[left] != par(b, *left)
                        if not go_left and right not in disclosed:
                            disclosed[right] = disclosed[(q, d, c)] ^ disclosed[left]
                            known[right] = disclosed[right]
                            learned.append(right)
                        s[1], s[2] = d - 1, 2 * c + (0 if go_left else 1)
                        moved = True
                asks = sorted({(s[0], s[1] - 1, 2 * s[2]) for s in searches if s[1] > 0})
                for x in asks:
                    known[x] = disclosed[x] = par(a, *x)
                    learned.append(x)
                    leak += 1
            flips = sorted({int(passes[q].gather[c]) for q, _d, c in searches})
            b[flips] ^= 1
            if not reuse:
                for x in learned:
                    known.pop(x, None)
            touched = {(q, d, int(passes[q].leaf_of_orig[j]) >> d)
                       for j in flips for q in range(p + 1) for d in range(passes[q].D + 1)}
            odd = sorted({x for x in list(rest) + sorted(touched)
                          if x in known and known[x] != par(b, *x)})
    return b, leak


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_equals_plain_sequential_cascade(variant: str) -> None:
    # The vectorised, frame-asynchronous engine against the plain per-frame algorithm:
    # same corrected bits, same number of parities revealed, frame by frame.
    n, q = 1500, 0.04
    a, b = _bsc(4, n, q, 11)
    res = reconcile_frames(a, b, q, variant, seed=5)
    lay = _Layout(variant, q, n, 4, 5)
    for i in range(4):
        ref_bits, ref_leak = _reference_cascade(a[i], b[i], lay)
        assert np.array_equal(res.corrected[i], ref_bits), (variant, i)
        assert res.leak_per_frame[i] == ref_leak, (variant, i)


def test_frames_do_not_depend_on_their_group() -> None:
    # Each frame advances at its own pace: reconciling frames together or one by one
    # gives identical corrections and leakage (the permutations depend on n and seed).
    a, b = _bsc(6, 4096, 0.03, 12)
    together = reconcile_frames(a, b, 0.03, "option8", seed=8)
    slowest = 0
    for i in range(6):
        alone = reconcile_frames(a[i : i + 1], b[i : i + 1], 0.03, "option8", seed=8)
        assert np.array_equal(alone.corrected[0], together.corrected[i])
        assert alone.leak_per_frame[0] == together.leak_per_frame[i]
        slowest = max(slowest, alone.round_trips)
    # ... and the group needs as many round trips as its slowest frame, not more.
    assert together.round_trips == slowest


def test_query_messages_are_compact() -> None:
    # Node ids as varint gaps: well under 4 bytes per requested parity (the raw uint32
    # encoding used before), counted over a whole run.
    a, b = _bsc(32, 1 << 14, 0.02, 13)
    alice = CascadeAlice(a)
    bob = CascadeBob(b, 0.02, "option8", seed=1)
    qbytes = parities = 0
    while not bob.done:
        for data in bob.messages_to_send():
            msg = m.decode(data)
            if isinstance(msg, m.ParityQuery):
                qbytes += len(data)
            alice.receive_message(data)
        for data in alice.messages_to_send():
            parities += m.decode(data).revealed_bits()
            bob.receive_message(data)
    assert qbytes / parities < 2.5


@pytest.mark.slow
@pytest.mark.parametrize("qber", [0.02, 0.05])
def test_frame_error_rate_improved_variant(qber: float) -> None:
    # 8192 frames of 2^14 bits: with a true FER of 1e-4 the expected count is 0.82 and
    # P(>= 4 failures) = 1 - sum_{k<4} e^-0.82 0.82^k / k! = 0.9 %, so >= 4 failures
    # refutes "FER <= 1e-4" at the 1 % level. (0 failures alone only shows FER < 3.7e-4
    # at 95 %; the long benchmark run is what supports < 1e-4.)
    fails = 0
    for i in range(64):
        a, b = _bsc(128, 1 << 14, qber, 100 + i)
        res = reconcile_frames(a, b, qber, "option8", seed=i)
        fails += int(np.any(res.corrected != a, axis=1).sum())
    assert fails < 4


@pytest.mark.parametrize("variant", VARIANTS)
def test_leak_is_distinct_parities_alice_disclosed(variant: str) -> None:
    # One leak rule for every variant: the number of distinct parities Alice disclosed.
    # Watch the wire: no node is ever asked twice (a re-asked parity reveals nothing new
    # and must not raise the leak), and the leak per frame is the distinct count.
    n, q, nf = 3000, 0.05, 6
    a, b = _bsc(nf, n, q, 21)
    alice = CascadeAlice(a)
    bob = CascadeBob(b, q, variant, seed=4)
    lay = bob.layout
    seen: list[set[tuple[int, int, int]]] = [set() for _ in range(nf)]
    asked = np.zeros(nf, np.int64)
    while not bob.done:
        for data in bob.messages_to_send():
            msg = m.decode(data)
            if isinstance(msg, m.ParityQuery):
                for f, p in zip(msg.opens_frame.tolist(), msg.opens_pass.tolist(), strict=True):
                    blocks = {(p, lay.passes[p].D, blk) for blk in range(lay.passes[p].nb)}
                    assert not blocks & seen[f]
                    seen[f] |= blocks
                    asked[f] += len(blocks)
                if msg.nodes.size:
                    pp, dd, ff, cc = lay.decode(msg.nodes)
                    for p, d, f, c in zip(pp.tolist(), dd.tolist(), ff.tolist(), cc.tolist(),
                                          strict=True):
                        assert (p, d, c) not in seen[f], ("asked twice", variant, f, p, d, c)
                        seen[f].add((p, d, c))
                        asked[f] += 1
            alice.receive_message(data)
        for data in alice.messages_to_send():
            bob.receive_message(data)
    assert np.array_equal(bob.leak_per_frame, asked)
    assert bob.revealed_bits == alice.revealed_bits == int(asked.sum())
    assert np.array_equal(bob.bits, a)


# "Demystifying the information reconciliation protocol Cascade" (Martinez-Mateo et al.,
# QIC 15, 453 (2015)), Fig. 1, n = 1e4: the original protocol's efficiency, as read from
# the figure and quoted in issue 15.
_PAPER_ORIGINAL_F = {0.01: 1.13, 0.02: 1.15, 0.05: 1.18}


@pytest.mark.parametrize("q", sorted(_PAPER_ORIGINAL_F))
def test_original_efficiency_matches_the_paper(q: float) -> None:
    n, frames = 10_000, 2048
    a, b = _bsc(frames, n, q, 1000 + round(q * 1000))
    res = reconcile_frames(a, b, q, "original", seed=17)
    ok = (res.corrected == a).all(axis=1)
    # f = leak / (n h(Q)) at the channel's Q, as `qkdgw qkd reconcile` reports it
    f = res.leak_per_frame / (n * h2(q))
    se = float(f.std(ddof=1) / np.sqrt(frames))
    assert se < 0.02 / 8  # the tolerance is many standard errors wide
    assert abs(float(f.mean()) - _PAPER_ORIGINAL_F[q]) <= 0.02, (q, f.mean(), se)
    assert ok.mean() > 0.99


@pytest.mark.slow
def test_original_frame_error_rate_matches_the_paper() -> None:
    # Fig. 1 of the paper: FER about 4e-4 for the original protocol at Q = 1 %, n = 1e4.
    # 20,000 frames: ~8 failures expected; accept the 99.9 % Poisson band of 4e-4 widened
    # by a factor 2 either way for reading the value off a log-scale figure.
    n, q, frames, group = 10_000, 0.01, 20_000, 500
    fails = 0
    for g in range(frames // group):
        a, b = _bsc(group, n, q, 50_000 + g)
        res = reconcile_frames(a, b, q, "original", seed=g)
        fails += int((~(res.corrected == a).all(axis=1)).sum())
    fer = fails / frames
    assert 0.5e-4 <= fer <= 1.5e-3, (fails, frames)
