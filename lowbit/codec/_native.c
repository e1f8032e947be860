/* lowbit.codec._native: the codec's inner loops in C, each one pass over its data.
 *
 *   decode_sum: S packed b-bit frames of one tensor -> their fp32 values, summed in frame order and
 *               divided once (or added to what `out` holds); S = 1 is a plain decode. Every CPU fp32
 *               decode of lowbit.codec goes through it (AVX2 for b <= 4 where the CPU has it).
 *   decode:     one frame through tables already scaled in Python (the single-frame loop that
 *               benchmarks/decode_sum_ab.py compares decode_sum against).
 *   pack:       uint8 codes -> the packed b-bit stream.
 *
 * The torch-op versions (codecs.py, pack.py) cost several passes over cache-sized chunks each
 * (build indices, check the grid, index_select, add; shift/or/mask steps). This module is optional:
 * lowbit.codec.native says whether it was built, and the torch ops run when it was not; tests/codec
 * run every codec test on the torch ops, the scalar loops and the AVX2 path and check they give the
 * same bits.
 *
 * Layout (lowbit.codec.pack): code j of a tensor sits at bits [b*j, b*j + b) of the little-endian
 * byte stream. Unit tables (decode_sum: unscaled, multiplied by each frame's scale here; decode:
 * already multiplied by the frame's scale in fp32 by the caller):
 *   b in {1, 2, 4, 8}: 256 entries of 8/b floats, entry i = the values of the codes in byte i;
 *   b == 3:            4096 entries of 4 floats, entry i = the values of the 4 codes in the 12-bit
 *                      field i (a 3-byte group of 8 codes is two such fields);
 *   one:               the 2^b single-code values (for the last codes that share a unit with padding).
 * bad (optional): one byte per table entry, nonzero when the entry holds the all-ones code (outside a
 * symmetric or log grid); a code past n (padding) is never checked. Values are stored with memcpy, so any float alignment of `out` is fine.
 * Floating point: plain fp32 stores / adds (no FMA, no reassociation: build without -ffast-math), so
 * the result is bit-identical to the torch path's index_select / add_.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_simd.h"

#define INLINE static inline __attribute__((always_inline))

INLINE uint8_t bytes_loop(const uint8_t *p, int64_t nb, const float *tab, const uint8_t *bad, float *out,
                          const int per, const int acc, const int chk) {
    uint8_t flag = 0;
    for (int64_t i = 0; i < nb; i++) {
        const unsigned c = p[i];
        const float *t = tab + (size_t)c * per;
        float *o = out + i * per;
        if (acc) {
            for (int k = 0; k < per; k++) o[k] += t[k];
        } else {
            memcpy(o, t, (size_t)per * sizeof(float));
        }
        if (chk) flag |= bad[c];
    }
    return flag;
}

INLINE uint8_t groups3_loop(const uint8_t *p, int64_t ng, const float *tab, const uint8_t *bad, float *out,
                            const int acc, const int chk) {
    uint8_t flag = 0;
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *q = p + 3 * g;
        const uint32_t w = (uint32_t)q[0] | ((uint32_t)q[1] << 8) | ((uint32_t)q[2] << 16);
        const uint32_t i0 = w & 0xFFFu, i1 = w >> 12;
        const float *t0 = tab + 4 * (size_t)i0, *t1 = tab + 4 * (size_t)i1;
        float *o = out + 8 * g;
        if (acc) {
            for (int k = 0; k < 4; k++) o[k] += t0[k];
            for (int k = 0; k < 4; k++) o[4 + k] += t1[k];
        } else {
            memcpy(o, t0, 4 * sizeof(float));
            memcpy(o + 4, t1, 4 * sizeof(float));
        }
        if (chk) flag |= bad[i0] | bad[i1];
    }
    return flag;
}

/* Specialize the loops on (per, acc, chk) so the compiler sees constants. */
#define DISPATCH(CALL_ACC_CHK)                                                   \
    (acc ? (chk ? CALL_ACC_CHK(1, 1) : CALL_ACC_CHK(1, 0))                       \
         : (chk ? CALL_ACC_CHK(0, 1) : CALL_ACC_CHK(0, 0)))

