"""Build hook: the packages (lowbit with its data folders, and the benchmarks folder installed as lowbit.benchmarks so that
`lowbit bench` runs from an installed wheel) and the two optional compiled parts: lowbit.codec._native,
the codec's inner loops (lowbit/codec/_native.c), and lowbit.quant._laq, LAQ's linear-grid round and
stochastic gradient codes (lowbit/quant/_laq.c), both with the AVX2 switch of lowbit/_simd.h. Without
a C compiler the install still succeeds and the codecs and LAQ use their torch ops (same codes,
slower). Everything else is in pyproject.toml."""
from setuptools import Extension, find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["lowbit", "lowbit.*"], exclude=["*__pycache__*"]) + ["lowbit.benchmarks"],
      package_dir={"lowbit.benchmarks": "benchmarks"},
      ext_modules=[Extension("lowbit.codec._native", ["lowbit/codec/_native.c"], include_dirs=["lowbit"],
                             depends=["lowbit/_simd.h"],
                             extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"],
                             optional=True),
                   Extension("lowbit.quant._laq", ["lowbit/quant/_laq.c"], include_dirs=["lowbit"],
                             depends=["lowbit/_simd.h"],
                             extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off", "-fopenmp-simd"],
                             optional=True)])
