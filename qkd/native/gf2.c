/* GF(2) Toeplitz products for privacy amplification (module _qkdgw_gf2).
 *
 * T x (T[i, j] = s[i - j + n - 1]) is the middle part of the carry-less product s * x.
 * The m x n matrix is cut into square N x N blocks (N = 64 K bits); each block is a
 * middle product computed by the transposed Karatsuba recursion
 *   y0 = MP(S_h, x0 ^ x1) ^ MP(S_0 ^ S_h, x1),  y1 = MP(S_h, x0 ^ x1) ^ MP(S_2h ^ S_h, x0)
 * (three half-size products, the Toeplitz analogue of Karatsuba), down to a word-level
 * schoolbook middle product that uses VPCLMULQDQ (ymm) or PCLMULQDQ when the CPU has
 * them, else a portable 4-bit-window software clmul. The seed is packed shifted by one bit so that the block
 * result is exactly words K .. 2K-1 of the product: every slice is word aligned.
 * Input and output are arrays of 0/1 bytes (the low bit of each byte is used, i.e. the
 * value mod 2, as the dense reference computes).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GF2_X86 1
#else
#define GF2_X86 0
#endif

typedef uint64_t u64;

/* Largest block (in words) done by the schoolbook base case; tuned on Zen 3. */
#ifndef GF2_BASE_MAX
#define GF2_BASE_MAX 24
#endif

typedef void (*base_fn)(const u64 *s, const u64 *x, u64 *y, size_t k);

/* --- portable carry-less multiply ------------------------------------------------------ */

/* 4-bit window tables of a: tl[i] ^ (th[i] << 64) = a * i (carry-less). */
static inline void soft_table(u64 a, u64 *tl, u64 *th) {
    tl[0] = th[0] = 0;
    for (unsigned i = 1; i < 16; i++) {
        unsigned t = 31 - (unsigned)__builtin_clz(i); /* top bit of i */
        unsigned r = i ^ (1u << t);
        tl[i] = tl[r] ^ (a << t);
        th[i] = th[r] ^ (t ? a >> (64 - t) : 0);
    }
}

static inline void clmul_soft(const u64 *tl, const u64 *th, u64 b, u64 *lo, u64 *hi) {
    u64 l = tl[b & 15], h = th[b & 15];
    for (unsigned k = 4; k < 64; k += 4) {
        unsigned nib = (unsigned)(b >> k) & 15;
        l ^= tl[nib] << k;
        h ^= (tl[nib] >> (64 - k)) ^ (th[nib] << k);
    }
    *lo = l;
    *hi = h;
}

/* Middle product base case: y[i] = word K + i of s (2K words) * x (K words). */
static void base_soft(const u64 *s, const u64 *x, u64 *y, size_t k) {
    u64 tab[2 * 16 * GF2_BASE_MAX]; /* tables of each x word, reused K + 1 times */
    u64 one[32];
    int cached = k <= GF2_BASE_MAX;
    if (cached)
        for (size_t b = 0; b < k; b++) soft_table(x[b], tab + 32 * b, tab + 32 * b + 16);
    u64 phi = 0; /* high word of acc[d - 1] */
    for (size_t d = 0; d <= k; d++) {
        u64 lo = 0, hi = 0;
        for (size_t b = 0; b < k; b++) {
            const u64 *tb = tab + 32 * b;
            if (!cached) {
                soft_table(x[b], one, one + 16);
                tb = one;
            }
            u64 l, h;
            clmul_soft(tb, tb + 16, s[d + k - 1 - b], &l, &h);
            lo ^= l;
            hi ^= h;
        }
        if (d) y[d - 1] = lo ^ phi;
        phi = hi;
    }
}

