"""Increasing ids and sparse bodies on the wire, for the frame kinds that send part of a tensor
(:mod:`lowbit.codec.delta`, :mod:`lowbit.codec.sparse`): ids as u32 gaps (the first id, then the
differences), deflated with zlib-ng at level 1 (SIMD deflate, already a dependency for CRC-32);
every inflate is bounded by the size the header announces, so a forged stream cannot allocate more."""
from __future__ import annotations

import torch
from zlib_ng import zlib_ng

from lowbit.errors import FrameError


def deflate(data) -> bytes:
    return zlib_ng.compress(memoryview(data).cast("B") if not isinstance(data, bytes) else data, 1)


def inflate_exact(data, size: int, what: str) -> bytes:
    """``data`` inflated to exactly ``size`` bytes (never more is allocated), else FrameError."""
    try:
        d = zlib_ng.decompressobj()
        out = d.decompress(data, size + 1)
    except zlib_ng.error as e:
        raise FrameError(f"{what} do not inflate: {e}") from None
    if len(out) != size or not d.eof or d.unused_data:
        raise FrameError(f"{what} inflate to {len(out)} bytes, expected {size}")
    return out


def encode_ids(ids: torch.Tensor) -> bytes:
    """Increasing non-negative ids (< 2^31) as deflated u32 gaps."""
    gaps = ids.to(torch.int64).diff(prepend=torch.zeros(1, dtype=torch.int64)).to(torch.int32)
    return deflate(gaps.numpy())


def decode_ids(data, n: int, limit: int, what: str) -> torch.Tensor:
    """The ``n`` ids :func:`encode_ids` made, checked to increase within ``0..limit - 1``."""
    gaps = inflate_exact(data, 4 * n, what)
    if not n:
        return torch.zeros(0, dtype=torch.int64)
    ids = torch.frombuffer(bytearray(gaps), dtype=torch.int32).to(torch.int64).cumsum(0)
    if int(ids[0]) < 0 or bool((ids[1:] <= ids[:-1]).any()) or int(ids[-1]) >= limit:
        raise FrameError(f"{what} are not increasing within 0..{limit - 1}")
    return ids
