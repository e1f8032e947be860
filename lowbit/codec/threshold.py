"""Threshold-ternary gradients for error feedback: the few large values go as ±s, the rest as zero.

Stochastic 2-bit rounding of a clipped gradient is unbiased but noisy (its variance exceeds the
gradient's own at a 3σ clip), and error feedback cannot rescue it: the residual it feeds back is
that noise, which grows the next step's scale. This codec is the biased, low-variance alternative
error feedback is made for (the compressor of EF-SGD / sparsified SGD, Stich et al. 2018,
Karimireddy et al. 2019): values with |g| > τ·rms(g) are sent as sign(g)·s, where s is the mean
magnitude of the values sent (the least-squares scale for them), the others as zero. The residual
keeps what was not sent until it has grown large enough to go. At τ = 1.5 about one value in ten
is sent, so the codes are mostly the zero code and entropy-code to well under a bit
(:mod:`lowbit.codec.entropy`). The frame is an ordinary 2-bit symmetric grid frame (codes 0, 1, 2
for −s, 0, +s): receivers decode it as any gradient frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.codec.decode import decode_frame
from lowbit.codec.frame import Frame, frame_nbytes
from lowbit.codec.pack import pack_bits
from lowbit.errors import ConfigError
from lowbit.quant.grads import check_finite


@dataclass(frozen=True)
class ThresholdGradCodec:
    """Deterministic ternary gradient codec (2 bits on the wire): |g| > ``threshold``·rms(g) -> ±s."""

    threshold: float = 1.5
    nonfinite: str = "error"
    kind: str = "grad"
    bits = 2

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0 <= self.threshold < float("inf"):
            raise ConfigError(f"ternary threshold must be a finite number >= 0, got {self.threshold!r}")

    def encode(self, x: torch.Tensor, *, key: int = 0, step: int = 0, generator=None) -> Frame | None:
        g = x.detach().to(torch.float32).reshape(-1)
        norm = float(torch.linalg.vector_norm(g)) if g.numel() else 0.0
        if not math.isfinite(norm):  # the screen for NaN/Inf costs a pass: only run it when needed
            g = check_finite(g, name=f"gradient[{key}]", policy=self.nonfinite)
            if g is None:
                return None
            norm = float(torch.linalg.vector_norm(g))
        scale = 0.0
        codes = torch.ones(g.numel(), dtype=torch.uint8, device=g.device)
        if g.numel():
            mag = g.abs()
            rms = norm / g.numel() ** 0.5
            keep = mag > self.threshold * rms if rms > 0 else mag > 0
            n = int(keep.sum())
            if n:
                scale = float(mag[keep].sum()) / n
                codes += (keep & (g > 0)).to(torch.uint8)
                codes -= (keep & (g < 0)).to(torch.uint8)
        return Frame(kind=self.kind, encoding="sym", dtype=torch.float32, bits=2, shape=tuple(x.shape),
                     scales=torch.tensor([scale], dtype=torch.float32), payload=pack_bits(codes.cpu(), 2),
                     key=key, step=step)

    def decode(self, f: Frame, device=None) -> torch.Tensor:
        return decode_frame(f, device).float()

    def frame_nbytes(self, shape: tuple[int, ...]) -> int:
        return frame_nbytes("sym", 2, tuple(shape), 1)
