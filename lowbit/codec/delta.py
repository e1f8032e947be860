"""Delta-coded weight frames: a worker keeps the packed codes it last received, an owner sends only
the groups of codes that changed.

Low-bit weight codes barely move from one step to the next (an optimizer step moves few weights
across a grid boundary) while the scales move a little every step. A delta frame (kind ``wdelta``)
carries the new scales in full and, of the packed codes, only the groups of 8 codes (``bits`` bytes
each: packing never splits a group) whose bytes changed, as the XOR of their old and new bytes
(mostly zero bits: one code of eight changed), deflated. Its payload, little-endian::

    offset  size          field
    0       8             base: xxh3-64 of the packed codes the delta applies to
    8       8             digest: xxh3-64 of the packed codes it produces
    16      4             n: groups that changed
    20      4             m: bytes of the compressed group ids
    24      m             the group ids as u32 gaps (first id, then differences), deflated (zlib-ng)
    24 + m  the rest      the n · bits bytes old XOR new of those groups, deflated (zlib-ng)

The frame header (key, step, shape, bits, grid, scales) and its CRC are those of any frame. A
receiver applies a delta only onto the state whose digest is ``base`` and checks the result against
``digest``: a worker that missed a delta, or whose state drifted, is detected at once and never
trains on wrong weights (:class:`StateMismatch`). Deltas are exact: the worker decodes the same
packed codes and scales a full frame would have carried.

:class:`DeltaEncoder` (an owner, per key) sends a full frame (a *key frame*) the first time, every
``keyframe_every`` steps, when asked (``full=True``: a worker joins or resumes), and whenever the
delta would not be smaller. :class:`DeltaDecoder` (a worker, per key) keeps the packed codes and
decodes full and delta frames into the weights.
"""
from __future__ import annotations

import math
import struct

import torch

from lowbit.codec.frame import Frame, frame_nbytes
from lowbit.codec.ids import decode_ids, deflate, encode_ids, inflate_exact
from lowbit.errors import FrameError

_HEAD = struct.Struct("<QQII")
_BASE_NBYTES = _HEAD.size  # 24


class StateMismatch(FrameError):
    """A delta frame does not apply to the codes this receiver holds (a missed or corrupted delta):
    the receiver needs a key frame."""


def digest(packed: torch.Tensor) -> int:
    """xxh3-64 of packed codes (a uint8 CPU tensor)."""
    import xxhash

    return xxhash.xxh3_64_intdigest(memoryview(packed.numpy()))


def _groups(numel: int) -> int:
    return (numel + 7) // 8


