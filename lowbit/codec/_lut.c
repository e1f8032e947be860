/* lowbit.codec._lut: table decode of packed b-bit codes, one pass over the payload.
 *
 * The torch-op decode in codecs.py costs ~8 passes over cache-sized chunks per frame (build the
 * indices, check the grid, index_select, add); this loop reads each payload byte once and writes
 * each output value once. It is optional: codecs.py falls back to the torch ops when this module
 * was not built, and tests/codec check that both give the same bits.
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
static PyObject *lut_decode(PyObject *self, PyObject *args) {
    unsigned long long pp, op, tp, onep, bp;
    long long nbytes, n;
    int bits, acc;
    if (!PyArg_ParseTuple(args, "KLKLiKKKp", &pp, &nbytes, &op, &n, &bits, &tp, &onep, &bp, &acc))
        return NULL;
    if (!(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8)) {
        PyErr_Format(PyExc_ValueError, "_lut.decode: bits must be 1, 2, 3, 4 or 8, got %d", bits);
        return NULL;
    }
    if (n < 0 || nbytes < 0 || (n * bits + 7) / 8 > nbytes) {
        PyErr_Format(PyExc_ValueError, "_lut.decode: %lld codes of %d bits need %lld payload bytes, got %lld",
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

static PyMethodDef methods[] = {
    {"decode", lut_decode, METH_VARARGS,
     "decode(payload, nbytes, out, n, bits, table, one, bad, accumulate) -> 1 if a code outside the grid "
     "was seen, else 0 (addresses as ints; bad 0 = no check). See lowbit/codec/_lut.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lut", "Table decode of packed low-bit codes.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__lut(void) { return PyModule_Create(&module); }
