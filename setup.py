"""Build hook for the one compiled part: lowbit.codec._lut, the table decode loop (lowbit/codec/_lut.c).
Everything else is in pyproject.toml. The extension is optional: without a C compiler the install
still succeeds and the codecs use their torch-op decode (same bits, slower)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("lowbit.codec._lut", ["lowbit/codec/_lut.c"],
                             extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"],
                             optional=True)])
