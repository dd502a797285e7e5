/* Cascade's hot loops for qkd.sim.cascade.CascadeBob (module _qkdgw_cascade).
 *
 * descend: walk every open binary search down its tree while the left child's parity
 *   is known (or free), exactly as CascadeBob._descend does level by level in numpy.
 *   Searches of one frame cover disjoint sub-trees and frames use disjoint bits, so
 *   walking each search to its end in turn reads and writes the same words the
 *   lock-step numpy loop does: the result is the same (the order of the returned
 *   learnt nodes may differ; their only use, clearing bits, is order-free).
 * touched: the nodes of every built pass that hold a corrected bit (flip Bob's parity,
 *   then collect the known odd ones), as CascadeBob._end_batches does with a
 *   (segments x flips) numpy array.
 * scatter: arr[idx[i]] op= val[i] for op in or / xor / and (numpy's ufunc.at, unbuffered).
 * pack: the bit-sliced frames of _Layout.packed (one row per position, a bit per frame).
 * answer: Alice's parities for one ParityQuery (CascadeAlice._answer) from her prefix rows.
 *
 * Every index is checked against its array: a bad argument raises ValueError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    Py_buffer b;
    int ok;
} buf_t;

static int get_buf(PyObject *o, buf_t *out, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(o, &out->b, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: need a C-contiguous%s 8-byte array", name,
                     writable ? " writable" : "");
        return -1;
    }
    out->ok = 1;
    if (out->b.len % 8) {
        PyErr_Format(PyExc_ValueError, "%s: length %zd is not a multiple of 8 bytes", name,
                     out->b.len);
        return -1;
    }
    return 0;
}

static int overlaps(const Py_buffer *a, const Py_buffer *b) {
    const char *a0 = a->buf, *b0 = b->buf;
    return a->len > 0 && b->len > 0 && a0 < b0 + b->len && b0 < a0 + a->len;
}

static void rel(buf_t *bs, int n) {
    for (int i = 0; i < n; i++)
        if (bs[i].ok) PyBuffer_Release(&bs[i].b);
}

/* The interpreter lock is let go around a kernel's loops when they have at least
 * this many steps (issue 17: the KME's event loop serves requests while Cascade runs
 * on a worker thread); shorter calls keep it, as retaking it can cost a switch
 * interval. In a released region only the Py_buffer views taken before are read and
 * written (they pin the memory); errors are strings, raised once the lock is back. */
#define GIL_MIN_STEPS 4096
static PyThreadState *gil_off(Py_ssize_t steps) {
    return steps >= GIL_MIN_STEPS ? PyEval_SaveThread() : NULL;
}
static void gil_on(PyThreadState *ts) {
    if (ts) PyEval_RestoreThread(ts);
}

#define N64(x) ((Py_ssize_t)((x).b.len / 8))
#define U64(x) ((uint64_t *)(x).b.buf)
#define I64(x) ((int64_t *)(x).b.buf)

/* descend(ap, bp, kn, dk, rb, w, depth, p, d, f, c,
 *         out_p, out_d, out_f, out_c, leaf_p, leaf_f, leaf_c, learn_idx, learn_f)
 * -> (searches left, leaves, learnt). ap/kn/dk uint64 (modified), bp uint64, rb int64
 * (rowbase flattened, passes x depth). Outputs: room for len(p) searches and leaves,
 * 2 * len(p) * depth learnt nodes. */
