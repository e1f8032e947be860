/* lowbit.quant._laq: the inner loop of LAQ's linear-grid alternation (lowbit/quant/weights.py,
 * _laq_alternate_fused), one pass over w (and d) per round instead of the torch ops' five.
 *
 *   round(w, d, n, s, k) -> (num, den):  q_i = rint(clamp(w_i * s, -k, k)),
 *                                        num = sum d_i w_i q_i,  den = sum d_i q_i^2   (d 0: d_i = 1)
 *   codes(w, n, s, k, out):              out_i = q_i + k  (uint8)
 *
 *   stochastic(g, n, i0, s0, s1, c, k, out): out_i = codes of LAQ's unbiased stochastic rounding of
 *                                        gradient values (lowbit/quant/grads.py, stochastic_code_chunks):
 *                                        floor(clamp(g_i * c + u_i, -k 2^24, k 2^24) / 2^24 + k), where c
 *                                        = k / s * 2^24 (fp32) and u_i = counter_u24(i0 + i, s0, s1)
 *
 * w, d: fp32, n contiguous values; addresses as ints. s is the fp32 scalar k / alpha.
 * Floating point: q_i is the torch path's q bit for bit (one fp32 multiply by the fp32 scalar, the
 * clamp, round half to even; no FMA, no reassociation: built without -ffast-math and with
 * -ffp-contract=off). The sums are in double, in lanes (#pragma omp simd, -fopenmp-simd): the torch
 * path sums fp32 dot products per chunk, so the two agree to float rounding, not bit for bit, and
 * this one is the more accurate. The AVX2 build of each loop is chosen at run time where the CPU has it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>

#include "_simd.h"

#define ROUND_BODY(w, d, n, s, k, num, den)                                      \
    do {                                                                         \
        const float lo_ = -(float)(k), hi_ = (float)(k);                         \
        if (d) {                                                                 \
            _Pragma("omp simd reduction(+:num, den)")                            \
            for (int64_t i = 0; i < (n); i++) {                                  \
                float x = (w)[i] * (s);                                          \
                x = x < lo_ ? lo_ : (x > hi_ ? hi_ : x);                         \
                float q = rintf(x);                                              \
                double dq = (double)(d)[i] * (double)q;                          \
                num += dq * (double)(w)[i];                                      \
                den += dq * (double)q;                                           \
            }                                                                    \
        } else {                                                                 \
            _Pragma("omp simd reduction(+:num, den)")                            \
            for (int64_t i = 0; i < (n); i++) {                                  \
                float x = (w)[i] * (s);                                          \
                x = x < lo_ ? lo_ : (x > hi_ ? hi_ : x);                         \
                double q = (double)rintf(x);                                     \
                num += q * (double)(w)[i];                                       \
                den += q * q;                                                    \
            }                                                                    \
        }                                                                        \
    } while (0)

#define CODES_BODY(w, n, s, k, out)                                              \
    do {                                                                         \
        const float lo_ = -(float)(k), hi_ = (float)(k);                         \
        _Pragma("omp simd")                                                      \
        for (int64_t i = 0; i < (n); i++) {                                      \
            float x = (w)[i] * (s);                                              \
            x = x < lo_ ? lo_ : (x > hi_ ? hi_ : x);                             \
            (out)[i] = (uint8_t)(int32_t)(rintf(x) + hi_);                       \
        }                                                                        \
    } while (0)

/* 24 random bits for element `idx` of a tensor under the 64-bit seed (s0, s1): a counter-based
 * generator, so a chunk's draws do not depend on how the tensor is cut and need no state. The index's
 * two 32-bit halves go through a Weyl step (lo * golden ratio + s0, hi * an odd constant), murmur3's
 * 32-bit finalizer (a bijection that spreads every input bit over the word), then a second
 * xor-multiply-shift round keyed by s1 (seeds that only shift the Weyl sequence give unrelated
 * streams); the top 24 bits are kept. lowbit/quant/grads.py (_counter_u24) computes the same bits
 * with int64 torch ops. */
