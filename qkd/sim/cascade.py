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
sub-block a binary search can ask about is a node of a complete binary tree. On the
wire a node is one integer id (pass, level, frame, index; see `_Layout`). Padding-only
nodes are known to both sides for free; a right child's parity follows from its parent
and left sibling and is never asked for.

What each frame does is exactly the sequential algorithm: pass after pass, ask the
top-level block parities, then repeat "search every odd block of the lowest pass that
has one (these are disjoint, so in parallel), flip the errors found, collect the blocks
of all passes whose parity the flips made odd" until no known block is odd. Frames are
independent and each advances at its own pace: a round trip carries whatever every
frame needs next (a pass opening or the next sub-block of each open search), so the
number of round trips is that of the slowest frame, not the sum of per-batch maxima,
and the result of a frame does not depend on which frames run with it.

Data layout: Bob's parities (his own, Alice's as learnt, and which are known) are
bit-sliced, one bit per frame: row r of an (rows, ceil(frames/64)) uint64 array holds
node r of every frame. Building a pass's tree is then a gather of packed rows and a
few XORs, and Alice answers any node from a bit-sliced running parity per pass.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from qkd import native
from qkd.sim import messages as m
from qkd.sim.constants import CASCADE_MIN_QBER, CASCADE_VARIANTS

VARIANTS = CASCADE_VARIANTS  # the name callers and tests use
_BIT = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))  # _BIT[i] = 1 << i
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
# Test-only: skip the consistency checks on Alice's replies, to show that without them
# a hostile reply keeps Bob busy forever (the positive control of the hang test).
_TEST_TRUST_PARITIES = False


def block_sizes(variant: str, qber: float, n: int) -> list[int]:
    q = max(qber, CASCADE_MIN_QBER)
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
    leaf_of_orig: np.ndarray  # original position -> padded leaf
    gather: np.ndarray  # padded leaf -> original position, padding mapped to n (a zero row)