static uint8_t run_bytes(const uint8_t *p, int64_t nb, const float *tab, const uint8_t *bad, float *out,
                         int per, int acc, int chk) {
#define B1(A, C) bytes_loop(p, nb, tab, bad, out, 1, A, C)
#define B2(A, C) bytes_loop(p, nb, tab, bad, out, 2, A, C)
#define B4(A, C) bytes_loop(p, nb, tab, bad, out, 4, A, C)
#define B8(A, C) bytes_loop(p, nb, tab, bad, out, 8, A, C)
    switch (per) {
    case 1: return DISPATCH(B1);
    case 2: return DISPATCH(B2);
    case 4: return DISPATCH(B4);
    default: return DISPATCH(B8);
    }
}

static uint8_t run_groups3(const uint8_t *p, int64_t ng, const float *tab, const uint8_t *bad, float *out,
                           int acc, int chk) {
#define G3(A, C) groups3_loop(p, ng, tab, bad, out, A, C)
    return DISPATCH(G3);
}

/* codes j0 .. j1 of the payload p (nbytes) one at a time through the single-code values `one`, into
 * or onto out[0 .. j1 - j0): the codes that share a unit with padding, and small frames without a
 * unit table. Returns 1 if one of them is the all-ones code (chk). */
static uint8_t codes_one_by_one(const uint8_t *p, int64_t nbytes, int64_t j0, int64_t j1, int bits,
                                const float *one, float *out, int acc, int chk) {
    const unsigned mask = (1u << bits) - 1;
    uint8_t flag = 0;
    for (int64_t j = j0; j < j1; j++) {
        const int64_t pos = j * bits, byte = pos >> 3;
        unsigned v = p[byte];
        if (byte + 1 < nbytes) v |= (unsigned)p[byte + 1] << 8;
        const unsigned c = (v >> (pos & 7)) & mask;
        if (acc) out[j - j0] += one[c]; else out[j - j0] = one[c];
        if (chk && c == mask) flag = 1;
    }
    return flag;
}

/* decode(payload, nbytes, out, n, bits, table, one, bad, accumulate) -> 1 if a code outside the grid
 * was seen (bad given), else 0. Pointers are addresses (ints); `bad` 0 = no check; `table` 0 = every
 * code through `one` (a small frame, where building the 4096-entry table would cost more). */
static PyObject *native_decode(PyObject *self, PyObject *args) {
    unsigned long long pp, op, tp, onep, bp;
    long long nbytes, n;
    int bits, acc;
    if (!PyArg_ParseTuple(args, "KLKLiKKKp", &pp, &nbytes, &op, &n, &bits, &tp, &onep, &bp, &acc))
        return NULL;
    if (!(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8)) {
        PyErr_Format(PyExc_ValueError, "_native.decode: bits must be 1, 2, 3, 4 or 8, got %d", bits);
        return NULL;
    }
    if (n < 0 || nbytes < 0 || (n * bits + 7) / 8 > nbytes) {
        PyErr_Format(PyExc_ValueError, "_native.decode: %lld codes of %d bits need %lld payload bytes, got %lld",
                     n, bits, (n * bits + 7) / 8, nbytes);
        return NULL;
    }
    const uint8_t *p = (const uint8_t *)(uintptr_t)pp;
    float *out = (float *)(uintptr_t)op;
    const float *tab = (const float *)(uintptr_t)tp, *one = (const float *)(uintptr_t)onep;
    const uint8_t *bad = (const uint8_t *)(uintptr_t)bp;
    const int chk = bad != NULL;
    uint8_t flag = 0;
    Py_BEGIN_ALLOW_THREADS
    int64_t done = 0;  /* values written by the unit loop (none without a table: a small frame) */
    if (tab == NULL) {
    } else if (bits == 3) {
        const int64_t ng = n / 8;
        flag = run_groups3(p, ng, tab, bad, out, acc, chk);
        done = 8 * ng;
    } else {
        const int per = 8 / bits;
        const int64_t nb = n / per;
        flag = run_bytes(p, nb, tab, bad, out, per, acc, chk);
        done = nb * per;
    }
    /* the last codes share a unit with padding: one at a time */
    flag |= codes_one_by_one(p, nbytes, done, n, bits, one, out + done, acc, chk);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(flag ? 1 : 0);
}

