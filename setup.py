"""Build hook for the two compiled parts: lowbit.codec._native, the codec's inner loops
(lowbit/codec/_native.c), and lowbit.quant._laq, LAQ's linear-grid round and stochastic gradient codes (lowbit/quant/_laq.c).
Everything else is in pyproject.toml. Both are optional: without a C compiler the install still
succeeds and the codecs and LAQ use their torch ops (same codes, slower)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("lowbit.codec._native", ["lowbit/codec/_native.c"],
                             extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"],
                             optional=True),
                   Extension("lowbit.quant._laq", ["lowbit/quant/_laq.c"],
                             extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off", "-fopenmp-simd"],
                             optional=True)])
