"""Versioned wire frame: one tensor (or one quantized tensor) as self-delimiting bytes.

Layout, little-endian::

    offset size  field
    0      4     magic  b"LBT\\x01"
    4      1     version (=1)
    5      1     kind      (0 grad, 1 weight, 2 raw/other, 3 weight delta: lowbit.codec.delta,
                             4 row-sparse grad: lowbit.codec.sparse, 5 entropy-coded grad:
                             lowbit.codec.entropy)
    6      1     encoding  (0 raw, 1 sym grid, 2 log grid, 3 bin grid)
    7      1     dtype     of the raw payload / of the decoded tensor (0 fp32, 1 fp16, 2 bf16)
    8      1     bits      (32/16 for raw; 1..8 for grids)
    9      1     ndim      (0..8)
    10     2     reserved  (0)
    12     4     key       (parameter id, routing check)
    16     8     step      (training step, staleness check)
    24     4     n_scales  (0 raw, 1 per tensor, shape[0] per row)
    28     8     payload_len
    36     4·ndim shape
    ..     4·n_scales  float32 scales
    ..     payload_len payload bytes (raw tensor bytes or packed codes)
    ..     4     CRC32 of everything before it

The payload size is exactly ceil(numel·bits/8) for grids and numel·itemsize for raw payloads, so a
frame's size is known from its header; a weight delta's and a row-sparse gradient's payloads have
their own layouts, bounded by :func:`free_payload_bound`. Decoding validates every field and bounds every size
*before* allocating, so a forged header cannot make the decoder allocate absurd memory.
"""
from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch

from lowbit.errors import FrameError

# torch warns that a read-only buffer makes a read-only tensor; payload views are only ever read.
# (A warnings.catch_warnings() per frame cost more than parsing it, and is not thread-safe.)
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=r"lowbit\.codec\.frame")

try:  # the same CRC-32 (zlib's polynomial) with SIMD folding, several times faster than zlib's
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; plain zlib gives identical values
    from zlib import crc32

MAGIC = b"LBT\x01"
VERSION = 1
HEADER = struct.Struct("<4sBBBBBBHIQIQ")
HEADER_SIZE = HEADER.size  # 36
CRC_SIZE = 4
MAX_NDIM = 8
MAX_NUMEL = 1 << 34  # 16 G elements: beyond any tensor we move, well below 2^64

