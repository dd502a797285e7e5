/* Compiled kernels of the emulated BB84 link (module _qkdgw_bb84).
 *
 * Each function is the inner loop of a numpy reference in qkd/link/quantum.py or
 * qkd/sim/messages.py, computed from the same inputs: the random words are drawn by the
 * Python caller (numpy's generator for the physics, SecretRng for the secret draws) and
 * passed in, so the random stream and its order are the reference's and the outputs
 * are the same bit for bit (tests/qkd/link/test_native_bb84.py). Arrays come in and go
 * out through the buffer protocol; every size is checked here and a bad one raises
 * ValueError. The decoders read bytes a peer sent: every index is bounds-checked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static int need(Py_buffer *b, Py_ssize_t bytes, const char *name) {
    if (b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s: buffer of %zd bytes, need %zd", name, b->len,
                     bytes);
        return 0;
    }
    return 1;
}

/* Room for `count` items of `size` bytes, checked by division: a caller's huge count
 * must not wrap a product into a small or negative byte size. */
static int need_n(Py_buffer *b, Py_ssize_t count, Py_ssize_t size, const char *name) {
    if (count < 0 || count > b->len / size) {
        PyErr_Format(PyExc_ValueError, "%s: buffer of %zd bytes, need %zd items of %zd",
                     name, b->len, count, size);
        return 0;
    }
    return 1;
}

/* The interpreter lock is let go around a kernel's loop when it has at least this
 * many items (issue 17: the KME's event loop serves requests while a round's kernels
 * run on worker threads). Smaller calls keep it: dropping and retaking the lock can
 * cost a switch interval, more than a short loop takes. Inside a released region no
 * Python object is touched: the data is read through the Py_buffer views taken
 * before (they pin the memory) and errors are codes, raised once the lock is back. */
#define GIL_MIN_ITEMS 4096
static PyThreadState *gil_off(Py_ssize_t items) {
    return items >= GIL_MIN_ITEMS ? PyEval_SaveThread() : NULL;
}
static void gil_on(PyThreadState *ts) {
    if (ts) PyEval_RestoreThread(ts);
}

static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static void wr64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* count_eq(u16, count, value) -> how many of the first count entries equal value. */
static PyObject *count_eq(PyObject *self, PyObject *args) {
    Py_buffer u16;
    Py_ssize_t count;
    unsigned int value;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nI", &u16, &count, &value)) return NULL;
    PyObject *res = NULL;
    if (count < 0 || !need_n(&u16, count, 2, "count_eq u16")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "count_eq: negative count");
        goto done;
    }
    const uint8_t *u = u16.buf;
    Py_ssize_t n = 0;
    PyThreadState *ts = gil_off(count);
    for (Py_ssize_t i = 0; i < count; i++) n += rd16(u + 2 * i) == value;
    gil_on(ts);
    res = PyLong_FromSsize_t(n);
done:
    PyBuffer_Release(&u16);
    return res;
}

/* carry_scan(u16, count, hi16, tie_words, lo48, lo, out_slots[, bitmap]) -> pulses
 * Which of `count` slots carry photons: u16[i] < hi16, or u16[i] == hi16 and the next
 * tie word's top 48 bits are below lo48 (tie words are used in slot order). Writes
 * lo + i of each into out_slots (int64) and, with a bitmap (uint64 words, covering
 * lo + count slots, checked), sets its bit there. */
static PyObject *carry_scan(PyObject *self, PyObject *args) {
    Py_buffer u16, ties, out, bm = {0};
    Py_ssize_t count, lo;
    unsigned int hi16;
    unsigned long long lo48;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nIy*Kny*|w*", &u16, &count, &hi16, &ties, &lo48, &lo,
                          &out, &bm))
        return NULL;
    PyObject *res = NULL;
    if (count < 0 || lo < 0 || hi16 > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "carry_scan: negative count or bad threshold");
        goto done;
    }
    if (!need_n(&u16, count, 2, "carry_scan u16") || !need_n(&out, count, 8, "carry_scan out"))
        goto done;
    if (bm.buf && (lo > PY_SSIZE_T_MAX - count - 63 || bm.len / 8 < (lo + count + 63) / 64)) {
        PyErr_SetString(PyExc_ValueError, "carry_scan: bitmap smaller than the slots");
        goto done;
    }
    uint8_t *bmp = bm.buf;
    uint64_t acc = 0;
    const uint8_t *u = u16.buf, *tw = ties.buf;
    uint8_t *o = out.buf;
    Py_ssize_t n_ties = ties.len / 8, k = 0, m = 0;
    int64_t *oi = (int64_t *)o;
    int aligned = ((uintptr_t)o % sizeof(int64_t)) == 0, short_ties = 0;
    PyThreadState *ts = gil_off(count);
    for (Py_ssize_t i = 0; i < count; i++) {
        uint16_t v = rd16(u + 2 * i);
        Py_ssize_t carries = v < hi16;
        if (v == hi16) {  /* about one slot in 2^16 */
            if (k >= n_ties) {
                short_ties = 1;
                break;
            }
            carries = (rd64(tw + 8 * k) >> 16) < lo48;
            k++;
        }
        /* Branch-free: the slot is written either way and kept if it carries (the
         * output has room for all `count`). */
        if (aligned) oi[m] = lo + i;
        else wr64(o + 8 * m, (uint64_t)(lo + i));
        m += carries;
        if (bmp) {  /* a word's bits gathered in a register, stored once */
            uint64_t slot = (uint64_t)(lo + i);
            acc |= (uint64_t)carries << (slot & 63);
            if ((slot & 63) == 63 || i == count - 1) {
                uint8_t *wp = bmp + 8 * (slot >> 6);
                wr64(wp, rd64(wp) | acc);
                acc = 0;
            }
        }
    }
    gil_on(ts);
    if (short_ties) {
        PyErr_SetString(PyExc_ValueError, "carry_scan: fewer tie words than ties");
        goto done;
    }
    res = PyLong_FromSsize_t(m);