/* ---------------------------------------------------------------- decode_sum
 * The decode above takes tables already scaled in Python (a few torch calls per frame: for a model's
 * many small frames they cost more than the decode). decode_sum takes the *unscaled* grid tables
 * (cached per grid) and each frame's scale, multiplies the tables here (the same fp32 products as
 * `table * scale` in torch), and decodes S frames of one tensor in a single pass over `out`:
 *
 *     out[j] = ((v0[j] + v1[j]) + ... + v_{S-1}[j]) / divisor       (accumulate: out[j] + v0[j] + ...)
 *
 * block by block (BLOCK values in an L1-resident buffer), in that order and with plain fp32 adds and
 * one division, so the result has the bits of decoding v0 into out, adding v1, ... and then
 * out.div_(divisor), as the torch path does, but `out` is written once instead of S + 1 times. */
#define BLOCK 2048      /* values per block: a multiple of 8 (whole 3-bit groups and bytes) */
#define MAX_STREAMS 64

typedef struct {
    const uint8_t *p;   /* the frame's payload */
    int64_t nbytes;
    const float *scale; /* the frame's one fp32 scale */
    float *tab;         /* scaled unit table (NULL: code by code) */
    float *one;         /* scaled single-code values */
} stream_t;

/* codes j0 .. j0 + m of one stream (j0 a multiple of 8) into or onto buf[0 .. m) */
static uint8_t stream_range(const stream_t *st, int64_t j0, int64_t m, int bits, const uint8_t *bad, float *buf,
                            int acc) {
    const int chk = bad != NULL;
    const uint8_t *p = st->p + (j0 * bits) / 8;
    uint8_t flag = 0;
    int64_t done = 0;
    if (st->tab != NULL) {
        if (bits == 3) {
            const int64_t ng = m / 8;
            flag = run_groups3(p, ng, st->tab, bad, buf, acc, chk);
            done = 8 * ng;
        } else {
            const int per = 8 / bits;
            const int64_t nb = m / per;
            flag = run_bytes(p, nb, st->tab, bad, buf, per, acc, chk);
            done = nb * per;
        }
    }
    return flag | codes_one_by_one(st->p, st->nbytes, j0 + done, j0 + m, bits, st->one, buf + done, acc, chk);
}

/* The AVX2 path of decode_sum for b in {1, 2, 3, 4}: 8 codes (b bytes) at a time per frame, all frames
 * of the block summed in registers and `out` stored once. The 8 codes of a group are one 32-bit load
 * broadcast to 8 lanes and shifted by 0, b, .., 7b; their values come from the frame's 2^b-entry table
 * held in a register (vpermps; for b = 4 two halves and a blend on bit 3). The values are the table's
 * floats and the adds and the division are single fp32 operations in the same order as the scalar
 * path, so the bits are the same. Chosen at run time where the CPU has AVX2. */
#ifdef HAVE_AVX2_PATH
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2")))

/* the 8 values of group g of a stream: codes from one 32-bit load (`safe`: 4 bytes are there) */
AVX2 INLINE __m256 group_values(const stream_t *st, int64_t g, const int bits, const int safe, __m256 lo, __m256 hi,
                                __m256i sh, __m256i mask, const int chk, int *badm) {
    const int64_t off = g * bits;
    uint32_t w = 0;
    if (safe) memcpy(&w, st->p + off, 4);
    else memcpy(&w, st->p + off, (size_t)bits);
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), mask);
    __m256 v = _mm256_permutevar8x32_ps(lo, idx);
    if (bits == 4)
        v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(hi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    if (chk) *badm |= _mm256_movemask_epi8(_mm256_cmpeq_epi32(idx, mask));
    return v;
}