/* x: the index's low half; hm: its high half times an odd constant (constant over 2^32 elements) */
#define U24(lo, hm, s0, s1, out_u)                                               \
    do {                                                                         \
        uint32_t x_ = (lo) * 0x9E3779B9u + (s0);                                 \
        x_ ^= (hm);                                                              \
        x_ ^= x_ >> 16;                                                          \
        x_ *= 0x85EBCA6Bu;                                                       \
        x_ ^= x_ >> 13;                                                          \
        x_ *= 0xC2B2AE35u;                                                       \
        x_ ^= x_ >> 16;                                                          \
        x_ ^= (s1);                                                              \
        x_ *= 0x27D4EB2Du;                                                       \
        x_ ^= x_ >> 15;                                                          \
        (out_u) = x_ >> 8;                                                       \
    } while (0)

/* fp32 exactly as the torch ops of grads.py: t = g*c (one rounding), t = t + u (one rounding), the
 * clamp, * 2^-24 (exact), + k (one rounding), truncation (t >= 0). The loop runs in segments over
 * which the index's high half is constant, so its body is 32-bit integer and fp32 lanes only. */
#define STOCHASTIC_BODY(g, n, i0, s0, s1, c, k, out)                             \
    do {                                                                         \
        const float one_ = 16777216.0f, inv_ = 1.0f / 16777216.0f;               \
        const float hi_ = (float)(k) * one_, lo_ = -hi_, kf_ = (float)(k);       \
        int64_t i = 0;                                                           \
        while (i < (n)) {                                                        \
            const uint64_t idx_ = (uint64_t)(i0) + (uint64_t)i;                  \
            const uint32_t lo0_ = (uint32_t)idx_;                                \
            const uint32_t hm_ = (uint32_t)(idx_ >> 32) * 0x632BE5ABu;           \
            const uint64_t room_ = 0x100000000ULL - (uint64_t)lo0_;              \
            const int64_t seg_ = (uint64_t)((n) - i) < room_ ? (n) - i : (int64_t)room_; \
            const float *gs_ = (g) + i;                                          \
            uint8_t *os_ = (out) + i;                                            \
            _Pragma("omp simd")                                                  \
            for (int64_t j = 0; j < seg_; j++) {                                 \
                uint32_t u_;                                                     \
                U24(lo0_ + (uint32_t)j, hm_, s0, s1, u_);                        \
                float t = gs_[j] * (c);                                          \
                t = t + (float)(int32_t)u_;                                      \
                t = t < lo_ ? lo_ : (t > hi_ ? hi_ : t);                         \
                t = t * inv_ + kf_;                                              \
                os_[j] = (uint8_t)(int32_t)t;                                    \
            }                                                                    \
            i += seg_;                                                           \
        }                                                                        \
    } while (0)

static void stochastic_plain(const float *g, int64_t n, uint64_t i0, uint32_t s0, uint32_t s1, float c, int k,
                             uint8_t *out) {
    STOCHASTIC_BODY(g, n, i0, s0, s1, c, k, out);
}

static void round_plain(const float *w, const float *d, int64_t n, float s, int k, double *pn, double *pd) {
    double num = 0.0, den = 0.0;
    ROUND_BODY(w, d, n, s, k, num, den);
    *pn = num;
    *pd = den;
}

static void codes_plain(const float *w, int64_t n, float s, int k, uint8_t *out) { CODES_BODY(w, n, s, k, out); }

#ifdef HAVE_AVX2_PATH
__attribute__((target("avx2")))
static void round_avx2(const float *w, const float *d, int64_t n, float s, int k, double *pn, double *pd) {
    double num = 0.0, den = 0.0;
    ROUND_BODY(w, d, n, s, k, num, den);
    *pn = num;
    *pd = den;
}

__attribute__((target("avx2")))
static void codes_avx2(const float *w, int64_t n, float s, int k, uint8_t *out) { CODES_BODY(w, n, s, k, out); }

__attribute__((target("avx2")))
static void stochastic_avx2(const float *g, int64_t n, uint64_t i0, uint32_t s0, uint32_t s1, float c, int k,
                            uint8_t *out) {
    STOCHASTIC_BODY(g, n, i0, s0, s1, c, k, out);
}
#endif