done:
    PyBuffer_Release(&u16); PyBuffer_Release(&ties); PyBuffer_Release(&out);
    if (bm.buf) PyBuffer_Release(&bm);
    return res;
}

/* emit_fill(m, r, sec, tails, t_mu, t_basis, state, cls, basis, bit) -> class-1 count
 * For each of m pulses: photons = 1 + the length of the leading run of k with
 * r < tails[k]; class = low32(sec) >= t_mu[photons]; basis = (high32 & 0x7FFFFFFF) >=
 * t_basis; bit = high32 >> 31 (low/high: the word's first and second uint32 in memory,
 * as numpy's view gives them); state = photons | basis << 5 | bit << 6. */
static PyObject *emit_fill(PyObject *self, PyObject *args) {
    Py_buffer r, sec, tails, tmu, st, cl, ba, bi;
    Py_ssize_t m;
    unsigned int t_basis;
    (void)self;
    if (!PyArg_ParseTuple(args, "ny*y*y*y*Iw*w*w*w*", &m, &r, &sec, &tails, &tmu, &t_basis,
                          &st, &cl, &ba, &bi))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t nt = tails.len / 8;
    if (m < 0 || nt > 30 || tmu.len < 4 * (nt + 2)) {
        PyErr_SetString(PyExc_ValueError,
                        "emit_fill: negative count, more than 30 tails or short t_mu");
        goto done;
    }
    if (!need_n(&r, m, 8, "emit_fill r") || !need_n(&sec, m, 8, "emit_fill sec") ||
        !need_n(&st, m, 1, "emit_fill state") || !need_n(&cl, m, 1, "emit_fill cls") ||
        !need_n(&ba, m, 1, "emit_fill basis") || !need_n(&bi, m, 1, "emit_fill bit"))
        goto done;
    uint64_t tl[30];
    uint32_t tm[32];
    for (Py_ssize_t k = 0; k < nt; k++) tl[k] = rd64((const uint8_t *)tails.buf + 8 * k);
    for (Py_ssize_t k = 0; k < nt + 2; k++) tm[k] = rd32((const uint8_t *)tmu.buf + 4 * k);
    const uint8_t *rp = r.buf, *sp = sec.buf;
    uint8_t *so = st.buf, *co = cl.buf, *bo = ba.buf, *vo = bi.buf;
    Py_ssize_t ones = 0;
    /* Non-increasing tails (what _mixture_tables makes): the leading run is a count,
     * so the first three compares need no branch (one pulse in five has N > 1). */
    int mono = nt >= 3;
    for (Py_ssize_t k = 1; k < nt; k++) mono &= tl[k] <= tl[k - 1];
    PyThreadState *ts = gil_off(m);
    for (Py_ssize_t i = 0; i < m; i++) {
        uint64_t w = rd64(rp + 8 * i);
        unsigned ph = 1;
        if (mono) {
            ph += (unsigned)(w < tl[0]) + (unsigned)(w < tl[1]) + (unsigned)(w < tl[2]);
            if (ph == 4)
                while (ph - 1 < (unsigned)nt && w < tl[ph - 1]) ph++;
        } else {
            while (ph - 1 < (unsigned)nt && w < tl[ph - 1]) ph++;
        }
        uint32_t low = rd32(sp + 8 * i), high = rd32(sp + 8 * i + 4);
        uint8_t c = low >= tm[ph], b = (high & 0x7FFFFFFFu) >= t_basis, v = high >> 31;
        co[i] = c; bo[i] = b; vo[i] = v;
        ones += c;
        so[i] = (uint8_t)(ph | (unsigned)b << 5 | (unsigned)v << 6);
    }
    gil_on(ts);
    res = PyLong_FromSsize_t(ones);
done:
    PyBuffer_Release(&r); PyBuffer_Release(&sec); PyBuffer_Release(&tails);
    PyBuffer_Release(&tmu); PyBuffer_Release(&st); PyBuffer_Release(&cl);
    PyBuffer_Release(&ba); PyBuffer_Release(&bi);
    return res;
}

/* photon_sum(state: uint8[c]) -> the photons of the pulses (state & 0x1F summed). */
static PyObject *photon_sum(PyObject *self, PyObject *args) {
    Py_buffer s;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*", &s)) return NULL;
    const uint8_t *p = s.buf;
    long long total = 0;
    for (Py_ssize_t i = 0; i < s.len; i++) total += p[i] & 0x1F;
    PyBuffer_Release(&s);
    return PyLong_FromLongLong(total);
}

/* measure_chunk(c, state, bw, r, right, anyd, t_basis, dark_right, dark_wrong, slots,
 *               out_slots, out_basis, out_bits, out_both) -> (clicked, both)
 * Bob's basis = bw[i] >= t_basis (bw: uint32); key = (state >> 4 & 0xFE) | basis;
 * photon j (state & 0x1F of them per pulse, in pulse order) takes word r[j]: below
 * right[key] it clicks the right detector, else below anyd[key] the wrong one (r must
 * hold every photon's word, checked). Dark clicks: sorted chunk-local pulse indices per
 * detector, in [0, c) (checked). The pulses with a click, in order, go out as slot,
 * Bob's basis and bit (the state's bit on a right-detector click, its complement
 * otherwise); out_both gets the output positions of double clicks (their bits are the
 * caller's random draw). */