/* 8 values to out: a plain store, or (nt) a streaming one, which writes the line without reading it
 * first (out 32-byte aligned; see nt_min_bytes) */
AVX2 INLINE void store8(float *p, __m256 v, const int nt) {
    if (nt) _mm256_stream_ps(p, v);
    else _mm256_storeu_ps(p, v);
}

/* groups g0 .. g1 of S streams: sum (in stream order, onto out with acc), divide, store once */
AVX2 INLINE void groups_avx2(const stream_t *st, const Py_ssize_t S, int64_t g0, int64_t g1, const int bits,
                             float *out, const int acc, const int divide, float d, const int chk, int *badm,
                             const int safe, const __m256 *lo, const __m256 *hi, const int nt) {
    const __m256i sh = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    const __m256 dv = _mm256_set1_ps(d);
    if (S == 1) {
        const __m256 l0 = lo[0], h0 = hi[0];
        int b0 = 0;
        for (int64_t g = g0; g < g1; g++) {
            __m256 v = group_values(&st[0], g, bits, safe, l0, h0, sh, mask, chk, &b0);
            if (acc) v = _mm256_add_ps(_mm256_loadu_ps(out + 8 * g), v);
            if (divide) v = _mm256_div_ps(v, dv);
            store8(out + 8 * g, v, nt);
        }
        badm[0] |= b0;
    } else if (S == 2) {
        const __m256 l0 = lo[0], h0 = hi[0], l1 = lo[1], h1 = hi[1];
        int b0 = 0, b1 = 0;
        for (int64_t g = g0; g < g1; g++) {
            const __m256 v0 = group_values(&st[0], g, bits, safe, l0, h0, sh, mask, chk, &b0);
            const __m256 v1 = group_values(&st[1], g, bits, safe, l1, h1, sh, mask, chk, &b1);
            __m256 v = acc ? _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(out + 8 * g), v0), v1) : _mm256_add_ps(v0, v1);
            if (divide) v = _mm256_div_ps(v, dv);
            store8(out + 8 * g, v, nt);
        }
        badm[0] |= b0;
        badm[1] |= b1;
    } else {
        for (int64_t g = g0; g < g1; g++) {
            __m256 v = acc ? _mm256_loadu_ps(out + 8 * g) : _mm256_setzero_ps();
            for (Py_ssize_t s = 0; s < S; s++) {
                const __m256 vs = group_values(&st[s], g, bits, safe, lo[s], hi[s], sh, mask, chk, &badm[s]);
                v = (s == 0 && !acc) ? vs : _mm256_add_ps(v, vs);
            }
            if (divide) v = _mm256_div_ps(v, dv);
            store8(out + 8 * g, v, nt);
        }
    }
}

#define GROUPS_AVX2(B, C)                                                                                  \
    do {                                                                                                   \
        if (C) groups_avx2(st, S, g0, g1, B, out, acc, divide, d, 1, badm, safe, lo, hi, nt);              \
        else groups_avx2(st, S, g0, g1, B, out, acc, divide, d, 0, badm, safe, lo, hi, nt);                \
    } while (0)

/* nt: out written with streaming stores (the caller checked alignment and size; fenced here) */
AVX2 static void sum_groups_avx2(const stream_t *st, Py_ssize_t S, int64_t ga, int64_t gb, int bits, float *out,
                                 int acc, int divide, float d, int chk, int *badm, const int nt) {
    __m256 lo[MAX_STREAMS], hi[MAX_STREAMS];
    const int nv = 1 << bits;
    /* groups below g_safe can be read with one 4-byte load in every stream */
    int64_t g_safe = gb;
    for (Py_ssize_t s = 0; s < S; s++) {
        float t[16] = {0};
        for (int i = 0; i < nv; i++) t[i] = st[s].one[i];
        lo[s] = _mm256_loadu_ps(t);
        hi[s] = _mm256_loadu_ps(t + 8);
        const int64_t gs = st[s].nbytes >= 4 ? (st[s].nbytes - 4) / bits + 1 : 0;
        if (gs < g_safe) g_safe = gs;
    }
    if (g_safe < ga) g_safe = ga;
    for (int pass = 0; pass < 2; pass++) {
        const int safe = pass == 0;
        const int64_t g0 = safe ? ga : g_safe, g1 = safe ? g_safe : gb;
        if (g0 >= g1) continue;
        switch (bits) {
        case 1: GROUPS_AVX2(1, chk); break;
        case 2: GROUPS_AVX2(2, chk); break;
        case 3: GROUPS_AVX2(3, chk); break;
        default: GROUPS_AVX2(4, chk); break;
        }
    }
    if (nt) _mm_sfence();  /* the streamed lines are visible to other threads once this call returns */
}
#endif