#if GF2_X86
__attribute__((target("pclmul,sse4.1")))
static void base_pclmul(const u64 *s, const u64 *x, u64 *y, size_t k) {
    __m128i prev = _mm_setzero_si128();
    size_t kp = k & ~(size_t)1;
    for (size_t d = 0; d <= k; d++) {
        __m128i a0 = _mm_setzero_si128(), a1 = _mm_setzero_si128();
        for (size_t b = 0; b < kp; b += 2) {
            /* sv = (s[a - 1], s[a]) with a = d + k - 1 - b; xv = (x[b], x[b + 1]). */
            __m128i sv = _mm_loadu_si128((const __m128i *)(s + d + k - 2 - b));
            __m128i xv = _mm_loadu_si128((const __m128i *)(x + b));
            a0 = _mm_xor_si128(a0, _mm_clmulepi64_si128(sv, xv, 0x01));
            a1 = _mm_xor_si128(a1, _mm_clmulepi64_si128(sv, xv, 0x10));
        }
        if (k & 1) {
            __m128i sv = _mm_cvtsi64_si128((long long)s[d]);
            __m128i xv = _mm_cvtsi64_si128((long long)x[k - 1]);
            a0 = _mm_xor_si128(a0, _mm_clmulepi64_si128(sv, xv, 0x00));
        }
        __m128i acc = _mm_xor_si128(a0, a1);
        if (d) {
            /* low word of acc[d] ^ high word of acc[d - 1] */
            __m128i w = _mm_xor_si128(acc, _mm_srli_si128(prev, 8));
            y[d - 1] = (u64)_mm_cvtsi128_si64(w);
        }
        prev = acc;
    }
}
/* Same with 256-bit VPCLMULQDQ: two products per instruction. xr holds x in groups of
 * four as (x[b+2], x[b+3], x[b], x[b+1]) so that one 256-bit load of s[a-3 .. a]
 * (a = d + k - 1 - b) pairs every s word with the x word of the same diagonal. */
__attribute__((target("avx2,vpclmulqdq,pclmul,sse4.1")))
static void base_vpclmul(const u64 *s, const u64 *x, u64 *y, size_t k) {
    u64 xr[GF2_BASE_MAX + 4];
    size_t k4 = k & ~(size_t)3, kp = k & ~(size_t)1;
    if (k > GF2_BASE_MAX) {
        base_pclmul(s, x, y, k);
        return;
    }
    for (size_t b = 0; b < k4; b += 4) {
        xr[b] = x[b + 2];
        xr[b + 1] = x[b + 3];
        xr[b + 2] = x[b];
        xr[b + 3] = x[b + 1];
    }
    __m128i prev = _mm_setzero_si128();
    for (size_t d = 0; d <= k; d++) {
        __m256i w0 = _mm256_setzero_si256(), w1 = _mm256_setzero_si256();
        for (size_t b = 0; b < k4; b += 4) {
            __m256i sv = _mm256_loadu_si256((const __m256i *)(s + d + k - 4 - b));
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + b));
            w0 = _mm256_xor_si256(w0, _mm256_clmulepi64_epi128(sv, xv, 0x01));
            w1 = _mm256_xor_si256(w1, _mm256_clmulepi64_epi128(sv, xv, 0x10));
        }
        __m256i w = _mm256_xor_si256(w0, w1);
        __m128i acc = _mm_xor_si128(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        for (size_t b = k4; b < kp; b += 2) {
            __m128i sv = _mm_loadu_si128((const __m128i *)(s + d + k - 2 - b));
            __m128i xv = _mm_loadu_si128((const __m128i *)(x + b));
            acc = _mm_xor_si128(acc, _mm_clmulepi64_si128(sv, xv, 0x01));
            acc = _mm_xor_si128(acc, _mm_clmulepi64_si128(sv, xv, 0x10));
        }
        if (k & 1) {
            __m128i sv = _mm_cvtsi64_si128((long long)s[d]);
            __m128i xv = _mm_cvtsi64_si128((long long)x[k - 1]);
            acc = _mm_xor_si128(acc, _mm_clmulepi64_si128(sv, xv, 0x00));
        }
        if (d) y[d - 1] = (u64)_mm_cvtsi128_si64(_mm_xor_si128(acc, _mm_srli_si128(prev, 8)));
        prev = acc;
    }
}
#endif

/* --- transposed Karatsuba -------------------------------------------------------------- */

/* y (K words) = middle product of s (2K words) and x (K words); scratch: 4K words. */
static void mp(const u64 *s, const u64 *x, u64 *y, size_t k, u64 *scratch, base_fn base) {
    if (k <= GF2_BASE_MAX || (k & 1)) {
        base(s, x, y, k);
        return;
    }
    size_t h = k / 2;
    u64 *xs = scratch, *ts = scratch + h, *p0 = scratch + 3 * h, *rest = scratch + 4 * h;
    for (size_t i = 0; i < h; i++) xs[i] = x[i] ^ x[h + i];
    mp(s + h, xs, p0, h, rest, base);
    for (size_t i = 0; i < 2 * h; i++) ts[i] = s[i] ^ s[h + i];
    mp(ts, x + h, y, h, rest, base);
    for (size_t i = 0; i < 2 * h; i++) ts[i] = s[2 * h + i] ^ s[h + i];
    mp(ts, x, y + h, h, rest, base);
    for (size_t i = 0; i < h; i++) {
        y[i] ^= p0[i];
        y[h + i] ^= p0[i];
    }
}