static PyObject *measure_chunk(PyObject *self, PyObject *args) {
    Py_buffer s, bw, r, right, anyd, d0, d1, sl, os, ob, ov, obo;
    Py_ssize_t c;
    unsigned int t_basis;
    (void)self;
    if (!PyArg_ParseTuple(args, "ny*y*y*y*y*Iy*y*y*w*w*w*w*", &c, &s, &bw, &r, &right, &anyd,
                          &t_basis, &d0, &d1, &sl, &os, &ob, &ov, &obo))
        return NULL;
    PyObject *res = NULL;
    if (c < 0) {
        PyErr_SetString(PyExc_ValueError, "measure_chunk: negative count");
        goto done;
    }
    if (!need_n(&s, c, 1, "measure_chunk state") || !need_n(&bw, c, 4, "measure_chunk bw") ||
        !need(&right, 128, "measure_chunk right") || !need(&anyd, 128, "measure_chunk anyd") ||
        !need_n(&sl, c, 8, "measure_chunk slots") ||
        !need_n(&os, c, 8, "measure_chunk out_slots") ||
        !need_n(&ob, c, 1, "measure_chunk out_basis") ||
        !need_n(&ov, c, 1, "measure_chunk out_bits") ||
        !need_n(&obo, c, 8, "measure_chunk out_both"))
        goto done;
    uint64_t rt[16], an[16];
    for (int k = 0; k < 16; k++) {
        rt[k] = rd64((const uint8_t *)right.buf + 8 * k);
        an[k] = rd64((const uint8_t *)anyd.buf + 8 * k);
    }
    const uint8_t *dp[2] = {d0.buf, d1.buf};
    Py_ssize_t dn[2] = {d0.len / 8, d1.len / 8}, di[2] = {0, 0};
    int64_t dnext[2];
    for (int t = 0; t < 2; t++) {
        int64_t prev = -1;
        for (Py_ssize_t k = 0; k < dn[t]; k++) {
            int64_t v;
            memcpy(&v, dp[t] + 8 * k, 8);
            if (v <= prev || v >= c) {
                PyErr_SetString(PyExc_ValueError,
                                "measure_chunk: dark clicks not increasing inside the chunk");
                goto done;
            }
            prev = v;
        }
        dnext[t] = -1;
        if (dn[t]) memcpy(&dnext[t], dp[t], 8);
    }
    const uint8_t *sp = s.buf, *bp = bw.buf, *rp = r.buf, *lp = sl.buf;
    uint8_t *osp = os.buf, *obp = ob.buf, *ovp = ov.buf, *bop = obo.buf;
    Py_ssize_t nr = r.len / 8, j = 0, n = 0, nb = 0;
    int short_words = 0;
    PyThreadState *ts = gil_off(c);
    for (Py_ssize_t i = 0; i < c; i++) {
        uint8_t st = sp[i];
        uint8_t b = rd32(bp + 4 * i) >= t_basis;
        unsigned key = ((unsigned)(st >> 4) & 0xFEu) | b;
        unsigned k = st & 0x1F;
        if (j + (Py_ssize_t)k > nr) {
            short_words = 1;
            break;
        }
        uint8_t f = 0;
        uint64_t tr = rt[key], ta = an[key];
        for (unsigned p = 0; p < k; p++, j++) {
            uint64_t w = rd64(rp + 8 * j);
            f |= (uint8_t)((w < tr) | ((w >= tr) & (w < ta)) << 1);
        }
        for (int t = 0; t < 2; t++) {
            if (dnext[t] == i) {
                f |= (uint8_t)(1 << t);
                di[t]++;
                dnext[t] = -1;
                if (di[t] < dn[t]) memcpy(&dnext[t], dp[t] + 8 * di[t], 8);
            }
        }
        /* Branch-free (a click is a coin flip to the branch predictor): the pulse is
         * written either way and kept if it clicked; the outputs have room for c. */
        memcpy(osp + 8 * n, lp + 8 * i, 8);
        obp[n] = b;
        ovp[n] = (uint8_t)(((st >> 6) & 1) ^ (uint8_t)!(f & 1));
        wr64(bop + 8 * nb, (uint64_t)n);
        nb += f == 3;
        n += f != 0;
    }
    gil_on(ts);
    if (short_words) {
        PyErr_SetString(PyExc_ValueError, "measure_chunk: fewer words than photons");
        goto done;
    }
    res = Py_BuildValue("nn", n, nb);
done:
    PyBuffer_Release(&s); PyBuffer_Release(&bw); PyBuffer_Release(&r);
    PyBuffer_Release(&right); PyBuffer_Release(&anyd); PyBuffer_Release(&d0);
    PyBuffer_Release(&d1); PyBuffer_Release(&sl); PyBuffer_Release(&os);
    PyBuffer_Release(&ob); PyBuffer_Release(&ov); PyBuffer_Release(&obo);
    return res;
}

/* ---------------------------------------------------------------- LEB128 varints */

static Py_ssize_t varint_len(uint64_t v) {
    Py_ssize_t n = 1;
    while (v >= 0x80) { v >>= 7; n++; }
    return n;
}

static uint8_t *put_varint(uint8_t *o, uint64_t v) {
    while (v >= 0x80) { *o++ = (uint8_t)(v | 0x80); v >>= 7; }
    *o++ = (uint8_t)v;
    return o;
}

/* varints_encode(values: uint64[n], deltas: bool[, head1, head2[, out]]) -> bytes
 * (with out: the length written there, or -1; see below)
 * head1 | head2 | the unsigned LEB128 of each value (the heads: a frame's header and
 * states, so the frame is written once); with deltas (values: int64), of values[0] and then of
 * each values[i] - values[i-1] (mod 2^64, as numpy's int64 difference cast to
 * uint64), except that when every delta is below 128 as a signed number the output is
 * each delta's low byte: what PulseFrame.encode's one-byte shortcut writes, even for
 * the (invalid) decreasing slots it never decodes. */
