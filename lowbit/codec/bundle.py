"""Bundles: frames back to back, as a peer sends them, and every check of what a peer sent.

:func:`parse_bundle` validates a received bundle: every frame's header and CRC
(:meth:`Frame.from_bytes`), its kind, step, key (known and allowed from that peer) and shape (from
the key -> shape map the receiver was built with). :func:`check_announced` bounds the length a peer
announces before anything is allocated for it; :func:`bundle_bound` gives that bound for the keys a
peer may send. A bad peer is a :class:`FrameError` on the receiving rank that names the peer and the
step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from lowbit.codec.decode import dense_frame
from lowbit.codec.frame import CRC_SIZE, HEADER_SIZE, Frame
from lowbit.errors import FrameError


def max_frame_nbytes(shape: tuple[int, ...]) -> int:
    """The largest frame any codec can make for ``shape``: raw fp32 payload (4 B/element) plus one
    scale per row (no real frame has both, so this is a strict upper bound)."""
    shape = tuple(shape)
    rows = shape[0] if shape else 1
    return HEADER_SIZE + 4 * len(shape) + 4 * max(rows, 1) + 4 * math.prod(shape) + CRC_SIZE


def bundle_bound(shapes: Mapping[int, tuple], keys: Iterable[int], copies: int = 1) -> int:
    """Upper bound of the bundle a peer may send carrying ``copies`` frames of each of ``keys``."""
    return copies * sum(max_frame_nbytes(shapes[k]) for k in keys)


def check_announced(n: int, bound: int | None, *, peer: int, step: int, rank: int, chunk: int | None = None) -> None:
    """The length ``n`` that ``peer`` announced for a bundle (or for chunk ``chunk`` of one): a
    :class:`FrameError` when it is negative or over ``bound`` (None: unbounded)."""
    if n < 0 or (bound is not None and n > bound):
        what = "a bundle of" if chunk is None else f"chunk {chunk} of"
        raise FrameError(f"rank {rank}: peer {peer} announced {what} {n} bytes at step {step}; "
                         f"at most {bound} bytes are possible for the frames it may send")


@dataclass
class ParsedFrame:
    """A validated frame and the exact bytes it came in (for forwarding unchanged)."""

    frame: Frame
    raw: memoryview


def parse_bundle(buf, *, peer: int, step: int, kind: str, shapes: Mapping[int, tuple],
                 allowed_keys: Iterable[int] | None = None, required_keys: Iterable[int] | None = None,
                 max_per_key: int = 1, rank: int | None = None) -> list[ParsedFrame]:
    """Split and validate a received bundle. Every frame must be of ``kind``, carry ``step``, a key
    in ``allowed_keys`` (default: any key of ``shapes``) with the shape ``shapes[key]``; a key may
    occur at most ``max_per_key`` times, and each of ``required_keys`` at least once.
    Raises :class:`FrameError` naming the peer and the step."""
    where = f"{'rank %d: ' % rank if rank is not None else ''}bundle from peer {peer} at step {step}"
    allowed = set(shapes) if allowed_keys is None else set(allowed_keys)
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
    out: list[ParsedFrame] = []
    seen: dict[int, int] = {}
    off = 0
    while off < len(mv):
        try:
            f = Frame.from_bytes(mv, off, expect_kind=kind)
            f = dense_frame(f)  # a row-sparse or coded frame as the dense one it stands for
        except FrameError as e:
            raise FrameError(f"{where}, frame #{len(out)} at byte {off}: {e}") from e
        if f.key not in allowed:
            raise FrameError(f"{where}: frame for key {f.key}, which this peer may not send here "
                             f"(expected keys {sorted(allowed)[:16]}{'...' if len(allowed) > 16 else ''})")
        if tuple(f.shape) != tuple(shapes[f.key]):
            raise FrameError(f"{where}: frame for key {f.key} has shape {tuple(f.shape)}, "
                             f"expected {tuple(shapes[f.key])}")
        if f.step != step:
            raise FrameError(f"{where}: frame for key {f.key} carries step {f.step}, expected {step}")
        seen[f.key] = seen.get(f.key, 0) + 1
        if seen[f.key] > max_per_key:
            raise FrameError(f"{where}: key {f.key} occurs {seen[f.key]} times, at most {max_per_key} allowed")
        out.append(ParsedFrame(f, mv[off:off + f.nbytes]))
        off += f.nbytes
    if required_keys is not None:
        missing = sorted(set(required_keys) - set(seen))
        if missing:
            raise FrameError(f"{where}: missing frames for keys {missing[:16]}{'...' if len(missing) > 16 else ''}")
    return out
