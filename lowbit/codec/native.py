"""The codec's optional compiled loops (``lowbit/codec/_native.c``, built by setup.py when lowbit is
installed with a C compiler): table decode and bit packing, one pass each.

Where it was built it is on by default, for CPU tensors: :func:`lowbit.codec.decode_frame` (fp32,
one scale per tensor) and :func:`lowbit.codec.pack.pack_into` use it; everything else, and every
call when it is off, runs the torch ops, which give the same bits. ``LOWBIT_NATIVE_CODEC=0`` turns
it off for a process, :func:`set_native_codec` at run time.
"""
from __future__ import annotations

import os

from lowbit.quant.weights import switch_extension

try:
    from lowbit.codec import _native as lib
except ImportError:  # not built (no C compiler at install time)
    lib = None

_on = lib is not None and os.environ.get("LOWBIT_NATIVE_CODEC", "1").strip() != "0"


def native_codec_available() -> bool:
    """Whether ``lowbit.codec._native`` was built."""
    return lib is not None


def native_codec_enabled() -> bool:
    """Whether the codec uses the compiled loops now."""
    return _on


def set_native_codec(on: bool) -> bool:
    """Use the compiled loops (``True``) or the torch ops (``False``); returns the previous setting."""
    return switch_extension(globals(), "_on", "lib", on, "the compiled codec lowbit.codec._native")