static PyObject *varints_encode(PyObject *self, PyObject *args) {
    Py_buffer v, h1 = {0}, h2 = {0}, ob = {0};
    int deltas;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*p|y*y*w*", &v, &deltas, &h1, &h2, &ob)) return NULL;
    PyObject *res = NULL;
    if (v.len % 8) {
        PyErr_SetString(PyExc_ValueError, "varints_encode: not a 64-bit array");
        goto done;
    }
    if (ob.buf) {
        /* Into the caller's buffer (the sealer's plaintext): only the one-byte form;
         * -1 if a delta needs more, and the caller encodes the general way. */
        Py_ssize_t n = v.len / 8;
        if (!deltas) {
            PyErr_SetString(PyExc_ValueError, "varints_encode: out needs deltas");
            goto done;
        }
        if (!need(&ob, h1.len + h2.len + n, "varints_encode out")) goto done;
        uint8_t *o = ob.buf;
        const uint8_t *p = v.buf;
        if (h1.len) memcpy(o, h1.buf, h1.len);
        if (h2.len) memcpy(o + h1.len, h2.buf, h2.len);
        o += h1.len + h2.len;
        uint64_t big = 0, prev = 0;
        PyThreadState *ts = gil_off(n);
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t x = rd64(p + 8 * i), d = x - prev;
            o[i] = (uint8_t)d;
            big |= (uint64_t)((int64_t)d >= 0x80);
            prev = x;
        }
        gil_on(ts);
        res = PyLong_FromSsize_t(big ? -1 : h1.len + h2.len + n);
        goto done;
    }
    Py_ssize_t n = v.len / 8, size = 0;
    const uint8_t *p = v.buf;
    uint64_t prev = 0;
    int small = 1;
    if (deltas) {
        /* A frame's deltas are nearly always one byte each: write them in one
         * branch-free pass and only size the varints if one is not. */
        res = PyBytes_FromStringAndSize(NULL, h1.len + h2.len + n);
        if (!res) goto done;
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(res);
        if (h1.len) memcpy(o, h1.buf, h1.len);
        if (h2.len) memcpy(o + h1.len, h2.buf, h2.len);
        o += h1.len + h2.len;
        uint64_t big = 0;
        /* The bytes object is new and not yet shared: its memory is ours alone. */
        PyThreadState *ts = gil_off(n);
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t x = rd64(p + 8 * i), d = x - prev;
            o[i] = (uint8_t)d;
            big |= (uint64_t)((int64_t)d >= 0x80);
            prev = x;
        }
        gil_on(ts);
        if (!big) goto done;
        Py_CLEAR(res);
        prev = 0;
    }
    PyThreadState *ts = gil_off(n);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t x = rd64(p + 8 * i), d = deltas ? x - prev : x;
        size += varint_len(d);
        if (deltas ? (int64_t)d >= 0x80 : d >= 0x80) small = 0;
        prev = x;
    }
    gil_on(ts);
    if (small) size = n;
    res = PyBytes_FromStringAndSize(NULL, h1.len + h2.len + size);
    if (!res) goto done;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(res);
    if (h1.len) memcpy(o, h1.buf, h1.len);
    if (h2.len) memcpy(o + h1.len, h2.buf, h2.len);
    o += h1.len + h2.len;
    prev = 0;
    /* The bytes object is new and not yet shared: its memory is ours alone. */
    ts = gil_off(n);
    if (small) {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t x = rd64(p + 8 * i);
            o[i] = (uint8_t)(deltas ? x - prev : x);
            prev = x;
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t x = rd64(p + 8 * i);
            o = put_varint(o, deltas ? x - prev : x);
            prev = x;
        }
    }
    gil_on(ts);
done:
    PyBuffer_Release(&v);
    if (h1.buf) PyBuffer_Release(&h1);
    if (h2.buf) PyBuffer_Release(&h2);
    if (ob.buf) PyBuffer_Release(&ob);
    return res;
}

/* varints_decode(data, offset, count, out: uint64[count], sums: bool)
 *   -> (end offset, largest value, a zero value after the first, the sum passed 2^64)
 * `count` canonical LEB128 varints below 2^63 (at most 9 bytes, no redundant trailing
 * zero byte) from data[offset:]; with sums, out gets their running sums (mod 2^64)
 * instead. Errors are ValueErrors with the reference decoder's messages, in its order
 * of precedence: "message truncated" (fewer than count varints in the data), then
 * "varint at or above 2^63" (any of them longer than 9 bytes), then "over-long varint". */
