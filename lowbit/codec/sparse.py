"""Row-sparse gradient frames: an embedding's gradient without the rows that are exactly zero.

A batch touches a few hundred of a word embedding's tens of thousands of rows; the other rows'
gradients are exactly zero and their stochastic codes are (all but a rare rounding) the grid's zero
code. A row-sparse
frame (kind ``gsparse``) carries the dense frame's header (shape, bits, the one scale) and, of its
packed codes, only the rows whose codes are not all the zero code. Its payload, little-endian::

    offset  size              field
    0       4                 n: rows sent
    4       4                 m: bytes of the compressed row ids
    8       m                 the row ids as u32 gaps (first id, then differences), deflated (zlib-ng)
    8 + m   n · row_bytes     the rows' packed codes, as they lie in the dense payload

Rows are whole bytes in the packed payload when ``cols · bits`` is a multiple of 8 (hidden sizes
are multiples of 8), so a sparse frame is cut from the dense one and :func:`densify` rebuilds it
byte for byte: the receiver's sum is the dense path's, exactly. :class:`RowSparseCodec` wraps a
gradient codec and sends the sparse frame whenever it is smaller.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

import torch

from lowbit.codec.frame import Frame
from lowbit.codec.ids import decode_ids, encode_ids
from lowbit.codec.pack import pack_bits
from lowbit.codec.wrapper import LosslessWrapper
from lowbit.errors import FrameError
from lowbit.quant.qtensor import grid_k

_HEAD = struct.Struct("<II")


def _row_bytes(shape: tuple[int, ...], bits: int) -> int | None:
    """Packed bytes of one row, or None when rows do not end on a byte boundary."""
    if len(shape) != 2 or (shape[1] * bits) % 8:
        return None
    return shape[1] * bits // 8


@lru_cache(maxsize=32)
def _zero_row(cols: int, bits: int) -> torch.Tensor:
    """One row of the symmetric grid's zero code, packed."""
    return pack_bits(torch.full((cols,), grid_k(bits), dtype=torch.uint8), bits)


def sparsify(f: Frame, rows: torch.Tensor) -> Frame | None:
    """The row-sparse frame of the dense gradient frame ``f`` keeping ``rows`` (increasing row
    indices), or None when ``f``'s rows are not whole bytes."""
    rb = _row_bytes(f.shape, f.bits)
    if rb is None or f.encoding != "sym" or f.kind != "grad":
        return None
    rows = rows.to(torch.int64)
    ids = encode_ids(rows)
    body = f.payload.reshape(-1, rb)[rows].reshape(-1).cpu()
    payload = torch.frombuffer(bytearray(_HEAD.pack(rows.numel(), len(ids)) + ids + body.numpy().tobytes()),
                               dtype=torch.uint8)
    return Frame(kind="gsparse", encoding="sym", dtype=f.dtype, bits=f.bits, shape=f.shape, scales=f.scales,
                 payload=payload, key=f.key, step=f.step)


def densify(f: Frame) -> Frame:
    """The dense gradient frame a row-sparse frame was cut from (the missing rows hold the zero code)."""
    where = f"row-sparse frame for key {f.key} at step {f.step}"
    rb = _row_bytes(f.shape, f.bits)
    if f.kind != "gsparse" or rb is None or f.encoding != "sym":
        raise FrameError(f"{where}: a {f.kind} frame of {f.encoding} {f.bits}-bit codes of shape {f.shape} "
                         "is not a row-sparse frame with whole-byte rows")
    p = f.payload.reshape(-1).cpu()
    raw = memoryview(p.numpy()) if p.is_contiguous() else memoryview(p.contiguous().numpy())
    if p.numel() < _HEAD.size:
        raise FrameError(f"{where}: payload of {p.numel()} bytes, its header needs {_HEAD.size}")
    n, m = _HEAD.unpack_from(raw, 0)
    rows = f.shape[0]
    if n > rows or _HEAD.size + m + n * rb != p.numel():
        raise FrameError(f"{where}: payload of {p.numel()} bytes does not hold {n} rows of {rb} bytes "
                         f"(the tensor has {rows}) after {m} bytes of ids")
    ids = decode_ids(raw[_HEAD.size:_HEAD.size + m], n, rows, f"{where}: row ids")
    dense = _zero_row(f.shape[1], f.bits).repeat(rows).reshape(rows, rb)
    dense[ids] = p[_HEAD.size + m:].reshape(n, rb)
    return Frame(kind="grad", encoding="sym", dtype=f.dtype, bits=f.bits, shape=f.shape, scales=f.scales,
                 payload=dense.reshape(-1), key=f.key, step=f.step, nbytes=f.nbytes)


@dataclass(frozen=True)
class RowSparseCodec(LosslessWrapper):
    """``inner`` (a symmetric-grid gradient codec) whose frames leave out the rows of a 2-D
    gradient that are exactly zero, whenever that is smaller. Exact: the receiver rebuilds the
    dense frame (:func:`densify`)."""

    def encode(self, x: torch.Tensor, **kw) -> Frame | None:
        f = self.inner.encode(x, **kw)
        rb = None if f is None or x.dim() != 2 or f.encoding != "sym" else _row_bytes(f.shape, f.bits)
        if rb is None:
            return f
        # rows whose packed codes are not all the zero code (read off the codes, not the gradient:
        # exact whatever the rounding did, and a pass over bits instead of floats)
        rows = f.payload.reshape(-1, rb).cpu().ne(_zero_row(f.shape[1], f.bits)).any(dim=1).nonzero().reshape(-1)
        if rows.numel() * 10 > x.shape[0] * 9:  # dense enough: ids would cost more than they save
            return f
        return sparsify(f, rows)

    def decode(self, f: Frame, device=None) -> torch.Tensor:
        return self.inner.decode(densify(f) if f.kind == "gsparse" else f, device)