KINDS = {"grad": 0, "weight": 1, "raw": 2, "wdelta": 3, "gsparse": 4, "gcoded": 5}
ENCODINGS = {"raw": 0, "sym": 1, "log": 2, "bin": 3}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_KIND_NAMES = {v: k for k, v in KINDS.items()}
# where weights are expected a delta of them may come, where gradients are a row-sparse one
_ACCEPTS = {"weight": ("weight", "wdelta"), "grad": ("grad", "gsparse", "gcoded")}
_FREE = {"wdelta": 24, "gsparse": 8, "gcoded": 16}  # kinds whose payload has its own layout: the smallest payload
_ENC_NAMES = {v: k for k, v in ENCODINGS.items()}
_DTYPE_OF = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def payload_nbytes(encoding: str, bits: int, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = _numel(shape)
    if encoding == "raw":
        return n * _ITEMSIZE[dtype]
    return (n * bits + 7) // 8


def free_payload_bound(kind: str, shape: tuple[int, ...], bits: int) -> int:
    """The largest payload of a ``wdelta`` frame (every group of 8 codes changed) or a ``gsparse``
    frame (every row sent) for ``shape``: their ids stored raw, plus deflate's worst-case overhead;
    of a ``gcoded`` frame: its histogram and the dense payload (it is only sent when smaller)."""
    if kind == "gcoded":
        return 4 + 4 * ((1 << bits) - 1) + payload_nbytes("sym", bits, shape, torch.float32)
    units = (_numel(shape) + 7) // 8 if kind == "wdelta" else (shape[0] if shape else 1)
    unit_bytes = bits if kind == "wdelta" else (_numel(shape[1:]) * bits + 7) // 8
    return _FREE[kind] + units * (4 + unit_bytes) + units // 250 + 64


def frame_nbytes(encoding: str, bits: int, shape: tuple[int, ...], n_scales: int,
                 dtype: torch.dtype = torch.float32) -> int:
    """Exact size on the wire of a frame: header + shape + scales + payload + CRC."""
    return (HEADER_SIZE + 4 * len(shape) + 4 * n_scales
            + payload_nbytes(encoding, bits, shape, dtype) + CRC_SIZE)


@dataclass
class Frame:
    """One decoded (validated) or to-be-encoded frame. ``payload`` is a 1-D uint8 tensor."""

    kind: str
    encoding: str
    dtype: torch.dtype
    bits: int
    shape: tuple[int, ...]
    scales: torch.Tensor  # float32, 1-D (possibly empty)
    payload: torch.Tensor  # uint8, 1-D
    key: int = 0
    step: int = 0
    nbytes: int = field(default=0, compare=False)  # size on the wire, filled by to_bytes/from_bytes

    def to_bytes(self) -> bytes:
        """Serialize (one copy of the payload, CRC32 computed over the parts before the join)."""
        if self.kind not in KINDS:
            raise FrameError(f"unknown frame kind {self.kind!r}")
        if self.encoding not in ENCODINGS:
            raise FrameError(f"unknown encoding {self.encoding!r}")
        if self.dtype not in DTYPES:
            raise FrameError(f"unsupported dtype {self.dtype}")
        if len(self.shape) > MAX_NDIM:
            raise FrameError(f"frames carry at most {MAX_NDIM} dims, got {len(self.shape)}")
        scales = self.scales.detach().to("cpu", torch.float32).contiguous().reshape(-1)
        payload = self.payload.detach().to("cpu").contiguous().reshape(-1)
        expect = payload_nbytes(self.encoding, self.bits, self.shape, self.dtype)
        if self.kind in _FREE:
            if self.encoding == "raw" or not (_FREE[self.kind] <= payload.numel()
                                              <= free_payload_bound(self.kind, self.shape, self.bits)):
                raise FrameError(f"a {self.kind} frame of {self.encoding} {self.bits}-bit codes of shape {self.shape} "
                                 f"cannot have a payload of {payload.numel()} bytes")
        elif payload.numel() != expect:
            raise FrameError(f"payload has {payload.numel()} bytes, shape {self.shape} at "
                             f"{self.bits} bits needs {expect}")
        head = HEADER.pack(MAGIC, VERSION, KINDS[self.kind], ENCODINGS[self.encoding],
                           DTYPES[self.dtype], self.bits, len(self.shape), 0, self.key & 0xFFFFFFFF,
                           self.step, scales.numel(), payload.numel())
        # CRC over the parts as they are, then one join: the payload is copied exactly once.
        parts = [head, struct.pack(f"<{len(self.shape)}I", *self.shape), memoryview(scales.numpy()).cast("B"),
                 memoryview(payload.numpy())]
        crc = 0
        for part in parts:
            crc = crc32(part, crc)
        parts.append(struct.pack("<I", crc))
        out = b"".join(parts)
        self.nbytes = len(out)
        return out

    @classmethod
    def from_bytes(cls, buf, offset: int = 0, *, expect_kind: str | None = None,
                   expect_shape: tuple[int, ...] | None = None, expect_key: int | None = None,
                   max_numel: int = MAX_NUMEL) -> "Frame":
        """Parse and validate one frame starting at ``offset`` of ``buf`` (bytes, bytearray,
        memoryview or a uint8 tensor). Raises :class:`FrameError` naming what is wrong."""
        mv = _as_memoryview(buf)
        avail = len(mv) - offset
        if avail < HEADER_SIZE + CRC_SIZE:
            raise FrameError(f"truncated frame: {avail} bytes, a header alone needs {HEADER_SIZE + CRC_SIZE}")
        (magic, version, kind, enc, dt, bits, ndim, reserved, key, step, n_scales,
         plen) = HEADER.unpack_from(mv, offset)
        if magic != MAGIC:
            raise FrameError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: not a lowbit frame")
        if version != VERSION:
            raise FrameError(f"unsupported frame version {version}, this build reads version {VERSION}")
        if kind not in _KIND_NAMES:
            raise FrameError(f"unknown frame kind id {kind}")
        if enc not in _ENC_NAMES:
            raise FrameError(f"unknown encoding id {enc}")
        if dt not in _DTYPE_OF:
            raise FrameError(f"unknown dtype id {dt}")
        if reserved != 0:
            raise FrameError(f"reserved header bytes are {reserved}, expected 0")
        if ndim > MAX_NDIM:
            raise FrameError(f"frame claims {ndim} dims, at most {MAX_NDIM} allowed")
        encoding, dtype = _ENC_NAMES[enc], _DTYPE_OF[dt]
        if encoding == "raw":
            if bits != 8 * _ITEMSIZE[dtype]:
                raise FrameError(f"raw {dtype} payload must declare {8 * _ITEMSIZE[dtype]} bits, got {bits}")
        elif encoding == "bin":
            if bits != 1:
                raise FrameError(f"bin encoding needs 1 bit, got {bits}")
        elif not 2 <= bits <= 8:
            raise FrameError(f"{encoding} encoding needs 2..8 bits, got {bits}")
        pos = offset + HEADER_SIZE
        if avail < HEADER_SIZE + 4 * ndim + CRC_SIZE:
            raise FrameError(f"truncated frame: shape of {ndim} dims does not fit in {avail} bytes")
        shape = struct.unpack_from(f"<{ndim}I", mv, pos)
        pos += 4 * ndim
        numel = _numel(shape)
        if numel > max_numel:
            raise FrameError(f"frame shape {shape} has {numel} elements, above the bound {max_numel}")
        want_scales = {0} if encoding == "raw" else ({1, shape[0]} if ndim else {1})
        if n_scales not in want_scales:
            raise FrameError(f"frame has {n_scales} scales, expected one of {sorted(want_scales)} "
                             f"for {encoding} encoding of shape {shape}")
        expect_plen = payload_nbytes(encoding, bits, shape, dtype)
        if _KIND_NAMES[kind] in _FREE:
            name = _KIND_NAMES[kind]
            if encoding == "raw" or not _FREE[name] <= plen <= free_payload_bound(name, shape, bits):
                raise FrameError(f"{name} payload length {plen} outside {_FREE[name]}.."
                                 f"{free_payload_bound(name, shape, bits)} for {encoding} codes of shape {shape} "
                                 f"at {bits} bits")
        elif plen != expect_plen:
            raise FrameError(f"payload length {plen} does not match shape {shape} at {bits} bits "
                             f"(expected {expect_plen})")
        total = HEADER_SIZE + 4 * ndim + 4 * n_scales + plen + CRC_SIZE
        if avail < total:
            raise FrameError(f"truncated frame: header announces {total} bytes, only {avail} present")
        end = offset + total - CRC_SIZE
        (crc,) = struct.unpack_from("<I", mv, end)
        if crc32(mv[offset:end]) != crc:
            raise FrameError("CRC32 mismatch: frame corrupted in transit")
        if expect_kind is not None and _KIND_NAMES[kind] not in _ACCEPTS.get(expect_kind, (expect_kind,)):
            raise FrameError(f"expected a {expect_kind} frame, got {_KIND_NAMES[kind]}")
        if expect_shape is not None and tuple(expect_shape) != tuple(shape):
            raise FrameError(f"frame shape {tuple(shape)} does not match expected {tuple(expect_shape)}")
        if expect_key is not None and key != expect_key:
            raise FrameError(f"frame key {key} does not match expected key {expect_key}")
        scales = torch.frombuffer(bytearray(mv[pos:pos + 4 * n_scales]), dtype=torch.float32) \
            if n_scales else torch.empty(0)
        # a few scales are checked in Python: a torch reduction costs more than the rest of the parse
        finite = (all(map(math.isfinite, struct.unpack_from(f"<{n_scales}f", mv, pos))) if n_scales <= 16
                  else bool(torch.isfinite(scales).all()))
        pos += 4 * n_scales
        if not finite:
            raise FrameError("frame scales hold NaN/Inf")
        payload = _payload_tensor(mv[pos:pos + plen]) if plen else torch.empty(0, dtype=torch.uint8)
        return cls(_KIND_NAMES[kind], encoding, dtype, bits, tuple(shape), scales, payload,
                   key=key, step=step, nbytes=total)


def _payload_tensor(mv: memoryview) -> torch.Tensor:
    """The payload bytes as a uint8 tensor: a zero-copy view when the buffer is immutable (``bytes``,
    a read-only memoryview), else a private copy (the caller may reuse a mutable buffer). The
    view must not be written to; every decoder here only reads it."""
    if not mv.readonly:
        return torch.frombuffer(bytearray(mv), dtype=torch.uint8)
    return torch.frombuffer(mv, dtype=torch.uint8)  # "not writable" is silenced for this module


def _as_memoryview(buf) -> memoryview:
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8:
            raise FrameError(f"frame buffer tensor must be uint8, got {buf.dtype}")
        buf = buf.detach().cpu().contiguous().numpy()
    mv = memoryview(buf)
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def join_frames(frames: list[bytes]) -> bytes:
    """A bundle: frames back to back (each is self-delimiting)."""
    return b"".join(frames)


def split_frames(buf, **expect) -> Iterator[Frame]:
    """Iterate over the frames of a bundle; raises FrameError on any bad frame or trailing bytes."""
    mv = _as_memoryview(buf)
    off = 0
    while off < len(mv):
        f = Frame.from_bytes(mv, off, **expect)
        off += f.nbytes
        yield f