static int check_args(long long n, int k, const char *fn) {
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "_laq.%s: n must be >= 0, got %lld", fn, n);
        return 0;
    }
    if (k < 1 || k > 127) {
        PyErr_Format(PyExc_ValueError, "_laq.%s: k must be in 1..127 (bits 2..8), got %d", fn, k);
        return 0;
    }
    return 1;
}

typedef void round_fn(const float *, const float *, int64_t, float, int, double *, double *);
typedef void codes_fn(const float *, int64_t, float, int, uint8_t *);
typedef void stochastic_fn(const float *, int64_t, uint64_t, uint32_t, uint32_t, float, int, uint8_t *);

/* The arguments of a linear-grid loop: w, n, s, k and one more address (round: d, after w; codes: out,
 * last), parsed and checked. */
typedef struct {
    unsigned long long w, other;
    long long n;
    float s;
    int k;
} grid_args;

static int parse_grid(PyObject *args, const char *fn, int other_second, grid_args *a) {
    int ok = other_second ? PyArg_ParseTuple(args, "KKLfi", &a->w, &a->other, &a->n, &a->s, &a->k)
                          : PyArg_ParseTuple(args, "KLfiK", &a->w, &a->n, &a->s, &a->k, &a->other);
    return ok && check_args(a->n, a->k, fn);
}

static PyObject *laq_round(PyObject *self, PyObject *args) {
    grid_args a;
    if (!parse_grid(args, "round", 1, &a)) return NULL;
    double num = 0.0, den = 0.0;
    round_fn *fn = SIMD_PICK(round);
    Py_BEGIN_ALLOW_THREADS
    fn((const float *)(uintptr_t)a.w, (const float *)(uintptr_t)a.other, a.n, a.s, a.k, &num, &den);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("dd", num, den);
}

static PyObject *laq_codes(PyObject *self, PyObject *args) {
    grid_args a;
    if (!parse_grid(args, "codes", 0, &a)) return NULL;
    codes_fn *fn = SIMD_PICK(codes);
    Py_BEGIN_ALLOW_THREADS
    fn((const float *)(uintptr_t)a.w, a.n, a.s, a.k, (uint8_t *)(uintptr_t)a.other);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *laq_stochastic(PyObject *self, PyObject *args) {
    unsigned long long gp, i0, op;
    unsigned int s0, s1;
    long long n;
    float c;
    int k;
    if (!PyArg_ParseTuple(args, "KLKIIfiK", &gp, &n, &i0, &s0, &s1, &c, &k, &op) || !check_args(n, k, "stochastic"))
        return NULL;
    if (n > 0 && (gp == 0 || op == 0)) {
        PyErr_SetString(PyExc_ValueError, "_laq.stochastic: g and out must be addresses, got 0");
        return NULL;
    }
    if (!(c >= 0.0f) || isinf(c)) {
        PyErr_Format(PyExc_ValueError, "_laq.stochastic: the scale factor c must be finite and >= 0, got %g", (double)c);
        return NULL;
    }
    stochastic_fn *fn = SIMD_PICK(stochastic);
    Py_BEGIN_ALLOW_THREADS
    fn((const float *)(uintptr_t)gp, n, (uint64_t)i0, (uint32_t)s0, (uint32_t)s1, c, k, (uint8_t *)(uintptr_t)op);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"round", laq_round, METH_VARARGS,
     "round(w, d, n, s, k) -> (num, den): one LAQ round on the linear grid, q = rint(clamp(w*s, -k, k)), "
     "num = sum d w q, den = sum d q^2 (d 0: unweighted). Addresses as ints; see lowbit/quant/_laq.c."},
    {"codes", laq_codes, METH_VARARGS, "codes(w, n, s, k, out): out = rint(clamp(w*s, -k, k)) + k as uint8."},
    {"stochastic", laq_stochastic, METH_VARARGS,
     "stochastic(g, n, i0, s0, s1, c, k, out): out = LAQ's stochastic gradient codes of n fp32 values "
     "(elements i0.. of the tensor, seed s0, s1, c = k / s * 2^24); see lowbit/quant/_laq.c."},
    {"simd", simd_switch, METH_VARARGS, "simd(on) -> whether the AVX2 loops are used (on 1 / 0 / -1 = read)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_laq", "LAQ's linear-grid round and stochastic gradient codes, one pass each.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__laq(void) { return PyModule_Create(&module); }