static PyObject *varints_decode(PyObject *self, PyObject *args) {
    Py_buffer d, out;
    Py_ssize_t off, count;
    int sums;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnw*p", &d, &off, &count, &out, &sums)) return NULL;
    PyObject *res = NULL;
    if (off < 0 || off > d.len || count < 0) {
        PyErr_SetString(PyExc_ValueError, "varints_decode: offset or count out of range");
        goto done;
    }
    if (!need_n(&out, count, 8, "varints_decode out")) goto done;
    const uint8_t *p = (const uint8_t *)d.buf + off;
    Py_ssize_t avail = d.len - off;
    if (count > avail) {
        PyErr_SetString(PyExc_ValueError, "message truncated");
        goto done;
    }
    uint8_t *o = out.buf;
    Py_ssize_t pos = 0;
    int too_long = 0, over_long = 0, zero_after_first = 0, wrapped = 0;
    uint64_t top = 0, acc = 0;
    /* Fast path: the first count bytes all below 0x80 are count one-byte varints
     * (what a frame's slot deltas nearly always are): the general loop's result
     * without its per-byte branches. Sums of count < 2^63 values below 128 cannot wrap. */
    uint8_t high = 0;
    PyThreadState *ts = gil_off(count);
    for (Py_ssize_t i = 0; i < count; i++) high |= p[i];
    if (high < 0x80) {
        uint8_t zero = 0, mx = 0;
        for (Py_ssize_t i = 1; i < count; i++) zero |= (uint8_t)(p[i] == 0);
        for (Py_ssize_t i = 0; i < count; i++) mx = p[i] > mx ? p[i] : mx;
        if (sums) {
            for (Py_ssize_t i = 0; i < count; i++) { acc += p[i]; wr64(o + 8 * i, acc); }
        } else {
            for (Py_ssize_t i = 0; i < count; i++) wr64(o + 8 * i, p[i]);
        }
        gil_on(ts);
        res = Py_BuildValue("nKOO", off + count, (unsigned long long)mx,
                            zero ? Py_True : Py_False, Py_False);
        goto done;
    }
    int truncated = 0;
    for (Py_ssize_t i = 0; i < count && !truncated; i++) {
        uint64_t v = 0;
        Py_ssize_t start = pos;
        for (;;) {
            if (pos >= avail) {
                truncated = 1;
                break;
            }
            uint8_t b = p[pos];
            Py_ssize_t j = pos - start;
            if (j < 9) v |= (uint64_t)(b & 0x7F) << (7 * j);
            pos++;
            if (b < 0x80) {
                if (j >= 9) too_long = 1;
                else if (j > 0 && b == 0) over_long = 1;
                break;
            }
        }
        if (v > top) top = v;
        if (i > 0 && v == 0) zero_after_first = 1;
        if (acc + v < acc) wrapped = 1;
        if (truncated) break;
        acc += v;
        wr64(o + 8 * i, sums ? acc : v);
    }
    gil_on(ts);
    if (truncated) {
        PyErr_SetString(PyExc_ValueError, "message truncated");
        goto done;
    }
    if (too_long) {
        PyErr_SetString(PyExc_ValueError, "varint at or above 2^63");
        goto done;
    }
    if (over_long) {
        PyErr_SetString(PyExc_ValueError, "over-long varint");
        goto done;
    }
    res = Py_BuildValue("nKOO", off + pos, (unsigned long long)top,
                        zero_after_first ? Py_True : Py_False, wrapped ? Py_True : Py_False);
done:
    PyBuffer_Release(&d); PyBuffer_Release(&out);
    return res;
}

/* ------------------------------------------------------------ slot bitmap ranks */

/* rank_lookup(words: uint64[w], before: int64[w], pulses, slots: int64[n], idx, found)
 *   -> all found
 * For each slot (0 <= slot < pulses, checked; words must cover pulses): idx = before of
 * its word + the set bits below it in the word; found = its own bit. */
static PyObject *rank_lookup(PyObject *self, PyObject *args) {
    Py_buffer wd, bf, sl, ix, fd;
    long long pulses;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*Ly*w*w*", &wd, &bf, &pulses, &sl, &ix, &fd))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t nw = wd.len / 8, n = sl.len / 8;
    if (pulses < 0 || pulses / 64 + ((pulses & 63) != 0) > nw || bf.len / 8 < nw) {
        PyErr_SetString(PyExc_ValueError, "rank_lookup: bitmap smaller than the pulses");
        goto done;
    }
    if (!need_n(&ix, n, 8, "rank_lookup idx") || !need_n(&fd, n, 1, "rank_lookup found")) goto done;
    const uint8_t *wp = wd.buf, *bp = bf.buf, *sp = sl.buf;
    uint8_t *ip = ix.buf, *fp = fd.buf;
    int all = 1, outside = 0;
    PyThreadState *ts = gil_off(n);
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s;
        memcpy(&s, sp + 8 * i, 8);
        if (s < 0 || s >= pulses) {
            outside = 1;
            break;
        }
        uint64_t w = rd64(wp + 8 * (s >> 6)), below = w & ((UINT64_C(1) << (s & 63)) - 1);
        int64_t before;
        memcpy(&before, bp + 8 * (s >> 6), 8);
        /* The builtin is portable (a bit-trick routine without -mpopcnt). */
        int64_t cnt = __builtin_popcountll(below);
        wr64(ip + 8 * i, (uint64_t)(before + cnt));
        fp[i] = (w >> (s & 63)) & 1;
        all &= fp[i];
    }
    gil_on(ts);
    if (outside) {
        PyErr_SetString(PyExc_ValueError, "announced slot outside the sent pulse train");
        goto done;
    }
    res = PyBool_FromLong(all);
done:
    PyBuffer_Release(&wd); PyBuffer_Release(&bf); PyBuffer_Release(&sl);
    PyBuffer_Release(&ix); PyBuffer_Release(&fd);
    return res;
}

/* set_bits(words: uint64[w] writable, slots: int64[n]) : sets bit slot of the bitmap
 * (each 0 <= slot < 64 w, checked). */
static PyObject *set_bits(PyObject *self, PyObject *args) {
    Py_buffer wd, sl;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*y*", &wd, &sl)) return NULL;
    PyObject *res = NULL;
    Py_ssize_t nw = wd.len / 8, n = sl.len / 8;
    uint8_t *wp = wd.buf;
    const uint8_t *sp = sl.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s;
        memcpy(&s, sp + 8 * i, 8);
        if (s < 0 || s >= (int64_t)nw * 64) {
            PyErr_SetString(PyExc_ValueError, "set_bits: slot outside the bitmap");
            goto done;
        }
        uint64_t w = rd64(wp + 8 * (s >> 6)) | UINT64_C(1) << (s & 63);
        wr64(wp + 8 * (s >> 6), w);
    }
    res = Py_None; Py_INCREF(res);
done:
    PyBuffer_Release(&wd); PyBuffer_Release(&sl);
    return res;
}

