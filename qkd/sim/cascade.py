"""Cascade information reconciliation as two sans-I/O parties, vectorised across frames.

Variants (block sizes k_i for estimated QBER Q and frame length n), following
Martinez-Mateo, Pacher, Peev, Ciurana, Martin, "Demystifying the information
reconciliation protocol Cascade", QIC 15, 453 (2015):

* ``original``  Brassard-Salvail 1994: 4 passes, k1 = ceil(0.73/Q), k_i = 2 k_{i-1};
  only top-level block parities are used to trace cascading errors.
* ``yanetal``   "Cascade opt. (2)": 10 passes, k1 = ceil(0.80/Q), k2 = 5 k1, k_i = n/2.
* ``option7``   "Cascade opt. (7)": 14 passes, k1 = 2^ceil(log2(1/Q)), k2 = 4 k1,
  k_i = n/2, with sub-block reuse (every parity ever learnt joins the cascade).
* ``option8``   "Cascade opt. (8)": 14 passes, a = log2(1/Q) - 1/2, k1 = 2^ceil(a),
  k2 = 2^ceil((a + 12)/2), k3 = 4096, k_i = n/2, with sub-block reuse.

How the binary searches are laid out: every block of pass p is embedded in a slot of
K_p = 2^ceil(log2 k_p) leaves (the tail is zero padding, equal on both sides), so every
sub-block a binary search can ask about is a node of a complete binary tree. A node is
named by one integer id (pass, level, frame, index), which is all a query carries.
Padding-only nodes are known to both sides for free; a right child's parity follows
from its parent and left sibling and is never asked for.

Concurrency: within one frame, searches run in parallel only inside one pass, whose
blocks are disjoint, so the run equals a sequential Cascade that happens to process
those blocks back to back. Frames are independent and all advance together, which is
what makes it fast: each round trip carries the queries of every frame.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from qkd.sim import messages as m

VARIANTS = ("original", "yanetal", "option7", "option8")
_MIN_QBER = 1e-5


def block_sizes(variant: str, qber: float, n: int) -> list[int]:
    q = max(qber, _MIN_QBER)
    half = max(n // 2, 1)
    if variant == "original":
        k1 = math.ceil(0.73 / q)
        sizes = [k1 * 2**i for i in range(4)]
    elif variant == "yanetal":
        k1 = math.ceil(0.80 / q)
        sizes = [k1, 5 * k1] + [half] * 8
    elif variant == "option7":
        k1 = 2 ** math.ceil(math.log2(1.0 / q))
        sizes = [k1, 4 * k1] + [half] * 12
    elif variant == "option8":
        a = math.log2(1.0 / q) - 0.5
        sizes = [2 ** math.ceil(a), 2 ** math.ceil((a + 12.0) / 2.0), 4096] + [half] * 11
    else:
        raise ValueError(f"unknown Cascade variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return [max(1, min(k, n)) for k in sizes]


def reuses_subblocks(variant: str) -> bool:
    return variant in ("option7", "option8")


@dataclass
class _Pass:
    k: int  # block size
    K: int  # padded block slot (power of two)
    D: int  # tree depth: log2 K
    nb: int  # blocks per frame
    width0: int  # leaves per frame = nb * K
    seg: np.ndarray  # global id of (level d, frame 0, index 0), d = 0..D
    leaf_of_orig: np.ndarray  # original position -> padded leaf
    orig_of_leaf: np.ndarray  # padded leaf -> original position (-1 = padding)
    gather: np.ndarray  # orig_of_leaf with padding mapped to n (a zero column)


class _Layout:
    """Node numbering shared by both parties (derived from CascadeHello only)."""

    def __init__(self, variant: str, qber: float, n: int, frames: int, seed: int) -> None:
        self.variant, self.n, self.frames = variant, n, frames
        self.sizes = block_sizes(variant, qber, n)
        rng = np.random.default_rng(seed)
        self.passes: list[_Pass] = []
        offset = 0
        seg_starts, seg_pass, seg_level, seg_width = [], [], [], []
        for p, k in enumerate(self.sizes):
            d_p = max(0, (k - 1).bit_length())
            big_k = 1 << d_p
            nb = -(-n // k)
            width0 = nb * big_k
            # Pass 1 keeps the natural order (errors are iid); later passes shuffle.
            order = np.arange(n) if p == 0 else rng.permutation(n)
            pos = np.empty(n, np.int64)
            pos[order] = np.arange(n)
            leaf_of_orig = (pos // k) * big_k + pos % k
            orig_of_leaf = np.full(width0, -1, np.int64)
            orig_of_leaf[leaf_of_orig] = np.arange(n)
            seg = np.empty(d_p + 1, np.int64)
            for d in range(d_p + 1):
                seg[d] = offset
                seg_starts.append(offset)
                seg_pass.append(p)
                seg_level.append(d)
                seg_width.append(width0 >> d)
                offset += frames * (width0 >> d)
            gather = np.where(orig_of_leaf < 0, n, orig_of_leaf).astype(np.intp)
            self.passes.append(
                _Pass(k, big_k, d_p, nb, width0, seg, leaf_of_orig, orig_of_leaf, gather)
            )
        self.total_nodes = offset
        depth = max(ps.D for ps in self.passes) + 1
        self.seg_tab = np.zeros((len(self.passes), depth), np.int64)
        for p, ps in enumerate(self.passes):
            self.seg_tab[p, : ps.D + 1] = ps.seg
        self.width_tab = np.array([ps.width0 for ps in self.passes], np.int64)
        self.orig_off = np.cumsum([0] + [ps.width0 for ps in self.passes])[:-1]
        self.orig_cat = np.concatenate([ps.orig_of_leaf for ps in self.passes])
        self.seg_starts = np.array(seg_starts, np.int64)
        self.seg_pass = np.array(seg_pass, np.int64)
        self.seg_level = np.array(seg_level, np.int64)
        self.seg_width = np.array(seg_width, np.int64)

    def decode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        s = np.searchsorted(self.seg_starts, ids, side="right") - 1
        rel = ids - self.seg_starts[s]
        w = self.seg_width[s]
        return self.seg_pass[s], self.seg_level[s], rel // w, rel % w

    def padding_mask(self, p: int, d: int) -> np.ndarray:
        """Nodes of level d (one frame) that cover padding only."""
        ps = self.passes[p]
        c = np.arange(ps.width0 >> d, dtype=np.int64)
        start = c << d
        blk = start >> ps.D
        in_blk = start & (ps.K - 1)
        real = np.where(blk == ps.nb - 1, self.n - (ps.nb - 1) * ps.k, ps.k)
        return in_blk >= real

    def leaves(self, bits: np.ndarray, p: int) -> np.ndarray:
        """Bits of every frame in pass-p leaf order, zero padded: (frames, width0)."""
        ps = self.passes[p]
        if ps.k == ps.K and ps.nb * ps.k == self.n and p == 0:
            return np.ascontiguousarray(bits, dtype=np.uint8)
        # Gathering through an index with a zero column for padding beats a scatter ~3x.
        ext = np.zeros((bits.shape[0], self.n + 1), np.uint8)
        ext[:, : self.n] = bits
        return ext[:, ps.gather]

    def tree(self, bits: np.ndarray, p: int, out: np.ndarray) -> None:
        """Write the parity tree of pass p for `bits` (frames x n) into `out` (global ids)."""
        ps = self.passes[p]
        level = self.leaves(bits, p).ravel()
        out[ps.seg[0] : ps.seg[0] + level.size] = level
        for d in range(1, ps.D + 1):
            # Rows have even width below the top level, so pairs never straddle frames;
            # XOR of the two bytes of each uint16 is one contiguous pass.
            v = level.view(np.uint16)
            level = (v ^ (v >> 8)).astype(np.uint8)
            out[ps.seg[d] : ps.seg[d] + level.size] = level

    def prefix(self, bits: np.ndarray, p: int) -> np.ndarray:
        """Running parity of each frame in pass-p leaf order, with a leading 0 column."""
        ps = self.passes[p]
        out = np.zeros((bits.shape[0], ps.width0 + 1), np.uint8)
        np.bitwise_xor.accumulate(self.leaves(bits, p), axis=1, out=out[:, 1:])
        return out


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    # numpy's hash-based unique is slow for the many small arrays used here.
    a = np.sort(a)
    if a.size > 1:
        a = a[np.concatenate(([True], a[1:] != a[:-1]))]
    return a


def _ids_for(layout: _Layout, p: np.ndarray, d: np.ndarray, f: np.ndarray,
             c: np.ndarray) -> np.ndarray:
    return layout.seg_tab[p, d] + f * (layout.width_tab[p] >> d) + c


class CascadeAlice:
    """Alice's side: answers parity requests from her (never modified) frames.

    Her bits never change, so a running parity per pass answers any node in O(1).
    """

    def __init__(self, frames: np.ndarray) -> None:
        self._bits = np.ascontiguousarray(frames, np.uint8)
        self._layout: _Layout | None = None
        self._prefix: dict[int, np.ndarray] = {}
        self._out: deque[bytes] = deque()
        self.revealed_bits = 0
        self.done = False
        self.bob_reported_leak: int | None = None

    def receive_message(self, data: bytes, now: float = 0.0) -> None:
        msg = m.decode(data)
        if isinstance(msg, m.CascadeHello):
            f, n = self._bits.shape
            if msg.frame_bits != n or msg.frames != f:
                raise m.MessageError(f"Cascade layout {msg.frames}x{msg.frame_bits} does not "
                                     f"match Alice's {f}x{n} frames")
            if msg.variant not in VARIANTS:
                raise m.MessageError(f"unknown Cascade variant {msg.variant!r}")
            self._layout = _Layout(msg.variant, msg.qber_estimate, n, f, msg.seed)
            return
        lay = self._layout
        if lay is None:
            raise m.MessageError("Cascade message before CascadeHello")
        if isinstance(msg, m.PassRequest):
            if not 0 <= msg.index < len(lay.passes):
                raise m.MessageError("pass index out of range")
            ps = lay.passes[msg.index]
            pre = self._prefix.setdefault(msg.index, lay.prefix(self._bits, msg.index))
            edges = np.arange(ps.nb + 1) * ps.K
            par = pre[:, edges[1:]] ^ pre[:, edges[:-1]]
            self._send(m.ParityReply(par.ravel()))
        elif isinstance(msg, m.ParityQuery):
            ids = msg.nodes
            if ids.size and (ids.min() < 0 or ids.max() >= lay.total_nodes):
                raise m.MessageError("parity query for a node outside the layout")
            p, d, f, c = lay.decode(ids)
            out = np.empty(ids.size, np.uint8)
            for pi in _sorted_unique(p):
                pre = self._prefix.get(int(pi))
                if pre is None:
                    raise m.MessageError("parity query for a pass not started")
                s = p == pi
                lo = c[s] << d[s]
                hi = np.minimum(lo + (np.int64(1) << d[s]), pre.shape[1] - 1)
                out[s] = pre[f[s], hi] ^ pre[f[s], lo]
            self._send(m.ParityReply(out))
        elif isinstance(msg, m.CascadeDone):
            self.bob_reported_leak = msg.leaked_bits
            self.done = True
        else:
            raise m.MessageError(f"unexpected {type(msg).__name__} during Cascade")

    def _send(self, msg: m.Message) -> None:
        self.revealed_bits += msg.revealed_bits()
        self._out.append(msg.encode())

    def messages_to_send(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        return out


class CascadeBob:
    """Bob's side: drives the passes and binary searches and corrects his frames."""

    def __init__(self, frames: np.ndarray, qber_estimate: float, variant: str = "option8",
                 seed: int = 0) -> None:
        if variant not in VARIANTS:
            raise ValueError(
                f"unknown Cascade variant {variant!r}; choose from {', '.join(VARIANTS)}")
        self.bits = np.array(frames, dtype=np.uint8, copy=True)
        f, n = self.bits.shape
        self.variant = variant
        self.reuse = reuses_subblocks(variant)
        self.layout = _Layout(variant, qber_estimate, n, f, seed)
        self._hello = m.CascadeHello(variant, float(qber_estimate), n, f, seed)
        self.revealed_bits = 0  # parities received from Alice
        self.leak_per_frame = np.zeros(f, np.int64)
        self.round_trips = 0
        self.done = False
        self._out: deque[bytes] = deque()
        self._gen = self._run()
        self._emit(next(self._gen))

    # sans-I/O surface -----------------------------------------------------------------

    def messages_to_send(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        return out

    def receive_message(self, data: bytes, now: float = 0.0) -> None:
        msg = m.decode(data)
        if not isinstance(msg, m.ParityReply):
            raise m.MessageError(f"unexpected {type(msg).__name__} during Cascade")
        self.revealed_bits += msg.revealed_bits()
        self.round_trips += 1
        try:
            self._emit(self._gen.send(msg))
        except StopIteration:
            self.done = True
            self._out.append(m.CascadeDone(self.revealed_bits).encode())

    def _emit(self, msg: m.Message) -> None:
        self._out.append(msg.encode())

    # the protocol ---------------------------------------------------------------------

    def _run(self) -> Generator[m.Message, m.ParityReply, None]:
        lay = self.layout
        f_count = lay.frames
        total = lay.total_nodes
        self._bpar = np.zeros(total, np.uint8)  # Bob's parities
        self._apar = np.zeros(total, np.uint8)  # Alice's parities as learnt
        self._known = np.zeros(total, bool)
        self._started: list[int] = []
        # The hello rides with the first pass request (Alice needs the layout first).
        self._out.append(self._hello.encode())
        for p in range(len(lay.passes)):
            ps = lay.passes[p]
            reply = yield m.PassRequest(p)
            top0 = int(ps.seg[ps.D])
            ntop = f_count * ps.nb
            if reply.bits.size != ntop:
                raise m.MessageError("pass parity reply of the wrong length")
            lay.tree(self.bits, p, self._bpar)
            for d in range(ps.D + 1):
                pad = lay.padding_mask(p, d)
                if pad.any():
                    w = ps.width0 >> d
                    ids = (ps.seg[d] + np.arange(f_count)[:, None] * w
                           + np.flatnonzero(pad)[None, :]).ravel()
                    self._known[ids] = True
            self.leak_per_frame += ps.nb
            self._apar[top0 : top0 + ntop] = reply.bits
            self._known[top0 : top0 + ntop] = True
            self._started.append(p)
            top_ids = np.arange(top0, top0 + ntop)
            odd = top_ids[self._apar[top_ids] != self._bpar[top_ids]]
            while odd.size:
                odd = yield from self._correct(odd)

    def _correct(self, odd: np.ndarray) -> Generator[m.Message, m.ParityReply, np.ndarray]:
        """One batch: per frame, search every odd node of the lowest pass that has one."""
        lay = self.layout
        known, apar, bpar = self._known, self._apar, self._bpar
        p, d, f, c = lay.decode(odd)
        minp = np.full(lay.frames, len(lay.passes), np.int64)
        np.minimum.at(minp, f, p)
        sel = p == minp[f]
        rest = odd[~sel]
        cur, p, d, f, c = odd[sel], p[sel], d[sel], f[sel], c[sel]
        learned: list[np.ndarray] = []
        while True:
            # Descend for free while the left child's parity is known.
            while True:
                act = np.flatnonzero(d > 0)
                if act.size == 0:
                    break
                left = _ids_for(lay, p[act], d[act] - 1, f[act], 2 * c[act])
                kn = known[left]
                if not kn.any():
                    break
                a = act[kn]
                lft = left[kn]
                rgt = lft + 1
                go_left = (apar[lft] ^ bpar[lft]).astype(bool)
                new_r = ~known[rgt] & ~go_left
                if new_r.any():
                    r_ids = rgt[new_r]
                    apar[r_ids] = apar[cur[a][new_r]] ^ apar[lft[new_r]]
                    known[r_ids] = True
                    learned.append(r_ids)
                cur[a] = np.where(go_left, lft, rgt)
                d[a] -= 1
                c[a] = 2 * c[a] + (~go_left)
            act = np.flatnonzero(d > 0)
            if act.size == 0:
                break
            left = _ids_for(lay, p[act], d[act] - 1, f[act], 2 * c[act])
            ask = _sorted_unique(left[~known[left]])
            reply = yield m.ParityQuery(ask)
            if reply.bits.size != ask.size:
                raise m.MessageError("parity reply of the wrong length")
            apar[ask] = reply.bits
            np.add.at(self.leak_per_frame, lay.decode(ask)[2], 1)
            known[ask] = True
            learned.append(ask)
        # Leaves found: flip each distinct (frame, position) once.
        pos = lay.orig_cat[lay.orig_off[p] + c]
        key = _sorted_unique(f * lay.n + pos)
        ff, jj = key // lay.n, key % lay.n
        self.bits[ff, jj] ^= 1
        toggled = self._toggle(ff, jj)
        if not self.reuse and learned:
            # The original protocol forgets sub-block parities after each search.
            forget = np.concatenate(learned)
            known[forget] = False
        cand = np.concatenate([rest, toggled])
        cand = cand[known[cand]]
        cand = cand[apar[cand] != bpar[cand]]
        return _sorted_unique(cand)

    def _toggle(self, ff: np.ndarray, jj: np.ndarray) -> np.ndarray:
        """Flip Bob's parity of every node containing the corrected bits; return those ids."""
        lay = self.layout
        parts = []
        for p in self._started:
            ps = lay.passes[p]
            leaf = ps.leaf_of_orig[jj]
            lv = np.arange(ps.D + 1)[:, None]
            ids = ps.seg[lv] + ff[None, :] * (ps.width0 >> lv) + (leaf[None, :] >> lv)
            parts.append(ids.ravel())
        ids = np.concatenate(parts)
        np.bitwise_xor.at(self._bpar, ids, np.uint8(1))
        return ids


@dataclass
class ReconcileResult:
    corrected: np.ndarray
    leaked_bits: int
    leak_per_frame: np.ndarray
    round_trips: int
    messages: int
    bytes_exchanged: int


def reconcile_frames(alice: np.ndarray, bob: np.ndarray, qber_estimate: float,
                     variant: str = "option8", seed: int = 0) -> ReconcileResult:
    """Run both parties in memory, passing the encoded messages between them."""
    a = CascadeAlice(alice)
    b = CascadeBob(bob, qber_estimate, variant, seed)
    messages = 0
    nbytes = 0
    while not b.done:
        for data in b.messages_to_send():
            messages += 1
            nbytes += len(data)
            a.receive_message(data)
        for data in a.messages_to_send():
            messages += 1
            nbytes += len(data)
            b.receive_message(data)
    for data in b.messages_to_send():
        messages += 1
        nbytes += len(data)
        a.receive_message(data)
    if a.revealed_bits != b.revealed_bits:
        raise AssertionError("Alice and Bob disagree on the revealed bit count")
    return ReconcileResult(b.bits, b.revealed_bits, b.leak_per_frame, b.round_trips, messages,
                           nbytes)
