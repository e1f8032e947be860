"""What crosses the links: per tensor, a codec down (LAQ weights) and a codec up (clipped stochastic
codes of the model delta, with the sender's error-feedback memory); a model as one bundle of frames."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lowbit.codec.codecs import RawCodec, StochasticGradCodec, WeightCodec
from lowbit.codec.feedback import with_feedback
from lowbit.codec.frame import split_frames
from lowbit.errors import FrameError
from lowbit.quant.grads import ErrorFeedback
from lowbit.sim.config import FedConfig
from lowbit.sim.model import trainable

__all__ = ["LinkSpec", "link_spec", "make_link_plan", "link_nbytes", "encode_tensors", "decode_tensors"]


@dataclass(frozen=True)
class LinkSpec:
    key: int
    name: str
    shape: tuple[int, ...]
    down: object  # codec of the global model -> client
    up: object    # codec of the model delta client -> server


def link_spec(key: int, name: str, shape: Sequence[int], *, up_bits: int, down_bits: int,
              clip: float | None = 3.0, per_row: bool = False) -> LinkSpec:
    """One tensor's codecs on both links: a matrix goes down as LAQ weights and up as clipped
    stochastic codes of its delta; a 1-D tensor (LayerNorm, bias) and any 32-bit link go fp32."""
    small = len(shape) < 2
    down = RawCodec(torch.float32, "weight") if small or down_bits == 32 else \
        WeightCodec("laq-linear", down_bits, per_row=per_row)
    up = RawCodec(torch.float32, "grad") if small or up_bits == 32 else StochasticGradCodec(up_bits, clip)
    return LinkSpec(key, name, tuple(shape), down, up)


def make_link_plan(model: nn.Module, cfg: FedConfig) -> list[LinkSpec]:
    """A :func:`link_spec` per trainable parameter; frozen parameters (``cfg.freeze``) are not on
    the links."""
    return [link_spec(key, name, p.shape, up_bits=cfg.up_bits, down_bits=cfg.down_bits, clip=cfg.clip,
                      per_row=cfg.per_row)
            for key, (name, p) in enumerate(trainable(model))]


def link_nbytes(plan: list[LinkSpec]) -> dict[str, int]:
    """Exact bytes of one model on each link (codec formula) and of the fp32 equivalent."""
    raw = RawCodec()
    return {"down": sum(s.down.frame_nbytes(s.shape) for s in plan),
            "up": sum(s.up.frame_nbytes(s.shape) for s in plan),
            "fp32": sum(raw.frame_nbytes(s.shape) for s in plan),
            "numel": sum(math.prod(s.shape) for s in plan)}


def encode_tensors(plan: list[LinkSpec], tensors: Sequence[torch.Tensor], link: str, step: int = 0,
                   generator: torch.Generator | None = None, ef: ErrorFeedback | None = None) -> bytes:
    """All tensors through the ``link`` ("down" | "up") codecs, as one bundle of frames. With ``ef``,
    quantized uplink tensors carry the residual: send Q(x + e), keep e ← x + e − deQ(...)."""
    frames = []
    for spec, x in zip(plan, tensors):
        f = with_feedback(getattr(spec, link), ef).encode(x, key=spec.key, step=step, generator=generator,
                                                          name=spec.name)
        if f is None:
            raise FrameError(f"{link}link codec dropped {spec.name} (non-finite values)")
        frames.append(f.to_bytes())
    return b"".join(frames)


def decode_tensors(plan: list[LinkSpec], buf, link: str) -> list[torch.Tensor]:
    """A bundle (bytes, or its frames already parsed) back to float32 tensors, checking keys and
    shapes against the plan."""
    out = []
    frames = split_frames(buf) if isinstance(buf, (bytes, bytearray, memoryview)) else iter(buf)
    for spec in plan:
        f = next(frames, None)
        if f is None:
            raise FrameError(f"{link}link bundle ends before {spec.name} (key {spec.key})")
        if f.key != spec.key or tuple(f.shape) != spec.shape:
            raise FrameError(f"{link}link frame key {f.key} shape {tuple(f.shape)} does not match "
                             f"{spec.name}: key {spec.key} shape {spec.shape}")
        out.append(getattr(spec, link).decode(f))
    if next(frames, None) is not None:
        raise FrameError(f"{link}link bundle holds more frames than the model's {len(plan)} tensors")
    return out
