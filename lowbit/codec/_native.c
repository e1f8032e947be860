/* lowbit.codec._native: the codec's two inner loops in C, each one pass over its data.
 *
 *   decode: packed b-bit codes -> fp32 values through a value table (or added to what `out` holds);
 *   pack:   uint8 codes -> the packed b-bit stream.
 *
 * The torch-op versions (codecs.py, pack.py) cost several passes over cache-sized chunks each
 * (build indices, check the grid, index_select, add; shift/or/mask steps). This module is optional:
 * lowbit.codec.native says whether it was built, and the torch ops run when it was not; tests/codec
 * run every codec test on both and check they give the same bits.
 *
 * Layout (lowbit.codec.pack): code j of a tensor sits at bits [b*j, b*j + b) of the little-endian
 * byte stream. Tables (built in Python, already multiplied by the frame's scale in fp32):
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
#include <string.h>

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
    const unsigned mask = (1u << bits) - 1;
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
    for (int64_t j = done; j < n; j++) {
        const int64_t pos = j * bits, byte = pos >> 3;
        unsigned v = p[byte];
        if (byte + 1 < nbytes) v |= (unsigned)p[byte + 1] << 8;
        const unsigned c = (v >> (pos & 7)) & mask;
        if (acc) out[j] += one[c]; else out[j] = one[c];
        if (chk && c == mask) flag = 1;
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(flag ? 1 : 0);
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
    {"pack", native_pack, METH_VARARGS,
     "pack(codes, n, bits, out, out_nbytes): uint8 codes -> packed b-bit stream (addresses as ints)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "The codec's inner loops: table decode and bit packing.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
