"""Shared pieces of the weight quantizers: input checks, per-row views, D-weighted sums and the
QTensor a quantizer returns (:mod:`lowbit.quant.weights`, :mod:`lowbit.quant.ternary`)."""
from __future__ import annotations

import torch

from lowbit.errors import ConfigError
from lowbit.quant.qtensor import QTensor

def _check_inputs(w: torch.Tensor, d: torch.Tensor | None, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a weight tensor (and its D); returns w's (min, max), from the pass that checked it."""
    if not isinstance(w, torch.Tensor):
        raise ConfigError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    if w.numel() == 0:
        raise ConfigError(f"weight tensor is empty (shape {tuple(w.shape)})")
    if per_row and w.dim() < 2:
        raise ConfigError(f"per_row=True needs a tensor with >= 2 dims, got shape {tuple(w.shape)}")
    lo_w, hi_w = torch.aminmax(w)  # one pass: NaN propagates, so finite min/max means finite w
    if not (bool(torch.isfinite(lo_w)) and bool(torch.isfinite(hi_w))):
        raise ConfigError("weight tensor holds NaN/Inf")
    if d is not None:
        if not isinstance(d, torch.Tensor):
            raise ConfigError(f"d must be a torch.Tensor or None, got {type(d).__name__}")
        if d.shape != w.shape:
            raise ConfigError(f"d must have the weight's shape {tuple(w.shape)}, got {tuple(d.shape)}")
        lo, hi = torch.aminmax(d)  # one pass: NaN propagates, so finite min/max means finite d
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            raise ConfigError("d (diag of D) holds NaN/Inf")
        if not float(lo) > 0:
            raise ConfigError(f"d (diag of D) must be > 0 everywhere, got min {float(lo)}")
    return lo_w, hi_w


def _rows(t: torch.Tensor, per_row: bool) -> torch.Tensor:
    """View ``t`` as float32 [R, n]: R = shape[0] per row, else R = 1."""
    t = t.to(torch.float32)
    return t.reshape(t.shape[0], -1) if per_row else t.reshape(1, -1)


def _d_rows(d: torch.Tensor | None, w: torch.Tensor, per_row: bool) -> torch.Tensor | None:
    return None if d is None else _rows(d.to(w.device), per_row)


def _wsum(x: torch.Tensor, d2: torch.Tensor | None) -> torch.Tensor:
    """Σ_j d_j x_j along dim 1 (Σ_j x_j when d is None)."""
    return (x * d2).sum(1) if d2 is not None else x.sum(1)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _finish(codes2: torch.Tensor, alpha: torch.Tensor, w: torch.Tensor, per_row: bool, bits: int, grid: str,
            zero_scale_one: bool = True) -> QTensor:
    alpha = alpha.to(torch.float32)
    if zero_scale_one:
        alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    scale = alpha if per_row else alpha.reshape(())
    return QTensor(codes=codes2.to(torch.uint8).reshape(w.shape), scale=scale.contiguous(), bits=bits, grid=grid)


def _sign_codes_ternary(w2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sym bits=2 codes: 0 -> −1, 1 -> 0, 2 -> +1 (b = sign(w)·mask)."""
    pos = torch.full_like(w2, 2, dtype=torch.uint8)
    neg = torch.zeros_like(w2, dtype=torch.uint8)
    one = torch.ones_like(w2, dtype=torch.uint8)
    return torch.where(mask, torch.where(w2 >= 0, pos, neg), one)
