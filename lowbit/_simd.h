/* The AVX2 on/off switch of lowbit's C extensions (lowbit/codec/_native.c, lowbit/quant/_laq.c).
 *
 * HAVE_AVX2_PATH: the compiler can build AVX2 loops (x86-64, GCC or Clang); they run only where the CPU
 * has AVX2 and simd(0) has not turned them off, so tests run the scalar loops on such a CPU too. Each
 * extension includes this after <Python.h> and keeps its own switch. */
#ifndef LOWBIT_SIMD_H
#define LOWBIT_SIMD_H

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_AVX2_PATH 1
#endif

static int simd_wanted = 1;

static int simd_on(void) {
#ifdef HAVE_AVX2_PATH
    return simd_wanted && __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

/* The loop to run now: NAME##_avx2 where simd_on(), else NAME##_plain. */
#ifdef HAVE_AVX2_PATH
#define SIMD_PICK(name) (simd_on() ? name##_avx2 : name##_plain)
#else
#define SIMD_PICK(name) (name##_plain)
#endif

/* simd(on) -> whether the AVX2 loops are used now: on = 1 / 0 asks for them or not, -1 only reads. */
static PyObject *simd_switch(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "i", &on)) return NULL;
    if (on >= 0) simd_wanted = on != 0;
    return PyBool_FromLong(simd_on());
}

#endif