static PyObject *descend(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[20];
    Py_ssize_t w, depth;
    if (!PyArg_ParseTuple(args, "OOOOOnnOOOOOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4],
                          &w, &depth, &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11],
                          &o[12], &o[13], &o[14], &o[15], &o[16], &o[17]))
        return NULL;
    static const char *names[18] = {"ap", "bp", "kn", "dk", "rb", "p", "d", "f", "c",
                                    "out_p", "out_d", "out_f", "out_c", "leaf_p", "leaf_f",
                                    "leaf_c", "learn_idx", "learn_f"};
    static const int wr[18] = {1, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    buf_t b[18];
    memset(b, 0, sizeof b);
    for (int i = 0; i < 18; i++) {
        if (get_buf(o[i], &b[i], wr[i], names[i]) < 0) {
            rel(b, 18);
            return NULL;
        }
    }
    uint64_t *ap = U64(b[0]), *bp = U64(b[1]), *kn = U64(b[2]), *dk = U64(b[3]);
    int64_t *rb = I64(b[4]);
    int64_t *sp = I64(b[5]), *sd = I64(b[6]), *sf = I64(b[7]), *sc = I64(b[8]);
    int64_t *op = I64(b[9]), *od = I64(b[10]), *of = I64(b[11]), *oc = I64(b[12]);
    int64_t *lp = I64(b[13]), *lf = I64(b[14]), *lc = I64(b[15]);
    int64_t *xi = I64(b[16]), *xf = I64(b[17]);
    Py_ssize_t nwords = N64(b[0]), nrb = N64(b[4]), ns = N64(b[5]);
    const char *err = NULL;
    if (w <= 0 || depth <= 0) err = "w and depth must be positive";
    else if (N64(b[1]) != nwords || N64(b[2]) != nwords || N64(b[3]) != nwords)
        err = "ap, bp, kn, dk must have the same length";
    else if (N64(b[6]) != ns || N64(b[7]) != ns || N64(b[8]) != ns)
        err = "p, d, f, c must have the same length";
    else if (N64(b[9]) < ns || N64(b[10]) < ns || N64(b[11]) < ns || N64(b[12]) < ns ||
             N64(b[13]) < ns || N64(b[14]) < ns || N64(b[15]) < ns)
        err = "output arrays shorter than the searches";
    else if (depth > 64 || N64(b[16]) < 2 * ns * depth || N64(b[17]) < 2 * ns * depth)
        err = "learnt-node outputs shorter than 2 * searches * depth";
    if (err) {
        rel(b, 18);
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    Py_ssize_t nleft = 0, nleaf = 0, nlearn = 0;
    PyThreadState *ts = gil_off(ns * depth);
#define LEARN(IDX, VAL)                                   \
    do {                                                  \
        if (VAL) ap[IDX] |= bit;                          \
        kn[IDX] |= bit;                                   \
        dk[IDX] |= bit;                                   \
        xi[nlearn] = (IDX);                               \
        xf[nlearn] = f;                                   \
        nlearn++;                                         \
    } while (0)
    for (Py_ssize_t s = 0; s < ns && !err; s++) {
        int64_t p = sp[s], d = sd[s], f = sf[s], c = sc[s];
        if (p < 0 || d <= 0 || d >= depth || f < 0 || c < 0 || p * depth + d >= nrb) {
            err = "search (pass, level, frame, index) outside the layout";
            break;
        }
        int64_t fw = f >> 6;
        uint64_t bit = (uint64_t)1 << (f & 63);
        if (fw >= w) {
            err = "frame outside the words";
            break;
        }
        while (d > 0) {
            int64_t li = (rb[p * depth + d - 1] + 2 * c) * w + fw;
            int64_t ci = (rb[p * depth + d] + c) * w + fw;
            if (li < 0 || li + w >= nwords || ci < 0 || ci >= nwords) {
                err = "node outside the parity arrays";
                break;
            }
            int known = (dk[li] & bit) != 0;
            if (!known && (dk[li + w] & bit)) {
                LEARN(li, (ap[ci] ^ ap[li + w]) & bit);
                known = 1;
            }
            if (!known) break;
            int right = ((ap[li] ^ bp[li]) & bit) == 0;
            if (right && !(dk[li + w] & bit)) LEARN(li + w, (ap[ci] ^ ap[li]) & bit);
            c = 2 * c + right;
            d -= 1;
        }
        if (err) break;
        if (d == 0) {
            lp[nleaf] = p;
            lf[nleaf] = f;
            lc[nleaf] = c;
            nleaf++;
        } else {
            op[nleft] = p;
            od[nleft] = d;
            of[nleft] = f;
            oc[nleft] = c;
            nleft++;
        }
    }
#undef LEARN
    gil_on(ts);
    rel(b, 18);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return Py_BuildValue("nnn", nleft, nleaf, nlearn);
}

/* scatter(op, arr, idx, val): op 0 or, 1 xor, 2 and; val has len(idx) words, or one. */
static PyObject *scatter(PyObject *self, PyObject *args) {
    (void)self;
    int opc;
    PyObject *o[3];
    if (!PyArg_ParseTuple(args, "iOOO", &opc, &o[0], &o[1], &o[2])) return NULL;
    if (opc < 0 || opc > 2) {
        PyErr_SetString(PyExc_ValueError, "op must be 0 (or), 1 (xor) or 2 (and)");
        return NULL;
    }
    buf_t b[3];
    memset(b, 0, sizeof b);
    if (get_buf(o[0], &b[0], 1, "arr") < 0 || get_buf(o[1], &b[1], 0, "idx") < 0 ||
        get_buf(o[2], &b[2], 0, "val") < 0) {
        rel(b, 3);
        return NULL;
    }
    uint64_t *arr = U64(b[0]), *val = U64(b[2]);
    int64_t *idx = I64(b[1]);
    Py_ssize_t n = N64(b[0]), m = N64(b[1]), nv = N64(b[2]);
    /* A write into arr must not change an index or value still to be read: the bounds
     * are checked once, before the first write. */
    if (overlaps(&b[0].b, &b[1].b) || overlaps(&b[0].b, &b[2].b)) {
        rel(b, 3);
        PyErr_SetString(PyExc_ValueError, "arr must not share memory with idx or val");
        return NULL;
    }
    if (nv != m && nv != 1) {
        rel(b, 3);
        PyErr_SetString(PyExc_ValueError, "val must have one word or one per index");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        if (idx[i] < 0 || idx[i] >= n) {
            rel(b, 3);
            PyErr_Format(PyExc_ValueError, "idx[%zd] = %lld outside the array of %zd words",
                         i, (long long)idx[i], n);
            return NULL;
        }
    }
    Py_ssize_t step = nv == 1 ? 0 : 1;
    if (opc == 0)
        for (Py_ssize_t i = 0; i < m; i++) arr[idx[i]] |= val[i * step];
    else if (opc == 1)
        for (Py_ssize_t i = 0; i < m; i++) arr[idx[i]] ^= val[i * step];
    else
        for (Py_ssize_t i = 0; i < m; i++) arr[idx[i]] &= val[i * step];
    rel(b, 3);
    Py_RETURN_NONE;
}

/* touched(mode, bp, ap, kn, leaf_tab, seg_p, seg_d, seg_row, sb, fpass, ff, jj, w, n,
 *         out_rows, out_f) -> count.
 * For each flipped bit (frame ff[i], position jj[i]) and each built segment s in sb, the
 * node containing it is row seg_row[s] + (leaf_tab[seg_p[s] * n + jj[i]] >> seg_d[s]).
 * mode 0: flip Bob's parity of every such node (bp ^= bit). mode 1: write out the
 * nodes of passes the frame has opened (seg_p[s] <= fpass[ff[i]]) that are known and
 * odd (kn & (ap ^ bp)), as (row, frame): the cascade's new candidates. */
static PyObject *touched(PyObject *self, PyObject *args) {
    (void)self;
    int mode;
    PyObject *o[15];
    Py_ssize_t w, n;
    if (!PyArg_ParseTuple(args, "iOOOOOOOOOOOnnOO", &mode, &o[0], &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &w, &n, &o[11],
                          &o[12]))
        return NULL;
    static const char *names[13] = {"bp", "ap", "kn", "leaf_tab", "seg_p", "seg_d",
                                    "seg_row", "sb", "fpass", "ff", "jj", "out_rows",
                                    "out_f"};
    static const int wr[13] = {1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1};
    buf_t b[13];
    memset(b, 0, sizeof b);
    for (int i = 0; i < 13; i++) {
        if (get_buf(o[i], &b[i], wr[i], names[i]) < 0) {
            rel(b, 13);
            return NULL;
        }
    }
    uint64_t *bp = U64(b[0]), *ap = U64(b[1]), *kn = U64(b[2]);
    int64_t *lt = I64(b[3]), *segp = I64(b[4]), *segd = I64(b[5]), *segr = I64(b[6]);
    int64_t *sb = I64(b[7]), *fpass = I64(b[8]), *ff = I64(b[9]), *jj = I64(b[10]);
    int64_t *orow = I64(b[11]), *of = I64(b[12]);
    Py_ssize_t nwords = N64(b[0]), nlt = N64(b[3]), nseg = N64(b[4]), nsb = N64(b[7]);
    Py_ssize_t nfp = N64(b[8]), nfl = N64(b[9]);
    const char *err = NULL;
    if (mode < 0 || mode > 1) err = "mode must be 0 (flip) or 1 (collect)";
    else if (w <= 0 || n <= 0) err = "w and n must be positive";
    else if (N64(b[1]) != nwords || N64(b[2]) != nwords) err = "bp, ap, kn differ in length";
    else if (N64(b[5]) != nseg || N64(b[6]) != nseg) err = "seg_p, seg_d, seg_row differ";
    else if (N64(b[10]) != nfl) err = "ff and jj differ in length";
    else if (mode == 1 && (N64(b[11]) < nfl * nsb || N64(b[12]) < nfl * nsb))
        err = "outputs shorter than flips * segments";
    PyThreadState *ts = gil_off(err ? 0 : nsb * nfl);
    for (Py_ssize_t k = 0; !err && k < nsb; k++) {
        int64_t s = sb[k];
        if (s < 0 || s >= nseg || segd[s] < 0 || segd[s] > 62 || segp[s] < 0 ||
            (segp[s] + 1) * n > nlt)
            err = "segment outside the layout";
    }
    for (Py_ssize_t i = 0; !err && i < nfl; i++) {
        if (ff[i] < 0 || ff[i] >= nfp || (ff[i] >> 6) >= w || jj[i] < 0 || jj[i] >= n)
            err = "flip (frame, position) outside the layout";
    }
    Py_ssize_t cnt = 0;
    for (Py_ssize_t k = 0; !err && k < nsb; k++) {
        int64_t s = sb[k], p = segp[s], d = segd[s], r0 = segr[s];
        const int64_t *row_of = lt + p * n;
        for (Py_ssize_t i = 0; i < nfl; i++) {
            int64_t f = ff[i];
            if (mode == 1 && p > fpass[f]) continue;
            int64_t row = r0 + (row_of[jj[i]] >> d);
            int64_t ix = row * w + (f >> 6);
            if (row < 0 || ix >= nwords) {
                err = "node outside the parity arrays";
                break;
            }
            uint64_t bit = (uint64_t)1 << (f & 63);
            if (mode == 0) {
                bp[ix] ^= bit;
            } else if ((kn[ix] & bit) && ((ap[ix] ^ bp[ix]) & bit)) {
                orow[cnt] = row;
                of[cnt] = f;
                cnt++;
            }
        }
    }
    gil_on(ts);
    rel(b, 13);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return PyLong_FromSsize_t(cnt);
}

/* answer(pre, words, of, op, pre_base, nb, kk, ids, seg_id, seg_w, seg_p, seg_d,
 *        seg_pre, seg_w0, opened, frames, npass, total_ids, out) -> code.
 * Alice's parities for one ParityQuery, as CascadeAlice._answer computes them in numpy:
 * first every top-level block of each (of[i], op[i]) (already validated and opened by
 * the caller), then one parity per node id. A parity is bit f & 63 of prefix word
 * hi * words + (f >> 6) xor the one at lo. out (uint8) gets sum(nb[op]) + len(ids) bytes.
 * Returns 0, or 1 when a node id is outside the layout or the ids do not strictly
 * increase, 2 when a node's (frame, pass) was not opened (the caller raises the
 * protocol error); bad arguments raise ValueError. opened: uint8, frames * npass. */
static PyObject *answer(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[17];
    Py_ssize_t words, frames, npass, total_ids;
    if (!PyArg_ParseTuple(args, "OnOOOOOOOOOOOOOnnnO", &o[0], &words, &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &o[12],
                          &o[13], &frames, &npass, &total_ids, &o[14]))
        return NULL;
    buf_t b[15];
    memset(b, 0, sizeof b);
    static const char *names[] = {"pre", "of", "op", "pre_base", "nb", "kk", "ids",
                                  "seg_id", "seg_w", "seg_p", "seg_d", "seg_pre", "seg_w0"};
    for (int i = 0; i < 13; i++) {
        if (get_buf(o[i], &b[i], 0, names[i]) < 0) {
            rel(b, 15);
            return NULL;
        }
    }
    /* opened and out are byte arrays */
    if (PyObject_GetBuffer(o[13], &b[13].b, PyBUF_C_CONTIGUOUS) < 0) {
        rel(b, 15);
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "opened: need a C-contiguous byte array");
        return NULL;
    }
    b[13].ok = 1;
    if (PyObject_GetBuffer(o[14], &b[14].b, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        rel(b, 15);
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "out: need a C-contiguous writable byte array");
        return NULL;
    }
    b[14].ok = 1;
    const uint64_t *pre = U64(b[0]);
    const int64_t *of = I64(b[1]), *op = I64(b[2]), *pbase = I64(b[3]), *nb = I64(b[4]),
                  *kk = I64(b[5]), *ids = I64(b[6]), *sid = I64(b[7]), *sw = I64(b[8]),
                  *sp = I64(b[9]), *sd = I64(b[10]), *spre = I64(b[11]), *sw0 = I64(b[12]);
    const uint8_t *opened = (const uint8_t *)b[13].b.buf;
    uint8_t *out = (uint8_t *)b[14].b.buf;
    Py_ssize_t npre = N64(b[0]), nopen = N64(b[1]), nid = N64(b[6]), nseg = N64(b[7]);
    Py_ssize_t outlen = b[14].b.len;
    const char *err = NULL;
    int code = 0;
    if (words <= 0 || frames <= 0 || npass <= 0 || total_ids < 0 ||
        (frames + 63) / 64 != words)
        err = "words, frames, npass, total_ids inconsistent";
    else if (N64(b[2]) != nopen) err = "of and op differ in length";
    else if (N64(b[3]) != npass || N64(b[4]) != npass || N64(b[5]) != npass)
        err = "pre_base, nb, kk need one entry per pass";
    else if (nseg < 1 || N64(b[8]) != nseg || N64(b[9]) != nseg || N64(b[10]) != nseg ||
             N64(b[11]) != nseg || N64(b[12]) != nseg)
        err = "segment tables differ in length";
    else if (b[13].b.len != frames * npass) err = "opened must have frames * npass bytes";
    else if (npre % words) err = "pre is not rows * words";
    Py_ssize_t npr = err ? 0 : npre / words, pos = 0;
    PyThreadState *ts = gil_off(err ? 0 : outlen);
    for (Py_ssize_t i = 0; !err && i < nopen; i++) {
        int64_t f = of[i], p = op[i];
        if (f < 0 || f >= frames || p < 0 || p >= npass) {
            err = "opening outside the layout";
            break;
        }
        int64_t base = pbase[p], k = kk[p], nbk = nb[p];
        if (nbk < 0 || k < 0 || base < 0 || nbk > outlen - pos ||
            (nbk > 0 && (k > (npr - base) / nbk || base + nbk * k >= npr))) {
            err = "pass table outside the prefix rows or out too short";
            break;
        }
        const uint64_t *col = pre + (f >> 6);
        uint64_t sh = (uint64_t)(f & 63);
        for (int64_t j = 0; j < nbk; j++) {
            int64_t lo = base + j * k;
            out[pos++] = (uint8_t)(((col[(lo + k) * words] ^ col[lo * words]) >> sh) & 1);
        }
    }
    if (!err && nid > outlen - pos) err = "out too short";
    /* node ids: all bounds first (as the reference), then the opened check */
    for (Py_ssize_t i = 0; !err && !code && i < nid; i++) {
        if (ids[i] < 0 || ids[i] >= total_ids || (i && ids[i] <= ids[i - 1])) code = 1;
    }
    Py_ssize_t s = 0;
    for (Py_ssize_t i = 0; !err && !code && i < nid; i++) {
        int64_t id = ids[i];
        if (id < sid[0]) {
            code = 1;
            break;
        }
        while (s + 1 < nseg && sid[s + 1] <= id) s++;
        int64_t wsg = sw[s], p = sp[s], d = sd[s];
        if (wsg <= 0 || p < 0 || p >= npass || d < 0 || d > 62) {
            err = "segment table entry out of range";
            break;
        }
        int64_t rel_ = id - sid[s], f = rel_ / wsg, c = rel_ % wsg;
        if (f >= frames) {
            err = "node frame outside the layout (segment tables inconsistent)";
            break;
        }
        if (!opened[f * npass + p]) {
            code = 2;
            break;
        }
        /* no signed overflow, whatever the tables hold: (c + 1) << d and the row sums
         * stay below 2^63 before they are compared with the prefix rows */
        if (c > (INT64_MAX >> d) - 1 || spre[s] < 0 || spre[s] >= npr ||
            (c << d) >= npr) {
            err = "node outside the prefix rows";
            break;
        }
        int64_t lo = c << d, hi = lo + ((int64_t)1 << d);
        if (hi > sw0[s]) hi = sw0[s];
        int64_t rl = spre[s] + lo, rh = spre[s] + hi;
        if (rl < 0 || rh < 0 || rl >= npr || rh >= npr) {
            err = "node outside the prefix rows";
            break;
        }
        const uint64_t *col = pre + (f >> 6);
        out[pos + i] = (uint8_t)(((col[rh * words] ^ col[rl * words]) >> (f & 63)) & 1);
    }
    gil_on(ts);
    rel(b, 15);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return PyLong_FromLong(code);
}