/* --- packing --------------------------------------------------------------------------- */

/* dst[w] bit t = low bit of src[start + 64 w + t], zero outside [0, len). */
static void pack(const uint8_t *src, int64_t len, int64_t start, u64 *dst, size_t nw) {
    for (size_t w = 0; w < nw; w++) {
        int64_t p = start + 64 * (int64_t)w;
        u64 word = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        if (p >= 0 && p + 64 <= len) {
            for (unsigned k = 0; k < 8; k++) {
                u64 v;
                memcpy(&v, src + p + 8 * k, 8);
                v &= 0x0101010101010101ULL;
                /* byte j's bit lands at bit 56 + j; no two partial products overlap */
                word |= ((v * 0x0102040810204080ULL) >> 56) << (8 * k);
            }
            dst[w] = word;
            continue;
        }
#endif
        for (unsigned t = 0; t < 64; t++) {
            int64_t q = p + t;
            if (q >= 0 && q < len) word |= (u64)(src[q] & 1) << t;
        }
        dst[w] = word;
    }
}

static u64 spread[256]; /* byte j of spread[b] = bit j of b; filled at import */

static void unpack(const u64 *src, uint8_t *dst, size_t nbits) {
    const uint8_t *bytes = (const uint8_t *)src;
    size_t i = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (; i + 8 <= nbits; i += 8) memcpy(dst + i, &spread[bytes[i >> 3]], 8);
#endif
    (void)bytes;
    for (; i < nbits; i++) dst[i] = (uint8_t)((src[i >> 6] >> (i & 63)) & 1);
}

/* --- planning -------------------------------------------------------------------------- */

static size_t pad_words(size_t k, unsigned *levels) {
    unsigned l = 0;
    while (((k + ((size_t)1 << l) - 1) >> l) > GF2_BASE_MAX) l++;
    *levels = l;
    return ((k + ((size_t)1 << l) - 1) >> l) << l;
}

static double block_cost(size_t kp, unsigned levels) {
    double b = (double)(kp >> levels), c = b * (b + 1);
    for (unsigned i = 0; i < levels; i++) c = 3 * c + 2.0 * (double)(kp >> (levels - i)) / 4;
    return c;
}

/* T x for x of n bits, seed of n + m - 1 bits, m > 0, n > 0. Returns 0 or -1 (no memory). */
static int toeplitz(const uint8_t *x, int64_t n, const uint8_t *seed, int64_t m, uint8_t *out,
                    base_fn base) {
    int64_t mn = n < m ? n : m;
    size_t wmin = (size_t)((mn + 63) / 64);
    size_t best_k = 0;
    double best = 0;
    for (size_t q = 1; q <= 8 && q <= wmin; q++) {
        unsigned lv;
        size_t kp = pad_words((wmin + q - 1) / q, &lv);
        int64_t nb = 64 * (int64_t)kp;
        double r = (double)((m + nb - 1) / nb), c = (double)((n + nb - 1) / nb);
        double cost = r * c * (block_cost(kp, lv) + 3.0 * (double)kp);
        if (!best_k || cost < best) {
            best = cost;
            best_k = kp;
        }
    }
    size_t k = best_k;
    int64_t nbits = 64 * (int64_t)k;
    int64_t rows = (m + nbits - 1) / nbits, cols = (n + nbits - 1) / nbits;
    u64 *buf = malloc(sizeof(u64) * (8 * k + (size_t)rows * k));
    if (!buf) return -1;
    u64 *sp = buf, *xp = buf + 2 * k, *yb = buf + 3 * k, *scratch = buf + 4 * k;
    u64 *y = buf + 8 * k;
    memset(y, 0, sizeof(u64) * (size_t)rows * k);
    int64_t slen = n + m - 1;
    for (int64_t c = 0; c < cols; c++) {
        pack(x, n, c * nbits, xp, k);
        for (int64_t r = 0; r < rows; r++) {
            /* block seed'' bit t = s[t - 1 + (r - c) N + n - N] */
            pack(seed, slen, (r - c) * nbits + n - nbits - 1, sp, 2 * k);
            mp(sp, xp, yb, k, scratch, base);
            u64 *yr = y + (size_t)r * k;
            for (size_t i = 0; i < k; i++) yr[i] ^= yb[i];
        }
    }
    unpack(y, out, (size_t)m);
    free(buf);
    return 0;
}

/* --- Python ---------------------------------------------------------------------------- */

enum { ISA_PORTABLE = 0, ISA_PCLMUL = 1, ISA_VPCLMUL = 2 };
static const char *isa_names[] = {"portable", "pclmul", "vpclmul"};