/* decode_sum writes out with streaming stores when it only writes it (no accumulate) and out holds at least
 * this many bytes. A plain store reads every line before writing it (write-allocate), which doubles the
 * memory traffic of a decode. In a step the outputs are not read again while they could still be in
 * cache: a worker's parameters wait for the next forward pass, a server's sums for the next chunk
 * (several ms and MBs of socket buffers later). 256 KiB streams every matrix of a BERT-sized model
 * (384x384 and up) while outputs a core's L2 holds stay plain, for a reader that comes at once
 * (measurements: docs/benchmarks.md). nt_stores(n) sets it (n >= 0; a huge n turns them off), -1 reads. */
static long long nt_min_bytes = 256LL << 10;

static PyObject *native_nt_stores(PyObject *self, PyObject *args) {
    long long n;
    if (!PyArg_ParseTuple(args, "L", &n)) return NULL;
    if (n >= 0) nt_min_bytes = n;
    return PyLong_FromLongLong(nt_min_bytes);
}

/* decode_sum(out, a, e, n, bits, utable, uone, bad, streams, divisor, accumulate) -> 0, or 1 + the index
 * of the first stream holding a code outside the grid (bad given). Values a .. e (a a multiple of 8) of
 * n-value frames; out is the address of value 0. streams: a sequence of (payload, nbytes, scale) addresses
 * and sizes; utable 0 = every code through uone (a small frame); divisor <= 1 = no division. */