/* The k insert positions (int64) are non-decreasing and within [0, n]. */
static int positions_ok(const uint8_t *pp, Py_ssize_t k, Py_ssize_t n, const char *name) {
    int64_t prev = 0;
    for (Py_ssize_t j = 0; j < k; j++) {
        int64_t at;
        memcpy(&at, pp + 8 * j, 8);
        if (at < prev || at > n) {
            PyErr_Format(PyExc_ValueError, "%s: positions not non-decreasing in [0, n]",
                         name);
            return 0;
        }
        prev = at;
    }
    return 1;
}

/* insert_sorted(src, pos: int64[k], vals, itemsize, out)
 * np.insert(src, pos, vals) for non-decreasing positions in [0, n] (checked): vals[j]
 * lands at out[pos[j] + j], before src[pos[j]], equal positions in order. */
static PyObject *insert_sorted(PyObject *self, PyObject *args) {
    Py_buffer src, pos, vals, out;
    Py_ssize_t isz;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*nw*", &src, &pos, &vals, &isz, &out)) return NULL;
    PyObject *res = NULL;
    if (isz <= 0 || isz > 16 || src.len % isz || vals.len % isz || pos.len % 8) {
        PyErr_SetString(PyExc_ValueError, "insert_sorted: bad item size");
        goto done;
    }
    Py_ssize_t n = src.len / isz, k = pos.len / 8;
    if (vals.len / isz != k || !need(&out, (n + k) * isz, "insert_sorted out")) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "insert_sorted: one value per position");
        goto done;
    }
    const uint8_t *sp = src.buf, *pp = pos.buf, *vp = vals.buf;
    uint8_t *op = out.buf;
    if (!positions_ok(pp, k, n, "insert_sorted")) goto done;
    Py_ssize_t from = 0, to = 0;
    PyThreadState *ts = gil_off(n + k);
    for (Py_ssize_t j = 0; j < k; j++) {
        int64_t at;
        memcpy(&at, pp + 8 * j, 8);
        Py_ssize_t run = (Py_ssize_t)at - from;
        memcpy(op + to * isz, sp + from * isz, run * isz);
        to += run; from += run;
        memcpy(op + to * isz, vp + j * isz, isz);
        to++;
    }
    memcpy(op + to * isz, sp + from * isz, (n - from) * isz);
    gil_on(ts);
    res = Py_None; Py_INCREF(res);
done:
    PyBuffer_Release(&src); PyBuffer_Release(&pos); PyBuffer_Release(&vals);
    PyBuffer_Release(&out);
    return res;
}

/* insert_inplace(buf, n, pos: int64[k], vals, itemsize)
 * insert_sorted within buf itself: its first n items become the n + k of
 * np.insert(buf[:n], pos, vals) (buf must hold n + k, checked), one backward pass. */
static PyObject *insert_inplace(PyObject *self, PyObject *args) {
    Py_buffer buf, pos, vals;
    Py_ssize_t n, isz;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*ny*y*n", &buf, &n, &pos, &vals, &isz)) return NULL;
    PyObject *res = NULL;
    if (isz <= 0 || isz > 16 || vals.len % isz || pos.len % 8 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "insert_inplace: bad item size or count");
        goto done;
    }
    Py_ssize_t k = pos.len / 8;
    if (vals.len / isz != k || k > buf.len / isz || n > buf.len / isz - k) {
        PyErr_SetString(PyExc_ValueError,
                        "insert_inplace: one value per position and room for them");
        goto done;
    }
    const uint8_t *pp = pos.buf, *vp = vals.buf;
    uint8_t *bp = buf.buf;
    if (!positions_ok(pp, k, n, "insert_inplace")) goto done;
    Py_ssize_t src_end = n;
    PyThreadState *ts = gil_off(n + k);
    for (Py_ssize_t j = k - 1; j >= 0; j--) {
        int64_t at;
        memcpy(&at, pp + 8 * j, 8);
        memmove(bp + (at + j + 1) * isz, bp + at * isz, (src_end - at) * isz);
        memcpy(bp + (at + j) * isz, vp + j * isz, isz);
        src_end = at;
    }
    gil_on(ts);
    res = Py_None; Py_INCREF(res);
done:
    PyBuffer_Release(&buf); PyBuffer_Release(&pos); PyBuffer_Release(&vals);
    return res;
}

/* sift_select(a_basis: u8[n], b_basis: u8[n], intensity: u8[n], z, x,
 *             zsel: int64[n] writable, xsel: int64[n] writable)
 *   -> (nz, nx, (n_z per class 0..2), (n_x per class 0..2))
 * The indices where both bases equal z (resp. x), in order, into zsel[:nz] (xsel[:nx]),
 * and their counts per intensity class; a class >= 3 is counted in neither (as
 * np.bincount(...)[:3] of the reference, protocol._Party._sift_counts). */
static PyObject *sift_select(PyObject *self, PyObject *args) {
    Py_buffer ab, bb, ib, zs, xs;
    int z, x;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*iiw*w*", &ab, &bb, &ib, &z, &x, &zs, &xs))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t n = ab.len;
    if (bb.len != n || ib.len != n) {
        PyErr_SetString(PyExc_ValueError, "sift_select: bases and intensities differ in length");
        goto done;
    }
    if (!need_n(&zs, n, 8, "sift_select zsel") || !need_n(&xs, n, 8, "sift_select xsel"))
        goto done;
    {
        const uint8_t *a = ab.buf, *b = bb.buf, *in = ib.buf;
        uint8_t *zo = zs.buf, *xo = xs.buf;
        Py_ssize_t nz = 0, nx = 0, cz[4] = {0, 0, 0, 0}, cx[4] = {0, 0, 0, 0};
        PyThreadState *ts = gil_off(n);
        /* Branch-free (random bases would mispredict half the time): every index is
         * written at the next free place and kept only if selected; nz, nx <= i < n. */
        for (Py_ssize_t i = 0; i < n; i++) {
            unsigned c = in[i] < 3 ? in[i] : 3;
            Py_ssize_t mz = (a[i] == b[i]) & (a[i] == z), mx = (a[i] == b[i]) & (a[i] == x);
            wr64(zo + 8 * nz, (uint64_t)i);
            wr64(xo + 8 * nx, (uint64_t)i);
            nz += mz;
            nx += mx;
            cz[c] += mz;
            cx[c] += mx;
        }
        gil_on(ts);
        res = Py_BuildValue("nn(nnn)(nnn)", nz, nx, cz[0], cz[1], cz[2], cx[0], cx[1], cx[2]);
    }
done:
    PyBuffer_Release(&ab); PyBuffer_Release(&bb); PyBuffer_Release(&ib);
    PyBuffer_Release(&zs); PyBuffer_Release(&xs);
    return res;
}

