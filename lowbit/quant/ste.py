"""Straight-through estimators (Bengio, Léonard & Courville 2013; as used by BinaryConnect, LAT, LAQ,
TernaryBERT, Q8BERT): the forward pass uses the quantized value, the backward pass treats the
quantizer as the identity (optionally zeroing the gradient outside a clip range).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["round_ste", "ste", "QuantizeSTE", "quantize_ste"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward: x + (round(x) − x).detach()."""
    return x + (torch.round(x) - x).detach()


def ste(x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """Value ``x_q``, gradient of ``x``: x + (x_q − x).detach().

    ``x_q`` is cast to ``x``'s dtype and device, so ``ste(w, q.dequantize())`` works for bf16/fp16
    ``w`` and gives ∂L/∂w = ∂L/∂ŵ (the LAT/LAQ update rule: gradients taken at ŵ, applied to w).
    """
    return x + (x_q.to(device=x.device, dtype=x.dtype) - x).detach()


class QuantizeSTE(torch.autograd.Function):
    """``QuantizeSTE.apply(x, fn, lo=None, hi=None)``: forward ``fn(x)`` (any quantize function returning
    a tensor of x's shape), backward the straight-through gradient, multiplied by 1[lo ≤ x ≤ hi] when
    ``lo``/``hi`` (floats or broadcastable tensors) are given (the "clipped STE" that zeroes the
    gradient of saturated inputs)."""

    @staticmethod
    def forward(ctx, x, fn, lo=None, hi=None):  # type: ignore[override]
        with torch.no_grad():
            y = fn(x)
        mask = None
        if lo is not None or hi is not None:
            mask = torch.ones_like(x, dtype=torch.bool)
            if lo is not None:
                mask &= x >= lo
            if hi is not None:
                mask &= x <= hi
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        if ctx.has_mask:
            grad = grad * mask.to(grad.dtype)
        return grad, None, None, None


def quantize_ste(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
                 clip: tuple[float | torch.Tensor, float | torch.Tensor] | None = None) -> torch.Tensor:
    """Convenience wrapper: ``QuantizeSTE.apply(x, fn, *clip)``."""
    lo, hi = clip if clip is not None else (None, None)
    return QuantizeSTE.apply(x, fn, lo, hi)