static PyObject *native_decode_sum(PyObject *self, PyObject *args) {
    unsigned long long op, tp, onep, bp;
    long long a, e, n, divisor;
    int bits, acc;
    PyObject *streams;
    if (!PyArg_ParseTuple(args, "KLLLiKKKOLp", &op, &a, &e, &n, &bits, &tp, &onep, &bp, &streams, &divisor, &acc))
        return NULL;
    if (!(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8)) {
        PyErr_Format(PyExc_ValueError, "_native.decode_sum: bits must be 1, 2, 3, 4 or 8, got %d", bits);
        return NULL;
    }
    if (n < 0 || a < 0 || a > e || e > n || a % 8) {
        PyErr_Format(PyExc_ValueError, "_native.decode_sum: range [%lld, %lld) of %lld values is not valid "
                     "(start a multiple of 8, 0 <= start <= end <= n)", a, e, n);
        return NULL;
    }
    if (n > 0 && (op == 0 || onep == 0)) {
        PyErr_SetString(PyExc_ValueError, "_native.decode_sum: out and uone must be addresses, got 0");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(streams, "_native.decode_sum: streams must be a sequence");
    if (seq == NULL) return NULL;
    const Py_ssize_t S = PySequence_Fast_GET_SIZE(seq);
    if (S < 1 || S > MAX_STREAMS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "_native.decode_sum: 1..%d streams, got %zd", MAX_STREAMS, S);
        return NULL;
    }
    const int per = bits == 3 ? 4 : 8 / bits;
    const size_t tab_n = tp ? (size_t)(bits == 3 ? 4096 : 256) * per : 0, one_n = (size_t)1 << bits;
    stream_t st[MAX_STREAMS];
    float *mem = (float *)malloc((size_t)S * (tab_n + one_n) * sizeof(float));
    if (mem == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t s = 0; s < S; s++) {
        unsigned long long pp, sp;
        long long nbytes;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, s), "KLK;_native.decode_sum: a stream is "
                              "(payload, nbytes, scale)", &pp, &nbytes, &sp)) {
            free(mem);
            Py_DECREF(seq);
            return NULL;
        }
        if ((n > 0 && (pp == 0 || sp == 0)) || nbytes < (n * bits + 7) / 8) {
            PyErr_Format(PyExc_ValueError, "_native.decode_sum: stream %zd: %lld codes of %d bits need %lld "
                         "payload bytes, got %lld (addresses must be nonzero)", s, n, bits, (n * bits + 7) / 8, nbytes);
            free(mem);
            Py_DECREF(seq);
            return NULL;
        }
        float *m0 = mem + (size_t)s * (tab_n + one_n);
        st[s] = (stream_t){(const uint8_t *)(uintptr_t)pp, nbytes, (const float *)(uintptr_t)sp,
                           tab_n ? m0 + one_n : NULL, m0};
    }
    Py_DECREF(seq);
    float *out = (float *)(uintptr_t)op;
    const float *utab = (const float *)(uintptr_t)tp, *uone = (const float *)(uintptr_t)onep;
    const uint8_t *bad = (const uint8_t *)(uintptr_t)bp;
    const float d = (float)divisor;
    const int divide = divisor > 1;
    long first_bad = -1;
    const int use_avx = bits <= 4 && simd_on();
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = 0; s < S; s++) {
        const float sc = *st[s].scale;
        for (size_t i = 0; i < one_n; i++) st[s].one[i] = uone[i] * sc;
        if (use_avx) st[s].tab = NULL;  /* the vector loop reads `one`; the last codes go one by one */
        else for (size_t i = 0; i < tab_n; i++) st[s].tab[i] = utab[i] * sc;
    }
    float local[BLOCK];
    int64_t start = a;
#ifdef HAVE_AVX2_PATH
    if (use_avx) {
        int badm[MAX_STREAMS] = {0};
        const int64_t g1 = e / 8;  /* whole groups of 8 codes; the rest below */
        if (g1 > a / 8) {
            const int nt = !acc && ((uintptr_t)out & 31) == 0 && n * (long long)sizeof(float) >= nt_min_bytes;
            sum_groups_avx2(st, S, a / 8, g1, bits, out, acc, divide, d, bp != 0, badm, nt);
            start = 8 * g1;
        }
        for (Py_ssize_t s = 0; s < S; s++) {
            if (badm[s] && first_bad < 0) first_bad = (long)s;
        }
    }
#endif
    for (int64_t b0 = start; b0 < e; b0 += BLOCK) {
        const int64_t m = e - b0 < BLOCK ? e - b0 : BLOCK;
        float *dst = out + b0;
        /* one stream and nothing to divide: straight into out */
        float *buf = (S == 1 && !divide) ? dst : local;
        if (acc && buf == local) memcpy(local, dst, (size_t)m * sizeof(float));
        for (Py_ssize_t s = 0; s < S; s++) {
            if (stream_range(&st[s], b0, m, bits, bad, buf, acc || s > 0) && (first_bad < 0 || s < first_bad))
                first_bad = (long)s;
        }
        if (divide) {
            for (int64_t j = 0; j < m; j++) buf[j] = buf[j] / d;
        }
        if (buf == local) memcpy(dst, local, (size_t)m * sizeof(float));
    }
    Py_END_ALLOW_THREADS
    free(mem);
    return PyLong_FromLong(first_bad + 1);
}

INLINE void pack_bytes(const uint8_t *c, int64_t nb, uint8_t *o, const int bits) {
    const int per = 8 / bits;
    const unsigned mask = (1u << bits) - 1;
    for (int64_t i = 0; i < nb; i++) {
        unsigned v = 0;
        for (int k = 0; k < per; k++) v |= (unsigned)(c[i * per + k] & mask) << (bits * k);
        o[i] = (uint8_t)v;
    }
}