/* increasing_in(values: int64[n], limit) -> whether 0 <= values[0] and every
 * values[i-1] < values[i] and values[n-1] < limit (True for n == 0): the check of
 * Detections.body before the slots are delta-coded. */
static PyObject *increasing_in(PyObject *self, PyObject *args) {
    Py_buffer v;
    long long limit;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*L", &v, &limit)) return NULL;
    PyObject *res = NULL;
    if (v.len % 8) {
        PyErr_SetString(PyExc_ValueError, "increasing_in: not a 64-bit array");
        goto done;
    }
    {
        Py_ssize_t n = v.len / 8;
        const uint8_t *p = v.buf;
        int ok = 1;
        if (n) {
            int64_t prev, x;
            memcpy(&prev, p, 8);
            ok = prev >= 0;
            /* No early exit: a branch-free AND over the whole array. */
            for (Py_ssize_t i = 1; i < n; i++) {
                memcpy(&x, p + 8 * i, 8);
                ok &= prev < x;
                prev = x;
            }
            ok &= prev < limit;
        }
        res = PyBool_FromLong(ok);
    }
done:
    PyBuffer_Release(&v);
    return res;
}

/* sift_pick(use_idx, idx: int64[n], basis: u8[m], intensity: u8[m], bit: u8[m],
 *           other: u8[n], z, x, out_basis: u8[n], out_int: u8[n], key: u8[n],
 *           xbits: u8[n], xint: u8[n])
 *   -> (nz, nx, (n_z per class 0..2), (n_x per class 0..2))
 * One party's sifting in one pass. With use_idx (Alice): entry i is basis/intensity/bit
 * at idx[i] (each 0 <= idx[i] < m, checked), and the gathered basis and intensity go to
 * out_basis/out_int (her SiftReply); without (Bob): entry i is basis[i] etc. (m == n)
 * and out_basis/out_int are not touched. Where basis == other == z: bit into key[:nz];
 * == x: bit into xbits[:nx] and intensity into xint[:nx]; the counts per class as
 * sift_select (a class >= 3 is counted in neither). */
static PyObject *sift_pick(PyObject *self, PyObject *args) {
    Py_buffer ix, ba, in, bi, ot, ob, oi, ky, xb, xi;
    int use_idx, z, x;
    (void)self;
    if (!PyArg_ParseTuple(args, "py*y*y*y*y*iiw*w*w*w*w*", &use_idx, &ix, &ba, &in, &bi,
                          &ot, &z, &x, &ob, &oi, &ky, &xb, &xi))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t n = ot.len, m = ba.len;
    if (in.len != m || bi.len != m) {
        PyErr_SetString(PyExc_ValueError, "sift_pick: basis, intensity and bit differ in length");
        goto done;
    }
    if (use_idx) {
        if (!need_n(&ix, n, 8, "sift_pick idx") || !need_n(&ob, n, 1, "sift_pick out_basis") ||
            !need_n(&oi, n, 1, "sift_pick out_int"))
            goto done;
    } else if (m != n) {
        PyErr_SetString(PyExc_ValueError, "sift_pick: record and bases differ in length");
        goto done;
    }
    if (!need_n(&ky, n, 1, "sift_pick key") || !need_n(&xb, n, 1, "sift_pick xbits") ||
        !need_n(&xi, n, 1, "sift_pick xint"))
        goto done;
    {
        const uint8_t *ip = ix.buf, *a = ba.buf, *c = in.buf, *v = bi.buf, *o = ot.buf;
        uint8_t *pb = ob.buf, *pi = oi.buf, *pk = ky.buf, *px = xb.buf, *pxi = xi.buf;
        Py_ssize_t nz = 0, nx = 0, cz[4] = {0, 0, 0, 0}, cx[4] = {0, 0, 0, 0};
        int bad_idx = 0;
        PyThreadState *ts = gil_off(n);
        if (use_idx) {
            for (Py_ssize_t i = 0; i < n && !bad_idx; i++) {
                int64_t j;
                memcpy(&j, ip + 8 * i, 8);
                bad_idx = j < 0 || j >= m;
            }
        }
        /* Branch-free as sift_select: written at the next free place, kept if selected. */
        for (Py_ssize_t i = 0; i < n && !bad_idx; i++) {
            Py_ssize_t j = i;
            if (use_idx) {
                int64_t jj;
                memcpy(&jj, ip + 8 * i, 8);
                j = (Py_ssize_t)jj;
            }
            uint8_t ab = a[j], cl = c[j], bt = v[j];
            if (use_idx) {
                pb[i] = ab;
                pi[i] = cl;
            }
            unsigned k = cl < 3 ? cl : 3;
            Py_ssize_t mz = (ab == o[i]) & (ab == z), mx = (ab == o[i]) & (ab == x);
            pk[nz] = bt;
            px[nx] = bt;
            pxi[nx] = cl;
            nz += mz;
            nx += mx;
            cz[k] += mz;
            cx[k] += mx;
        }
        gil_on(ts);
        if (bad_idx) {
            PyErr_SetString(PyExc_ValueError, "sift_pick: index out of range");
            goto done;
        }
        res = Py_BuildValue("nn(nnn)(nnn)", nz, nx, cz[0], cz[1], cz[2], cx[0], cx[1], cx[2]);
    }
done:
    PyBuffer_Release(&ix); PyBuffer_Release(&ba); PyBuffer_Release(&in);
    PyBuffer_Release(&bi); PyBuffer_Release(&ot); PyBuffer_Release(&ob);
    PyBuffer_Release(&oi); PyBuffer_Release(&ky); PyBuffer_Release(&xb);
    PyBuffer_Release(&xi);
    return res;
}

