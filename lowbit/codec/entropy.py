"""Entropy-coded gradient frames: the clipped stochastic codes of a gradient through rANS.

The codes of a clipped, near-Gaussian gradient are far from uniform: at 2 bits most of them are the
zero code, at 3 bits the middle three codes hold nine in ten. An entropy-coded frame (kind
``gcoded``) carries the dense frame's header (shape, bits, the one scale) and, instead of the packed
codes, the codes' histogram and the codes rANS-coded under it. Its payload, little-endian::

    offset    size     field
    0         4        s: values of the grid (2k + 1 for the symmetric m-bit grid, k = 2^(m-1) - 1)
    4         4·s      counts: how many codes hold each value (they sum to the element count)
    4 + 4s    the rest the codes, rANS-coded with the model counts / n (32-bit words)

The coder is constriction's ``AnsCoder`` (a maintained Rust library with Python bindings): with the
frame's own histogram as its model it reaches the codes' empirical entropy (3-bit codes of a
clipped gradient in about 1.9 bits, 2-bit codes in under one). Entropy coding is exact: the
receiver rebuilds the dense frame byte for byte (:func:`expand`). :class:`EntropyCodec` wraps a
gradient codec and sends the coded frame whenever it is smaller; decoding is the receiver's cost
(about 50-100 M codes/s per core), so it pays on thin links, not on fast ones.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import numpy as np
import torch

from lowbit.codec.frame import Frame
from lowbit.codec.pack import pack_bits, unpack_bits
from lowbit.codec.wrapper import LosslessWrapper
from lowbit.errors import ConfigError, FrameError
from lowbit.quant.qtensor import grid_k

_U32 = struct.Struct("<I")


def _coder():
    try:
        import constriction
    except ImportError:  # pragma: no cover - a dependency; named so the error says what to install
        raise ConfigError("entropy-coded gradients need the constriction package (pip install constriction)") from None
    return constriction.stream


def _model(counts: np.ndarray):
    return _coder().model.Categorical(counts / counts.sum(), perfect=False)


def entropy_code(f: Frame) -> Frame | None:
    """The coded frame of the dense symmetric gradient frame ``f``, or None when it would not be
    smaller than ``f``."""
    if f.kind != "grad" or f.encoding != "sym":
        return None
    n, s = int(np.prod(f.shape)), 2 * grid_k(f.bits) + 1
    if not n:
        return None
    codes = unpack_bits(f.payload.cpu(), f.bits, n).numpy()
    counts = np.bincount(codes, minlength=s)
    if counts.size != s:
        raise FrameError(f"gradient frame for key {f.key} holds codes outside its {f.bits}-bit grid")
    enc = _coder().stack.AnsCoder()
    enc.encode_reverse(codes.astype(np.int32), _model(counts))
    words = enc.get_compressed()
    size = 4 + 4 * s + words.nbytes
    if size >= f.payload.numel():
        return None
    payload = torch.frombuffer(bytearray(_U32.pack(s) + counts.astype("<u4").tobytes() + words.astype("<u4").tobytes()),
                               dtype=torch.uint8)
    return replace(f, kind="gcoded", payload=payload, nbytes=0)


def expand(f: Frame) -> Frame:
    """The dense gradient frame a coded frame was made from. Every field is checked: the histogram
    against the element count, the stream against the histogram, nothing left over."""
    where = f"entropy-coded frame for key {f.key} at step {f.step}"
    if f.kind != "gcoded" or f.encoding != "sym":
        raise FrameError(f"{where}: a {f.kind} frame of {f.encoding} codes is not an entropy-coded gradient")
    n, s = int(np.prod(f.shape)), 2 * grid_k(f.bits) + 1
    raw = f.payload.reshape(-1).cpu().contiguous().numpy()
    if raw.size < 4 + 4 * s or _U32.unpack_from(raw, 0)[0] != s or (raw.size - 4 - 4 * s) % 4:
        raise FrameError(f"{where}: payload of {raw.size} bytes does not hold the {s}-value histogram of "
                         f"{f.bits}-bit codes and whole 32-bit words")
    counts = np.frombuffer(raw[4:4 + 4 * s].tobytes(), dtype="<u4").astype(np.int64)
    if int(counts.sum()) != n:
        raise FrameError(f"{where}: histogram counts {int(counts.sum())} codes, the shape {f.shape} holds {n}")
    words = np.frombuffer(raw[4 + 4 * s:].tobytes(), dtype="<u4").astype(np.uint32)
    try:
        dec = _coder().stack.AnsCoder(words)
        codes = dec.decode(_model(counts), n)
        left = not dec.is_empty()
    except Exception as e:  # the coder's own error types: a stream that does not decode
        raise FrameError(f"{where}: the code stream does not decode: {e}") from None
    if left or not np.array_equal(np.bincount(codes, minlength=s), counts):
        raise FrameError(f"{where}: the code stream does not match its histogram")
    payload = pack_bits(torch.from_numpy(codes.astype(np.uint8)), f.bits)
    return replace(f, kind="grad", payload=payload)


@dataclass(frozen=True)
class EntropyCodec(LosslessWrapper):
    """``inner`` (a symmetric-grid gradient codec) whose frames go entropy-coded whenever that is
    smaller. Exact: the receiver rebuilds the dense frame (:func:`expand`)."""

    def encode(self, x: torch.Tensor, **kw) -> Frame | None:
        f = self.inner.encode(x, **kw)
        return (entropy_code(f) or f) if f is not None else None

    def decode(self, f: Frame, device=None) -> torch.Tensor:
        return self.inner.decode(expand(f) if f.kind == "gcoded" else f, device)