/* pack(codes, n, bits, out, out_nbytes): n uint8 codes (masked to b bits) -> ceil(n*b/8) bytes, code j
 * at bits [b*j, b*j + b) of the little-endian stream, padding bits zero (lowbit.codec.pack). */
static PyObject *native_pack(PyObject *self, PyObject *args) {
    unsigned long long cp, op;
    long long n, out_nbytes;
    int bits;
    if (!PyArg_ParseTuple(args, "KLiKL", &cp, &n, &bits, &op, &out_nbytes))
        return NULL;
    if (bits < 1 || bits > 8) {
        PyErr_Format(PyExc_ValueError, "_native.pack: bits must be in 1..8, got %d", bits);
        return NULL;
    }
    if (n < 0 || out_nbytes != (n * bits + 7) / 8) {
        PyErr_Format(PyExc_ValueError, "_native.pack: %lld codes of %d bits need %lld bytes, got %lld", n, bits,
                     (n * bits + 7) / 8, out_nbytes);
        return NULL;
    }
    const uint8_t *c = (const uint8_t *)(uintptr_t)cp;
    uint8_t *o = (uint8_t *)(uintptr_t)op;
    Py_BEGIN_ALLOW_THREADS
    const unsigned mask = (1u << bits) - 1;
    int64_t j = 0;  /* codes packed by the unit loops; they end on a byte boundary */
    if (bits == 3) {
        for (; j + 8 <= n; j += 8) {
            uint32_t w = 0;
            for (int k = 0; k < 8; k++) w |= (uint32_t)(c[j + k] & 7u) << (3 * k);
            o[0] = (uint8_t)w;
            o[1] = (uint8_t)(w >> 8);
            o[2] = (uint8_t)(w >> 16);
            o += 3;
        }
    } else if (bits == 1 || bits == 2 || bits == 4 || bits == 8) {
        const int per = 8 / bits;
        const int64_t nb = n / per;
        switch (bits) {
        case 1: pack_bytes(c, nb, o, 1); break;
        case 2: pack_bytes(c, nb, o, 2); break;
        case 4: pack_bytes(c, nb, o, 4); break;
        default: memcpy(o, c, (size_t)nb); break;
        }
        j = nb * per;
        o += nb;
    }
    /* other widths, and the last codes: through a bit accumulator */
    uint64_t acc = 0;
    int have = 0;
    for (; j < n; j++) {
        acc |= (uint64_t)(c[j] & mask) << have;
        have += bits;
        while (have >= 8) {
            *o++ = (uint8_t)acc;
            acc >>= 8;
            have -= 8;
        }
    }
    if (have > 0) *o = (uint8_t)acc;
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", native_decode, METH_VARARGS,
     "decode(payload, nbytes, out, n, bits, table, one, bad, accumulate) -> 1 if a code outside the grid "
     "was seen, else 0 (addresses as ints; bad 0 = no check). See lowbit/codec/_native.c."},
    {"decode_sum", native_decode_sum, METH_VARARGS,
     "decode_sum(out, a, e, n, bits, utable, uone, bad, streams, divisor, accumulate) -> 0, or 1 + the index "
     "of the first stream with a code outside the grid: S frames of one tensor decoded, summed and divided "
     "in one pass over out. See lowbit/codec/_native.c."},
    {"nt_stores", native_nt_stores, METH_VARARGS,
     "nt_stores(n) -> the output size in bytes from which decode_sum writes with streaming stores (when it does "
     "not accumulate and out is 32-byte aligned); n >= 0 sets it, -1 only reads"},
    {"simd", simd_switch, METH_VARARGS,
     "simd(on) -> whether decode_sum uses its AVX2 loop (where the CPU has AVX2): on 1 / 0 asks for it or "
     "not, -1 only reads."},
    {"pack", native_pack, METH_VARARGS,
     "pack(codes, n, bits, out, out_nbytes): uint8 codes -> packed b-bit stream (addresses as ints)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "The codec's inner loops: table decode and bit packing.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