/* parity_query_body(opens_frame: int64[k], opens_pass: int64[k], nodes: int64[n], limit)
 *   -> bytes: varint k | k frame varints | k pass varints | varint n | the n node gaps
 * (first id, then id_i - id_(i-1) - 1) as varints: ParityQuery.body_reference's bytes,
 * with its checks as ValueErrors in its order (lengths, negatives, limit, increasing). */
static PyObject *parity_query_body(PyObject *self, PyObject *args) {
    Py_buffer fb, pb, nb;
    long long limit;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*L", &fb, &pb, &nb, &limit)) return NULL;
    PyObject *res = NULL;
    if (fb.len % 8 || pb.len % 8 || nb.len % 8) {
        PyErr_SetString(PyExc_ValueError, "parity_query_body: not 64-bit arrays");
        goto done;
    }
    {
        Py_ssize_t k = fb.len / 8, n = nb.len / 8;
        const uint8_t *f = fb.buf, *q = pb.buf, *d = nb.buf;
        int64_t v, prev;
        if (pb.len != fb.len) {
            PyErr_SetString(PyExc_ValueError, "opens_frame and opens_pass differ in length");
            goto done;
        }
        int neg = 0, big = 0, dec = 0;
        Py_ssize_t size = varint_len((uint64_t)k) + varint_len((uint64_t)n);
        for (Py_ssize_t i = 0; i < k; i++) {
            memcpy(&v, f + 8 * i, 8);
            neg |= v < 0;
            big |= v >= limit;
            size += varint_len((uint64_t)v);
            memcpy(&v, q + 8 * i, 8);
            neg |= v < 0;
            big |= v >= limit;
            size += varint_len((uint64_t)v);
        }
        prev = -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            memcpy(&v, d + 8 * i, 8);
            if (i == 0) neg |= v < 0;
            /* The gap as the reference's int64 arithmetic (wrapping), then its sign. */
            uint64_t g = (uint64_t)v - (uint64_t)prev - 1;
            dec |= (int64_t)g < 0;
            size += varint_len(g);
            prev = v;
        }
        if (n) big |= prev >= limit;
        if (neg) {
            PyErr_SetString(PyExc_ValueError, "negative node, frame or pass");
            goto done;
        }
        if (big) {
            PyErr_SetString(PyExc_ValueError, "node, frame or pass at or above 2^62");
            goto done;
        }
        if (dec) {
            PyErr_SetString(PyExc_ValueError, "node ids must be strictly increasing");
            goto done;
        }
        res = PyBytes_FromStringAndSize(NULL, size);
        if (!res) goto done;
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(res);
        o = put_varint(o, (uint64_t)k);
        for (Py_ssize_t i = 0; i < k; i++) o = put_varint(o, rd64(f + 8 * i));
        for (Py_ssize_t i = 0; i < k; i++) o = put_varint(o, rd64(q + 8 * i));
        o = put_varint(o, (uint64_t)n);
        prev = -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            memcpy(&v, d + 8 * i, 8);
            o = put_varint(o, (uint64_t)v - (uint64_t)prev - 1);
            prev = v;
        }
    }
done:
    PyBuffer_Release(&fb); PyBuffer_Release(&pb); PyBuffer_Release(&nb);
    return res;
}

static PyMethodDef methods[] = {
    {"parity_query_body", parity_query_body, METH_VARARGS, "ParityQuery's body, checked"},
    {"sift_pick", sift_pick, METH_VARARGS, "one party's sifting: gathers, key, test bits"},
    {"increasing_in", increasing_in, METH_VARARGS, "strictly increasing in [0, limit)"},
    {"sift_select", sift_select, METH_VARARGS, "sifted Z/X indices and class counts"},
    {"insert_inplace", insert_inplace, METH_VARARGS, "np.insert inside spare capacity"},
    {"insert_sorted", insert_sorted, METH_VARARGS, "np.insert at sorted positions"},
    {"count_eq", count_eq, METH_VARARGS, "count a 16-bit value"},
    {"carry_scan", carry_scan, METH_VARARGS, "which slots of a chunk carry photons"},
    {"emit_fill", emit_fill, METH_VARARGS, "photon numbers, classes, bases, bits, states"},
    {"photon_sum", photon_sum, METH_VARARGS, "photons in a chunk of states"},
    {"measure_chunk", measure_chunk, METH_VARARGS, "photons, dark clicks, collect fused"},
    {"varints_encode", varints_encode, METH_VARARGS, "LEB128 of uint64 values or deltas"},
    {"varints_decode", varints_decode, METH_VARARGS, "canonical LEB128 varints, checked"},
    {"rank_lookup", rank_lookup, METH_VARARGS, "slot indices by rank in a bitmap"},
    {"set_bits", set_bits, METH_VARARGS, "set slots in a bitmap"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_qkdgw_bb84", "Compiled kernels of the emulated BB84 link.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__qkdgw_bb84(void) { return PyModule_Create(&module); }
