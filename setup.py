"""Build hook for the one compiled part: lowbit.codec._native, the codec's inner loops (lowbit/codec/_native.c).
Everything else is in pyproject.toml. The extension is optional: without a C compiler the install
still succeeds and the codecs use their torch ops (same bits, slower)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("lowbit.codec._native", ["lowbit/codec/_native.c"],
                             extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"],
                             optional=True)])