class _Layout:
    """Node numbering shared by both parties (derived from CascadeHello only).

    Node (pass p, level d, frame f, index c), level 0 = leaves:
      wire id  = seg[p, d] + f * wid[p, d] + c   (wid = width0_p >> d; segments in order
                 of pass then level, frames side by side inside a segment)
      row      = rowbase[p, d] + c              (bit-sliced arrays, bit f of the row)
    """

    def __init__(self, variant: str, qber: float, n: int, frames: int, seed: int) -> None:
        self.variant, self.n, self.frames = variant, n, frames
        self.words = (frames + 63) // 64
        self.sizes = block_sizes(variant, qber, n)
        rng = np.random.default_rng(seed)
        self.passes: list[_Pass] = []
        for p, k in enumerate(self.sizes):
            d_p = max(0, (k - 1).bit_length())
            big_k = 1 << d_p
            nb = -(-n // k)
            width0 = nb * big_k
            # Pass 1 keeps the natural order (errors are iid); later passes shuffle.
            order = np.arange(n) if p == 0 else rng.permutation(n)
            pos = np.empty(n, np.int64)
            pos[order] = np.arange(n)
            # Real bits sit in the slot by balanced halving (ceil(k/2) left, floor(k/2)
            # right, recursively), so the tree's bisection is the protocol's BINARY on
            # the real block; a prefix layout split 73 bits as 64 | 9 and asked more.
            real_last = n - (nb - 1) * k
            tab, tab_last = _balanced_leaves(k, d_p), _balanced_leaves(real_last, d_p)
            blk, off = pos // k, pos % k
            in_last = tab_last[np.minimum(off, real_last - 1)]
            leaf_of_orig = blk * big_k + np.where(blk == nb - 1, in_last, tab[off])
            gather = np.full(width0, n, np.intp)
            gather[leaf_of_orig] = np.arange(n)
            self.passes.append(_Pass(k, big_k, d_p, nb, width0, leaf_of_orig, gather))
        npass = len(self.passes)
        depth = max(ps.D for ps in self.passes) + 1
        self.seg = np.zeros((npass, depth), np.int64)
        self.wid = np.ones((npass, depth), np.int64)
        self.rowbase = np.zeros((npass, depth), np.int64)
        s_p, s_d, s_id, s_row = [], [], [], []
        id_off = row_off = 0
        for p, ps in enumerate(self.passes):
            for d in range(ps.D + 1):
                w = ps.width0 >> d
                self.seg[p, d], self.wid[p, d], self.rowbase[p, d] = id_off, w, row_off
                s_p.append(p)
                s_d.append(d)
                s_id.append(id_off)
                s_row.append(row_off)
                id_off += frames * w
                row_off += w
        self.total_ids, self.total_rows = id_off, row_off
        self.seg_p = np.array(s_p, np.int64)
        self.seg_d = np.array(s_d, np.int64)
        self.seg_id = np.array(s_id, np.int64)
        self.seg_row = np.array(s_row, np.int64)
        self.depth = depth
        self.rowbase_flat = self.rowbase.ravel()
        self.seg_flat = self.seg.ravel()
        self.wid_flat = self.wid.ravel()
        self.nb = np.array([ps.nb for ps in self.passes], np.int64)
        self.kk = np.array([ps.K for ps in self.passes], np.int64)
        self.width0 = np.array([ps.width0 for ps in self.passes], np.int64)
        self.top_level = np.array([ps.D for ps in self.passes], np.int64)
        self.leaf_tab = np.stack([ps.leaf_of_orig for ps in self.passes])  # (passes, n)
        self.leaf_flat = np.ascontiguousarray(self.leaf_tab.ravel(), np.int64)
        # prefix rows per pass (Alice): width0 + 1 rows each
        self.pre_base = np.concatenate(([0], np.cumsum(self.width0 + 1)[:-1])).astype(np.int64)
        self.pre_rows = int((self.width0 + 1).sum())
        # per segment: width, first prefix row of its pass, pass width, node size
        self.seg_w = self.wid[self.seg_p, self.seg_d]
        self.seg_pre = self.pre_base[self.seg_p]
        self.seg_w0 = self.width0[self.seg_p]
        self.seg_step = np.left_shift(1, self.seg_d)
        # leaf (pass, c) -> original position, for the corrections
        self.orig_off = np.concatenate(([0], np.cumsum(self.width0)[:-1])).astype(np.int64)
        self.orig_cat = np.concatenate([np.where(ps.gather == n, -1, ps.gather)
                                        for ps in self.passes]).astype(np.int64)

    # numbering -----------------------------------------------------------------------

    def ids(self, p: np.ndarray, d: np.ndarray, f: np.ndarray, c: np.ndarray) -> np.ndarray:
        return self.seg[p, d] + f * self.wid[p, d] + c

    def decode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        s = np.searchsorted(self.seg_id, ids, side="right") - 1
        rel = ids - self.seg_id[s]
        w = self.wid[self.seg_p[s], self.seg_d[s]]
        return self.seg_p[s], self.seg_d[s], rel // w, rel % w

    def decode_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = np.searchsorted(self.seg_row, rows, side="right") - 1
        return self.seg_p[s], self.seg_d[s], rows - self.seg_row[s]

    def padding_rows(self) -> np.ndarray:
        """Rows of nodes that cover padding only (the same in every frame)."""
        out = []
        for p, ps in enumerate(self.passes):
            real = np.zeros(ps.width0, np.int64)
            real[ps.leaf_of_orig] = 1
            for d in range(ps.D + 1):
                if d:
                    real = real[0::2] + real[1::2]
                out.append(self.rowbase[p, d] + np.flatnonzero(real == 0))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    # bit-sliced data -----------------------------------------------------------------

    def packed(self, bits: np.ndarray) -> np.ndarray:
        """(n + 1, words) uint64: bit f of row j is bits[f, j]; row n is zero padding."""
        n = bits.shape[1]
        nat = native.load("cascade")
        if nat is not None:
            out = np.empty((n + 1, self.words), np.uint64)
            nat.pack(np.ascontiguousarray(bits, np.uint8), bits.shape[0], n, out)
            return out
        # Pack along the contiguous axis of the transpose: packing down axis 0 strides
        # across frames and cost seconds for 2048 frames.
        by = np.packbits(np.ascontiguousarray(bits.T), axis=1, bitorder="little")
        buf = np.zeros((n + 1, self.words * 8), np.uint8)
        buf[:n, : by.shape[1]] = by
        return buf.view("<u8").astype(np.uint64, copy=False)

    def tree(self, pk: np.ndarray, p: int, out: np.ndarray) -> None:
        """Write pass p's parity tree of the packed bits into rows of `out`."""
        ps = self.passes[p]
        level = pk[ps.gather]
        r = self.rowbase[p, 0]
        out[r : r + level.shape[0]] = level
        for d in range(1, ps.D + 1):
            level = level[0::2] ^ level[1::2]
            r = self.rowbase[p, d]
            out[r : r + level.shape[0]] = level

    def prefix(self, pk: np.ndarray, p: int, out: np.ndarray) -> None:
        """Running parity over pass-p leaves (leading zero row) into rows of `out`."""
        ps = self.passes[p]
        b = self.pre_base[p]
        out[b] = 0
        np.bitwise_xor.accumulate(pk[ps.gather], axis=0, out=out[b + 1 : b + 1 + ps.width0])


@functools.lru_cache(maxsize=64)
def _balanced_leaves(k: int, depth: int) -> np.ndarray:
    """Leaf index (in a 2^depth slot) of each of k real positions, halving as BINARY
    does: the first ceil(size/2) positions of every node go to its left child."""
    i = np.arange(k, dtype=np.int64)
    size = np.full(k, k, np.int64)
    leaf = np.zeros(k, np.int64)
    for lvl in range(depth - 1, -1, -1):
        h = (size + 1) // 2
        right = i >= h
        leaf += right.astype(np.int64) << lvl
        i = np.where(right, i - h, i)
        size = np.where(right, size - h, h)
    # Cached (every layout asks for the same few sizes): callers only read it.
    leaf.flags.writeable = False
    return leaf


_OR, _XOR, _AND = 0, 1, 2
_UFUNC = {_OR: np.bitwise_or, _XOR: np.bitwise_xor, _AND: np.bitwise_and}


def _scatter(nat: object, op: int, arr: np.ndarray, idx: np.ndarray, val: np.ndarray) -> None:
    """arr[idx] op= val, repeated indices applied one by one (numpy's ufunc.at)."""
    if nat is None:
        _UFUNC[op].at(arr, idx, val)
    elif idx.size:
        nat.scatter(op, arr, np.ascontiguousarray(idx, np.int64),  # type: ignore[attr-defined]
                    np.ascontiguousarray(val, np.uint64))


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    # numpy's hash-based unique is slow for the many small arrays used here.
    a = np.sort(a)
    if a.size > 1:
        a = a[np.concatenate(([True], a[1:] != a[:-1]))]
    return a


class CascadeAlice:
    """Alice's side: answers parity requests from her (never modified) frames.

    Her bits never change, so a running parity per pass answers any node in O(1).
    """

    def __init__(self, frames: np.ndarray) -> None:
        self._bits = np.ascontiguousarray(frames, np.uint8)
        self._layout: _Layout | None = None
        self._out: deque[bytes] = deque()
        self.revealed_bits = 0
        self.done = False
        self.bob_reported_leak: int | None = None
        # The compiled answer (qkd/native/cascade.c), or None: the numpy reference.
        self._nat = native.load("cascade")

    def receive_message(self, data: bytes, now: float = 0.0) -> None:
        self.receive_decoded(m.decode(data), now)

    def receive_decoded(self, msg: m.Message, now: float = 0.0) -> None:
        """receive_message for a message its caller already decoded (decode once)."""
        if isinstance(msg, m.CascadeHello):
            f, n = self._bits.shape
            if msg.frame_bits != n or msg.frames != f:
                raise m.MessageError(f"Cascade layout {msg.frames}x{msg.frame_bits} does not "
                                     f"match Alice's {f}x{n} frames")
            if msg.variant not in VARIANTS:
                raise m.MessageError(f"unknown Cascade variant {msg.variant!r}")
            if self._layout is not None:
                raise m.MessageError("second CascadeHello")
            lay = _Layout(msg.variant, msg.qber_estimate, n, f, msg.seed)
            self._layout = lay
            self._packed = lay.packed(self._bits)
            self._pre = np.zeros((lay.pre_rows, lay.words), np.uint64)
            self._pre_ready = np.zeros(len(lay.passes), bool)
            self._opened = np.zeros((f, len(lay.passes)), bool)
            return
        lay = self._layout
        if lay is None:
            raise m.MessageError("Cascade message before CascadeHello")
        if isinstance(msg, m.ParityQuery):
            self._send(m.ParityReply(self._answer(lay, msg)))
        elif isinstance(msg, m.CascadeDone):
            self.bob_reported_leak = msg.leaked_bits
            self.done = True
        else:
            raise m.MessageError(f"unexpected {type(msg).__name__} during Cascade")

    def _answer(self, lay: _Layout, msg: m.ParityQuery) -> np.ndarray:
        of, op, ids = msg.opens_frame, msg.opens_pass, msg.nodes
        npass = len(lay.passes)
        if of.size:
            if min(of.min(), op.min()) < 0 or of.max() >= lay.frames or op.max() >= npass:
                raise m.MessageError("pass opening for a frame or pass outside the layout")
            if self._opened[of, op].any() or np.unique(of * npass + op).size != of.size:
                raise m.MessageError("pass opened twice")
            for p in np.unique(op):
                self._ensure_prefix(lay, int(p))
            self._opened[of, op] = True
        if self._nat is not None:
            return self._answer_native(lay, of, op, ids)
        if of.size:
            # every top-level block of each opened (frame, pass), in order
            cnt = lay.nb[op]
            tp = np.repeat(op, cnt)
            tf = np.repeat(of, cnt)
            blk = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            lo = blk * lay.kk[tp]
            top = self._parity(lay, tp, tf, lo, lo + lay.kk[tp])
        else:
            top = np.zeros(0, np.uint8)
        if ids.size:
            if ids[0] < 0 or ids[-1] >= lay.total_ids or (np.diff(ids) <= 0).any():
                raise m.MessageError("parity query for a node outside the layout")
            s = np.searchsorted(lay.seg_id, ids, side="right") - 1
            f, c = np.divmod(ids - lay.seg_id[s], lay.seg_w[s])
            if not self._opened[f, lay.seg_p[s]].all():
                raise m.MessageError("parity query for a pass not started")
            lo = c << lay.seg_d[s]
            hi = np.minimum(lo + lay.seg_step[s], lay.seg_w0[s])
            base = lay.seg_pre[s]
            nodes = self._parity_rows(base + lo, base + hi, f)
        else:
            nodes = np.zeros(0, np.uint8)
        return np.concatenate((top, nodes))

    def _answer_native(self, lay: _Layout, of: np.ndarray, op: np.ndarray,
                       ids: np.ndarray) -> np.ndarray:
        """_answer's parities in one compiled call (same bits, same refusals)."""
        out = np.empty(int(lay.nb[op].sum()) + ids.size, np.uint8)
        code = self._nat.answer(  # type: ignore[attr-defined]
            self._pre, lay.words, np.ascontiguousarray(of, np.int64),
            np.ascontiguousarray(op, np.int64), lay.pre_base, lay.nb, lay.kk,
            np.ascontiguousarray(ids, np.int64), lay.seg_id, lay.seg_w, lay.seg_p,
            lay.seg_d, lay.seg_pre, lay.seg_w0, self._opened, lay.frames,
            len(lay.passes), lay.total_ids, out)
        if code == 1:
            raise m.MessageError("parity query for a node outside the layout")
        if code == 2:
            raise m.MessageError("parity query for a pass not started")
        return out

    def _ensure_prefix(self, lay: _Layout, p: int) -> None:
        if not self._pre_ready[p]:
            lay.prefix(self._packed, p, self._pre)
            self._pre_ready[p] = True

    def _parity(self, lay: _Layout, p: np.ndarray, f: np.ndarray, lo: np.ndarray,
                hi: np.ndarray) -> np.ndarray:
        base = lay.pre_base[p]
        return self._parity_rows(base + lo, base + hi, f)

    def _parity_rows(self, lo: np.ndarray, hi: np.ndarray, f: np.ndarray) -> np.ndarray:
        """Bit f of prefix row hi xor prefix row lo: the parity of frame f's leaves
        lo..hi-1 (rows of the concatenated per-pass prefixes)."""
        x = self._pre.reshape(-1)
        w = self._layout.words if self._layout is not None else 1
        if w == 1:
            v = x[hi] ^ x[lo]
        else:
            fw = f >> 6
            v = x[hi * w + fw] ^ x[lo * w + fw]
        return ((v >> (f & 63).astype(np.uint64)) & np.uint64(1)).astype(np.uint8)

    def _send(self, msg: m.Message) -> None:
        self.revealed_bits += msg.revealed_bits()
        self._out.append(msg.encode())

    def messages_to_send(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        return out


_E64 = np.zeros(0, np.int64)
_EU64 = np.zeros(0, np.uint64)


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
        # Once Alice's replies have been refused, the protocol is over: a later reply
        # must not be read as the end of a finished run (that would report done).
        self._failed = False
        # Bits already corrected, per frame. An honest Alice's parities make a search
        # end only on a bit in error, which the flip then makes right; a second flip of
        # the same bit means her answers contradict each other, and letting it happen
        # lets a hostile peer keep Bob flipping forever.
        self._flipped = np.zeros((f, n), bool)
        # The compiled walk and scatters (qkd/native/cascade.c), or None: the numpy
        # reference below, which the tests compare with it message for message.
        self._nat = native.load("cascade")
        self._out: deque[bytes] = deque()
        self._gen = self._run()
        self._emit(next(self._gen))

    # sans-I/O surface -----------------------------------------------------------------

    def messages_to_send(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        return out

    def receive_message(self, data: bytes, now: float = 0.0) -> None:
        self.receive_decoded(m.decode(data), now)

    def receive_decoded(self, msg: m.Message, now: float = 0.0) -> None:
        """receive_message for a message its caller already decoded (decode once)."""
        if not isinstance(msg, m.ParityReply):
            raise m.MessageError(f"unexpected {type(msg).__name__} during Cascade")
        if self.done:
            raise m.MessageError("parity reply after Cascade finished")
        if self._failed:
            raise m.MessageError("parity reply after Cascade was aborted")
        self.revealed_bits += msg.revealed_bits()
        self.round_trips += 1
        try:
            self._emit(self._gen.send(msg))
        except StopIteration:
            self.done = True
            self._out.append(m.CascadeDone(self.revealed_bits).encode())
        except BaseException:
            self._failed = True
            raise

    def _emit(self, msg: m.Message) -> None:
        self._out.append(msg.encode())

    # Bit-sliced state: node (row, frame f) is bit f & 63 of word row * W + (f >> 6) of
    # self._bp (Bob's parity), self._ap (Alice's, as learnt) and self._kn (known).

    def _learn(self, idx: np.ndarray, bit: np.ndarray, f: np.ndarray,
               values: np.ndarray) -> None:
        """Record Alice's parities of previously unknown nodes (asked or inferred)."""
        one = values.astype(bool)
        nat = self._nat
        _scatter(nat, _OR, self._ap, idx[one], bit[one])
        _scatter(nat, _OR, self._kn, idx, bit)
        _scatter(nat, _OR, self._dk, idx, bit)
        if not self.reuse:
            self._learned.append((idx, bit, f))

    # the protocol ---------------------------------------------------------------------

    def _run(self) -> Generator[m.Message, m.ParityReply, None]:
        lay = self.layout
        nf, npass, w = lay.frames, len(lay.passes), lay.words
        self._w = w
        # Bob's parities: pass p's tree is built from his current bits when the first
        # frame opens p and from then on kept current on every correction.
        self._pk = lay.packed(self.bits)  # his current bits, bit-sliced
        bp2 = np.zeros((lay.total_rows, w), np.uint64)
        self._bp2 = bp2
        self._bp = bp2.reshape(-1)
        self._ap = np.zeros(bp2.size, np.uint64)
        self._kn = np.zeros(bp2.size, np.uint64)
        # Disclosed (or inferred) sub-block parities, never forgotten: the original
        # variant drops sub-blocks from the cascade (`_kn`) after a batch, but a later
        # search through the same sub-block reuses Alice's parity instead of asking it
        # again. Asking twice reveals nothing new, and the leak is the number of
        # distinct parities disclosed, so re-asking only inflated the count (issue 15).
        self._dk = np.zeros(bp2.size, np.uint64)
        self._built = np.zeros(npass, bool)
        self._seg_built = np.zeros(lay.seg_p.size, bool)
        pad = lay.padding_rows()
        if pad.size:
            # padding: parity 0 on both sides, known to both
            self._kn.reshape(-1, w)[pad] = _ALL
            self._dk.reshape(-1, w)[pad] = _ALL
        self._learned: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        # Per frame: the pass it is in, whether it must open it next, whether it is done.
        self._fpass = np.zeros(nf, np.int64)
        self._need_open = np.ones(nf, bool)
        self._fdone = np.zeros(nf, bool)
        # Open searches still above the leaves: pass, level, frame, index.
        self._sp, self._sd, self._sf, self._sc = _E64, _E64, _E64, _E64
        # Searches that reached a leaf, waiting for the rest of their frame's batch.
        self._lp, self._lf, self._lc = _E64, _E64, _E64
        # Odd candidates waiting for a later batch of their frame: (row, frame).
        self._rr, self._rf = _E64, _E64
        # The hello rides with the first query (Alice needs the layout first).
        self._out.append(self._hello.encode())
        while True:
            self._settle()
            if self._fdone.all():
                return
            of = np.flatnonzero(self._need_open)
            op = self._fpass[of]
            new = op[~self._built[op]]
            if new.size:
                for p in np.unique(new):
                    lay.tree(self._pk, int(p), bp2)
                self._built[new] = True
                self._seg_built = self._built[lay.seg_p]
            sp, sd, sf, sc = self._sp, self._sd, self._sf, self._sc
            # After _settle every open search has an unknown left child: ask for it.
            sl = sp * lay.depth + sd - 1
            ids = lay.seg_flat[sl] + sf * lay.wid_flat[sl] + 2 * sc
            order = np.argsort(ids)
            ids = ids[order]
            first = np.ones(ids.size, bool)
            first[1:] = ids[1:] != ids[:-1]
            ask = ids[first]
            order = order[first]
            if not (ask.size or of.size):
                # Every frame waits on something, yet nothing is left to ask: only
                # replies that contradict each other get here.
                raise m.MessageError("Cascade made no progress: Alice's parities are "
                                     "inconsistent")
            reply = yield m.ParityQuery(ask, of, op)
            cnt = lay.nb[op]
            ntop = int(cnt.sum())
            if reply.bits.size != ntop + ask.size:
                raise m.MessageError("parity reply of the wrong length")
            self._need_open[of] = False
            if ask.size:
                f = sf[order]
                li = (lay.rowbase_flat[sl[order]] + 2 * sc[order]) * w + (f >> 6)
                self._learn(li, _BIT[f & 63], f, reply.bits[ntop:])
                self.leak_per_frame += np.bincount(f, minlength=nf)
            if of.size:
                tp = np.repeat(op, cnt)
                tf = np.repeat(of, cnt)
                blk = np.arange(ntop) - np.repeat(np.cumsum(cnt) - cnt, cnt)
                rows = lay.rowbase[tp, lay.top_level[tp]] + blk
                idx, bit = rows * w + (tf >> 6), _BIT[tf & 63]
                one = reply.bits[:ntop].astype(bool)
                _scatter(self._nat, _OR, self._ap, idx[one], bit[one])
                _scatter(self._nat, _OR, self._kn, idx, bit)
                _scatter(self._nat, _OR, self._dk, idx, bit)
                self.leak_per_frame[of] += cnt
                odd = ((self._ap[idx] ^ self._bp[idx]) & bit) != 0
                self._start_batches(of, rows[odd], tf[odd])

    def _settle(self) -> None:
        """Advance every frame as far as it can go without asking Alice anything."""
        nf = self.layout.frames
        while True:
            self._descend()
            if self._lf.size == 0:
                return
            ended = np.zeros(nf, bool)
            ended[self._lf] = True
            ended[self._sf] = False
            if not ended.any():
                return
            self._end_batches(np.flatnonzero(ended), ended)

    def _descend(self) -> None:
        """Walk open searches down while the left child's parity is already known;
        searches that reach a leaf move to the finished list."""
        lay, w = self.layout, self._w
        # Descent uses every parity Alice ever disclosed (`_dk` holds all of `_kn`).
        ap, bp, kn, rb = self._ap, self._bp, self._dk, self.layout.rowbase_flat
        p, d, f, c = self._sp, self._sd, self._sf, self._sc
        if p.size == 0:
            return
        if self._nat is not None:
            self._descend_native(p, d, f, c)
            return
        fw, bit = f >> 6, _BIT[f & 63]
        pb = p * lay.depth - 1  # rb[pb + d] = rowbase[p, d - 1]
        while True:
            li = (rb[pb + d] + 2 * c) * w + fw
            known = (kn[li] & bit) != 0
            # A left child whose right sibling is known (padding only) has the parent's
            # parity xor the sibling's: free, never asked.
            free_l = ~known & ((kn[li + w] & bit) != 0)
            if free_l.any():
                k = np.flatnonzero(free_l)
                ci = (rb[pb[k] + d[k] + 1] + c[k]) * w + fw[k]
                bk = bit[k]
                self._learn(li[k], bk, f[k], (ap[ci] ^ ap[li[k] + w]) & bk)
                known = known | free_l
            if not known.any():
                break
            # The left child is odd: the error is there; even: it is in the right one.
            right = known & (((ap[li] ^ bp[li]) & bit) == 0)
            # Going right into an unknown sibling: its parity is parent xor left, for free.
            ri = li + w
            new_r = right & ((kn[ri] & bit) == 0)
            if new_r.any():
                k = np.flatnonzero(new_r)
                ci = (rb[pb[k] + d[k] + 1] + c[k]) * w + fw[k]
                bk = bit[k]
                self._learn(ri[k], bk, f[k], (ap[ci] ^ ap[li[k]]) & bk)
            c = c + (c + right) * known
            d = d - known
            leaf = d == 0
            if leaf.any():
                self._lp = np.concatenate((self._lp, p[leaf]))
                self._lf = np.concatenate((self._lf, f[leaf]))
                self._lc = np.concatenate((self._lc, c[leaf]))
                stay = ~leaf
                p, d, f, c, fw, bit, pb = (p[stay], d[stay], f[stay], c[stay], fw[stay],
                                           bit[stay], pb[stay])
                if p.size == 0:
                    break
        self._sp, self._sd, self._sf, self._sc = p, d, f, c

    def _descend_native(self, p: np.ndarray, d: np.ndarray, f: np.ndarray,
                        c: np.ndarray) -> None:
        lay, ns = self.layout, p.size
        out = [np.empty(ns, np.int64) for _ in range(7)]
        xi = np.empty(2 * ns * lay.depth, np.int64)
        xf = np.empty_like(xi)
        nleft, nleaf, nlearn = self._nat.descend(  # type: ignore[union-attr]
            self._ap, self._bp, self._kn, self._dk, np.ascontiguousarray(lay.rowbase_flat),
            self._w, lay.depth, np.ascontiguousarray(p), np.ascontiguousarray(d),
            np.ascontiguousarray(f), np.ascontiguousarray(c), *out, xi, xf)
        self._sp, self._sd, self._sf, self._sc = (x[:nleft] for x in out[:4])
        if nleaf:
            self._lp = np.concatenate((self._lp, out[4][:nleaf]))
            self._lf = np.concatenate((self._lf, out[5][:nleaf]))
            self._lc = np.concatenate((self._lc, out[6][:nleaf]))
        if nlearn and not self.reuse:
            lf = xf[:nlearn]
            self._learned.append((xi[:nlearn], _BIT[lf & 63], lf))

    def _end_batches(self, ended: np.ndarray, is_ended: np.ndarray) -> None:
        """Frames `ended` have all their searches at leaves: correct, then cascade."""
        lay, w = self.layout, self._w
        sel = is_ended[self._lf]
        p, f, c = self._lp[sel], self._lf[sel], self._lc[sel]
        keep = ~sel
        self._lp, self._lf, self._lc = self._lp[keep], self._lf[keep], self._lc[keep]
        if not _TEST_TRUST_PARITIES:
            self._check_leaves(p, f, c)
        # Flip each distinct (frame, position) once.
        pos = lay.orig_cat[lay.orig_off[p] + c]
        key = _sorted_unique(f * lay.n + pos)
        ff, jj = key // lay.n, key % lay.n
        if not _TEST_TRUST_PARITIES:
            if self._flipped[ff, jj].any():
                raise m.MessageError("Alice's parities contradict each other: a bit "
                                     "already corrected was found in error again")
            self._flipped[ff, jj] = True
        self.bits[ff, jj] ^= 1
        fbit = _BIT[ff & 63]
        _scatter(self._nat, _XOR, self._pk.reshape(-1), jj * w + (ff >> 6), fbit)
        # Bob's parity of every node containing a flipped bit changes, in every pass
        # whose tree exists; only passes this frame has opened can hold known nodes.
        sb = np.flatnonzero(self._seg_built)
        nat = self._nat
        if nat is None:
            leaf = lay.leaf_tab[:, jj][lay.seg_p[sb]]  # (segments, flips)
            rows = lay.seg_row[sb, None] + (leaf >> lay.seg_d[sb, None])
            idx = rows * w + (ff >> 6)
            bits = np.broadcast_to(fbit, rows.shape)
            _scatter(nat, _XOR, self._bp, idx.ravel(), bits.ravel())
            opened = lay.seg_p[sb, None] <= self._fpass[ff][None, :]
            rows, idx, bits = rows[opened], idx[opened], bits[opened]
            rf = np.broadcast_to(ff, opened.shape)[opened]
        else:
            touched = (self._bp, self._ap, self._kn, lay.leaf_flat, lay.seg_p, lay.seg_d,
                       lay.seg_row, sb, self._fpass, ff, jj, w, lay.n)
            nat.touched(0, *touched, _E64, _E64)  # type: ignore[attr-defined]
        if not self.reuse and self._learned:
            # The original protocol traces cascading errors through top-level blocks
            # only: sub-blocks leave the cascade after each batch (their parities stay
            # in `_dk`, Alice's values in `_ap`, for later searches).
            li = np.concatenate([x[0] for x in self._learned])
            lb = np.concatenate([x[1] for x in self._learned])
            lf = np.concatenate([x[2] for x in self._learned])
            gone = is_ended[lf]
            _scatter(self._nat, _AND, self._kn, li[gone], ~lb[gone])
            self._learned = [(li[~gone], lb[~gone], lf[~gone])]
        # Candidates: the frame's waiting odd blocks and every node the flips touched.
        mine = is_ended[self._rf]
        wr, wf = self._rr[mine], self._rf[mine]
        self._rr, self._rf = self._rr[~mine], self._rf[~mine]
        if nat is not None:
            room = ff.size * sb.size
            out_r, out_f = np.empty(room, np.int64), np.empty(room, np.int64)
            k = nat.touched(1, *touched, out_r, out_f)  # type: ignore[attr-defined]
            rows, rf = out_r[:k], out_f[:k]
            idx, bits = rows * w + (rf >> 6), _BIT[rf & 63]
        cr = np.concatenate((wr, rows))
        cf = np.concatenate((wf, rf))
        ci = np.concatenate((wr * w + (wf >> 6), idx))
        cb = np.concatenate((_BIT[wf & 63], bits))
        odd = ((self._kn[ci] & cb) != 0) & (((self._ap[ci] ^ self._bp[ci]) & cb) != 0)
        self._start_batches(ended, cr[odd], cf[odd])

    def _check_leaves(self, p: np.ndarray, f: np.ndarray, c: np.ndarray) -> None:
        """Refuse a batch whose searches end on a bit that is not in error.

        With honest parities an odd block's search only descends into odd children, so
        it ends on a leaf whose parity Alice disclosed (or it was inferred) and differs
        from Bob's. Anything else (a padding leaf, equal parities) means her replies are
        inconsistent; flipping anyway would corrupt the frame or never terminate."""
        lay, w = self.layout, self._w
        li = (lay.rowbase[p, 0] + c) * w + (f >> 6)
        bit = _BIT[f & 63]
        known = (self._dk[li] & bit) != 0
        odd = ((self._ap[li] ^ self._bp[li]) & bit) != 0
        real = lay.orig_cat[lay.orig_off[p] + c] >= 0
        if not (known & odd & real).all():
            raise m.MessageError("Alice's parities contradict each other: a binary "
                                 "search ended on a bit that is not in error")

    def _start_batches(self, frames: np.ndarray, rows: np.ndarray, f: np.ndarray) -> None:
        """Start a batch in each of `frames` from its odd known nodes (rows, f): search
        those of the lowest pass, keep the rest waiting; no odd node: next pass."""
        lay = self.layout
        nf, npass = lay.frames, len(lay.passes)
        if rows.size:
            key = _sorted_unique(f * lay.total_rows + rows)
            f, rows = key // lay.total_rows, key % lay.total_rows
            p, d, c = lay.decode_rows(rows)
            # Sorted by (frame, row) and rows are numbered pass after pass, so a frame's
            # lowest pass is that of its first entry (no np.minimum.at needed).
            first = np.flatnonzero(np.concatenate(([True], f[1:] != f[:-1])))
            minp = np.repeat(p[first], np.diff(first, append=f.size))
            sel = p == minp
            # A top-level odd block of a pass with one-leaf blocks is already a leaf.
            leaf = sel & (d == 0)
            if leaf.any():
                self._lp = np.concatenate((self._lp, p[leaf]))
                self._lf = np.concatenate((self._lf, f[leaf]))
                self._lc = np.concatenate((self._lc, c[leaf]))
            s = sel & (d > 0)
            self._sp = np.concatenate((self._sp, p[s]))
            self._sd = np.concatenate((self._sd, d[s]))
            self._sf = np.concatenate((self._sf, f[s]))
            self._sc = np.concatenate((self._sc, c[s]))
            self._rr = np.concatenate((self._rr, rows[~sel]))
            self._rf = np.concatenate((self._rf, f[~sel]))
        busy = np.zeros(nf, bool)
        busy[f] = True
        idle = frames[~busy[frames]]
        if idle.size:
            self._fpass[idle] += 1
            fin = self._fpass[idle] >= npass
            self._fdone[idle[fin]] = True
            self._need_open[idle[~fin]] = True


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