def _padded(payload: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """``payload`` copied into a zero-padded buffer of whole groups, viewed (groups, bits)."""
    g = _groups(numel)
    buf = torch.zeros(g * bits, dtype=torch.uint8)
    buf[: payload.numel()] = payload
    return buf.view(g, bits)


def _changed_groups(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (groups) of two (groups, bits) uint8 views that differ."""
    bits = new.shape[1]
    wide = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(bits)
    if wide is not None:  # one comparison per group
        diff = new.view(wide).reshape(-1) != old.view(wide).reshape(-1)
    else:
        diff = (new != old).any(dim=1)
    return diff.nonzero().reshape(-1)


class _Codes:
    """Packed codes of one key held in whole groups, with their digest."""

    __slots__ = ("groups", "numel", "bits", "encoding", "shape", "digest")

    def __init__(self, f: Frame):
        self.numel, self.bits, self.encoding, self.shape = math.prod(f.shape), f.bits, f.encoding, tuple(f.shape)
        self.groups = _padded(f.payload.reshape(-1).cpu(), self.numel, f.bits)
        self.digest = digest(self.packed())

    def packed(self) -> torch.Tensor:
        return self.groups.view(-1)[: (self.numel * self.bits + 7) // 8]

    def matches(self, f: Frame) -> bool:
        return (self.bits, self.encoding, self.shape) == (f.bits, f.encoding, tuple(f.shape))


class DeltaEncoder:
    """An owner's side: turns each key's full weight frame into the bytes to send (a key frame or a
    delta against what was sent last). ``keyframe_every``: a key frame at every step that is a
    multiple of it (0: only when needed)."""

    def __init__(self, keyframe_every: int = 0):
        if keyframe_every < 0:
            raise ValueError(f"keyframe_every must be >= 0, got {keyframe_every}")
        self.keyframe_every = keyframe_every
        self.sent: dict[int, _Codes] = {}
        self.full_nbytes = 0  # bytes the frames encoded so far would have taken as key frames
        self.nbytes = 0       # bytes they took

    def forget(self, keys=None) -> None:
        """The next frame of ``keys`` (default: all) is a key frame."""
        for k in list(self.sent) if keys is None else keys:
            self.sent.pop(k, None)

    def encode(self, f: Frame, *, full: bool = False) -> bytes:
        """The bytes that bring a receiver holding the last frame sent for ``f.key`` to ``f`` (a grid
        weight frame at its step). Raw frames (16/32-bit weights) always go whole."""
        whole = frame_nbytes(f.encoding, f.bits, f.shape, f.scales.numel(), f.dtype)  # serialized only if sent
        self.full_nbytes += whole
        prev = self.sent.get(f.key)
        if f.encoding == "raw":
            self.nbytes += whole
            return f.to_bytes()
        cur = _Codes(f)
        key_frame = (full or prev is None or not prev.matches(f)
                     or (self.keyframe_every and f.step % self.keyframe_every == 0))
        out = None
        if not key_frame:
            delta = self._delta(f, prev, cur, _changed_groups(cur.groups, prev.groups))
            if len(delta) < whole:
                out = delta
        out = out if out is not None else f.to_bytes()
        self.sent[f.key] = cur
        self.nbytes += len(out)
        return out

    @staticmethod
    def _delta(f: Frame, prev: _Codes, cur: _Codes, ids: torch.Tensor) -> bytes:
        packed_ids = encode_ids(ids)
        flips = deflate(cur.groups[ids].bitwise_xor_(prev.groups[ids]).reshape(-1).numpy())
        head = _HEAD.pack(prev.digest, cur.digest, ids.numel(), len(packed_ids))
        payload = torch.frombuffer(bytearray(head + packed_ids + flips), dtype=torch.uint8)
        return Frame(kind="wdelta", encoding=f.encoding, dtype=f.dtype, bits=f.bits, shape=f.shape, scales=f.scales,
                     payload=payload, key=f.key, step=f.step).to_bytes()


class DeltaDecoder:
    """A worker's side: the packed codes last received per key; :meth:`apply` turns a full or delta
    frame into the full frame it stands for (decode that as any weight frame)."""

    def __init__(self):
        self.held: dict[int, _Codes] = {}

    def forget(self, keys=None) -> None:
        for k in list(self.held) if keys is None else keys:
            self.held.pop(k, None)

    def apply(self, f: Frame) -> Frame:
        """``f`` itself for a full frame (its codes kept when they are a grid's); for a delta frame,
        the full frame it produces from the held codes. Raises :class:`StateMismatch` when the
        delta does not fit the held codes, :class:`FrameError` when it is malformed."""
        if f.kind != "wdelta":
            if f.encoding != "raw":
                self.held[f.key] = _Codes(f)
            return f
        held = self.held.get(f.key)
        if held is None:
            raise StateMismatch(f"delta frame for key {f.key} at step {f.step}, but no codes are held for it "
                                "(a key frame is needed first)")
        if not held.matches(f):
            raise StateMismatch(f"delta frame for key {f.key} at step {f.step} is for {f.bits}-bit {f.encoding} "
                                f"codes of shape {tuple(f.shape)}, the held codes are {held.bits}-bit "
                                f"{held.encoding} of shape {held.shape}")
        base, want, n, m, ids, body = _parse(f, held)
        if base != held.digest:
            raise StateMismatch(f"delta frame for key {f.key} at step {f.step} applies to codes with digest "
                                f"{base:016x}, the held codes have {held.digest:016x} (a delta was missed)")
        held.groups[ids] = held.groups[ids].bitwise_xor_(body)  # in place: on a mismatch the codes are dropped
        packed = held.packed()
        got = digest(packed)
        if got != want:
            del self.held[f.key]
            raise StateMismatch(f"delta frame for key {f.key} at step {f.step} produced codes with digest "
                                f"{got:016x}, it announces {want:016x}")
        held.digest = got
        return Frame(kind="weight", encoding=f.encoding, dtype=f.dtype, bits=f.bits, shape=f.shape, scales=f.scales,
                     payload=packed, key=f.key, step=f.step)


def _parse(f: Frame, held: _Codes):
    """Split and check a delta payload against the held codes' layout."""
    where = f"delta frame for key {f.key} at step {f.step}"
    p = f.payload.reshape(-1).cpu()
    if p.numel() < _BASE_NBYTES:
        raise FrameError(f"{where}: payload of {p.numel()} bytes, the delta header needs {_BASE_NBYTES}")
    raw = memoryview(p.numpy()) if p.is_contiguous() else memoryview(p.contiguous().numpy())
    base, want, n, m = _HEAD.unpack_from(raw, 0)
    n_groups = held.groups.shape[0]
    if n > n_groups:
        raise FrameError(f"{where}: {n} changed groups, the tensor has {n_groups}")
    if _BASE_NBYTES + m > p.numel():
        raise FrameError(f"{where}: payload of {p.numel()} bytes, its header announces {m} bytes of ids")
    ids = decode_ids(raw[_BASE_NBYTES:_BASE_NBYTES + m], n, n_groups, f"{where}: group ids")
    flips = inflate_exact(raw[_BASE_NBYTES + m:], n * held.bits, f"{where}: changed groups")
    body = torch.frombuffer(bytearray(flips), dtype=torch.uint8).reshape(n, held.bits) if n else \
        torch.zeros(0, held.bits, dtype=torch.uint8)
    return base, want, n, m, ids, body