/* pack(bits, frames, n, out): the bit-sliced frames of _Layout.packed. bits: uint8,
 * frames * n (row f = frame f; any nonzero byte is a one, as np.packbits reads it);
 * out: uint64, (n + 1) * ceil(frames / 64), overwritten: bit f & 63 of word
 * j * words + (f >> 6) is bits[f, j]; row n stays zero (the padding row). */
static PyObject *pack(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ob, *oo;
    Py_ssize_t frames, n;
    if (!PyArg_ParseTuple(args, "OnnO", &ob, &frames, &n, &oo)) return NULL;
    if (frames < 0 || n < 0 || (frames && n > PY_SSIZE_T_MAX / frames) ||
        n + 1 > PY_SSIZE_T_MAX / 8 / ((frames + 63) / 64 + 1)) {
        PyErr_SetString(PyExc_ValueError, "frames and n must be small non-negative sizes");
        return NULL;
    }
    Py_buffer bb;
    if (PyObject_GetBuffer(ob, &bb, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "bits: need a C-contiguous byte array");
        return NULL;
    }
    buf_t bo;
    memset(&bo, 0, sizeof bo);
    if (get_buf(oo, &bo, 1, "out") < 0) {
        PyBuffer_Release(&bb);
        rel(&bo, 1);
        return NULL;
    }
    Py_ssize_t words = (frames + 63) / 64;
    if (bb.len != frames * n || N64(bo) != (n + 1) * words) {
        PyBuffer_Release(&bb);
        rel(&bo, 1);
        PyErr_SetString(PyExc_ValueError,
                        "bits must have frames * n bytes and out (n + 1) * words words");
        return NULL;
    }
    const uint8_t *a = (const uint8_t *)bb.buf;
    uint64_t *out = U64(bo);
    PyThreadState *ts = gil_off(frames * n);
    memset(out, 0, (size_t)bo.b.len);
    for (Py_ssize_t f = 0; f < frames; f++) {
        const uint8_t *row = a + f * n;
        uint64_t *col = out + (f >> 6);
        unsigned sh = (unsigned)(f & 63);
        /* branch-free: random key bits would mispredict half the time */
        for (Py_ssize_t j = 0; j < n; j++) col[j * words] |= (uint64_t)(row[j] != 0) << sh;
    }
    gil_on(ts);
    PyBuffer_Release(&bb);
    rel(&bo, 1);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pack", pack, METH_VARARGS, "Bit-slice frames: one row per position, one bit per frame."},
    {"answer", answer, METH_VARARGS, "Alice's parities for one Cascade parity query."},
    {"touched", touched, METH_VARARGS, "Flip, or collect the odd, nodes holding flipped bits."},
    {"descend", descend, METH_VARARGS, "Walk Cascade's open binary searches down."},
    {"scatter", scatter, METH_VARARGS, "arr[idx] op= val, unbuffered (or, xor, and)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qkdgw_cascade",
                                    "Cascade's hot loops (see qkd.sim.cascade).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__qkdgw_cascade(void) { return PyModule_Create(&module); }