/* The best base case this CPU (and OS, for the ymm state) supports. */
static int best_isa(void) {
#if GF2_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("pclmul") || !__builtin_cpu_supports("sse4.1"))
        return ISA_PORTABLE;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq"))
        return ISA_VPCLMUL;
    return ISA_PCLMUL;
#else
    return ISA_PORTABLE;
#endif
}

static int have_pclmul(void) { return best_isa() >= ISA_PCLMUL; }

static PyObject *py_toeplitz(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"x", "seed", "m", "out", "force_portable", "isa", NULL};
    Py_buffer xb, sb, ob;
    Py_ssize_t m;
    int force = 0;
    const char *isa_arg = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*y*nw*|pz", kwlist, &xb, &sb, &m, &ob,
                                     &force, &isa_arg))
        return NULL;
    PyObject *ret = NULL;
    int isa = force ? ISA_PORTABLE : best_isa();
    if (isa_arg) {
        int want = -1;
        for (int i = 0; i < 3; i++)
            if (!strcmp(isa_arg, isa_names[i])) want = i;
        if (want < 0 || want > best_isa()) {
            PyErr_Format(PyExc_ValueError,
                         "isa must be one of this CPU's base cases (see isas()), got %.20s",
                         isa_arg);
            goto done;
        }
        isa = force ? ISA_PORTABLE : want;
    }
    Py_ssize_t n = xb.len;
    if (m < 0) {
        PyErr_Format(PyExc_ValueError, "m must be >= 0, got %zd", m);
        goto done;
    }
    if (n > PY_SSIZE_T_MAX / 4 || m > PY_SSIZE_T_MAX / 4) {
        PyErr_SetString(PyExc_ValueError, "x or m too large");
        goto done;
    }
    if (m > 0 && sb.len != n + m - 1) {
        PyErr_Format(PyExc_ValueError, "seed must have n + m - 1 = %zd bits, got %zd",
                     n + m - 1, sb.len);
        goto done;
    }
    if (m == 0 && sb.len != 0 && sb.len != n - 1) {
        PyErr_Format(PyExc_ValueError, "seed must have n - 1 = %zd bits for m = 0, got %zd",
                     n - 1, sb.len);
        goto done;
    }
    if (ob.len != m) {
        PyErr_Format(PyExc_ValueError, "out must have m = %zd bytes, got %zd", m, ob.len);
        goto done;
    }
    if (m == 0) {
        ret = Py_NewRef(Py_None);
        goto done;
    }
    if (n == 0) {
        memset(ob.buf, 0, (size_t)m);
        ret = Py_NewRef(Py_None);
        goto done;
    }
    base_fn base = base_soft;
#if GF2_X86
    if (isa == ISA_PCLMUL) base = base_pclmul;
    if (isa == ISA_VPCLMUL) base = base_vpclmul;
#endif
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = toeplitz(xb.buf, n, sb.buf, m, ob.buf, base);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_NoMemory();
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&xb);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&ob);
    return ret;
}

static PyObject *py_has_pclmul(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(have_pclmul());
}

static PyObject *py_isas(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    PyObject *list = PyList_New(0);
    for (int i = 0; list && i <= best_isa(); i++) {
        PyObject *s = PyUnicode_FromString(isa_names[i]);
        if (!s || PyList_Append(list, s) < 0) {
            Py_XDECREF(s);
            Py_CLEAR(list);
            break;
        }
        Py_DECREF(s);
    }
    return list;
}

static PyMethodDef methods[] = {
    {"toeplitz", (PyCFunction)(void (*)(void))py_toeplitz, METH_VARARGS | METH_KEYWORDS,
     "toeplitz(x, seed, m, out, force_portable=False, isa=None): out[i] = XOR_j "
     "seed[i - j + n - 1] & x[j] over 0/1 bytes (n = len(x), len(seed) = n + m - 1, "
     "len(out) = m); isa picks a base case from isas() (default: the fastest)."},
    {"isas", py_isas, METH_NOARGS, "Base cases this CPU can run, slowest first."},
    {"has_pclmul", py_has_pclmul, METH_NOARGS,
     "True when the PCLMULQDQ base case is used (unless force_portable)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_qkdgw_gf2",
    "GF(2) Toeplitz products (privacy amplification) by carry-less Karatsuba.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__qkdgw_gf2(void) {
    for (unsigned b = 0; b < 256; b++) {
        u64 v = 0;
        for (unsigned j = 0; j < 8; j++) v |= (u64)((b >> j) & 1) << (8 * j);
        spread[b] = v;
    }
    return PyModule_Create(&module);
}
