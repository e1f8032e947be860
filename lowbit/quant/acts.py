"""Activation fake-quantization (forward quantize-dequantize, straight-through backward).

- min-max asymmetric, per batch (TernaryBERT, Zhang et al. EMNLP 2020, 8-bit activations);
- symmetric with an EMA of max|x| (Q8BERT, Zafrir et al. 2019).

The range (min/max or max|x|) is treated as a constant in the backward pass (it is detached).
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.quant.ste import QuantizeSTE, ste

__all__ = ["fake_quant_minmax", "fake_quant_symmetric", "MinMaxActQuant", "EMASymmetricActQuant"]


def _check_act_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"activation bits must be an integer in 2..16, got {bits!r}")


def fake_quant_minmax(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Asymmetric min-max fake quant (TernaryBERT activations):

        s = (max − min) / (2^b − 1),  z = round(−min / s),
        x̂ = (clamp(round(x/s) + z, 0, 2^b − 1) − z) · s

    over the whole tensor. Backward: identity (straight-through); since [min, max] is the range of x
    itself no input is outside it. A constant x (max = min) is returned unchanged. Output dtype = x's.
    """
    _check_act_bits(bits)
    if x.numel() == 0:
        return x
    with torch.no_grad():
        xf = x.detach().to(torch.float32)
        lo, hi = xf.amin(), xf.amax()
        qmax = float(2 ** bits - 1)
        span = hi - lo
        s = torch.where(span > 0, span / qmax, torch.ones_like(span))
        z = torch.round(-lo / s)
        xq = (torch.clamp(torch.round(xf / s) + z, 0, qmax) - z) * s
        xq = torch.where(span > 0, xq, xf)
    return ste(x, xq)


def _symmetric(x: torch.Tensor, m: int, max_abs: torch.Tensor) -> torch.Tensor:
    xf = x.to(torch.float32)
    ok = max_abs > 0
    sc = torch.where(ok, m / max_abs.clamp_min(1e-30), torch.ones_like(max_abs))
    return torch.where(ok, torch.clamp(torch.round(xf * sc), -m, m) / sc, xf)


def fake_quant_symmetric(x: torch.Tensor, bits: int = 8, max_abs: float | torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric linear fake quant (Q8BERT): M = 2^(b−1) − 1, S = M / max_abs,
    x̂ = clamp(round(x·S), −M, M) / S, with max_abs = max|x| when not given.

    Backward: clipped straight-through, ∂x̂/∂x = 1[|x| ≤ max_abs] (zero for saturated inputs, which
    can only happen when ``max_abs`` is given, e.g. an EMA range). max_abs = 0 returns x unchanged.
    """
    _check_act_bits(bits)
    if x.numel() == 0:
        return x
    m = (1 << (bits - 1)) - 1
    if max_abs is None:
        r = x.detach().abs().amax().to(torch.float32)
    else:
        r = torch.as_tensor(max_abs, dtype=torch.float32, device=x.device).detach()
        if r.dim() != 0:
            raise ConfigError(f"max_abs must be a scalar, got shape {tuple(r.shape)}")
        if not bool(torch.isfinite(r)) or bool(r < 0):
            raise ConfigError(f"max_abs must be finite and >= 0, got {float(r)}")
    r = r.to(x.device)
    return QuantizeSTE.apply(x, lambda t: _symmetric(t, m, r), -r, r)


class MinMaxActQuant(nn.Module):
    """Per-batch min-max activation fake quant (TernaryBERT). No state; identity when disabled."""

    def __init__(self, bits: int = 8, enabled: bool = True) -> None:
        super().__init__()
        _check_act_bits(bits)
        self.bits = bits
        self.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_minmax(x, self.bits) if self.enabled else x

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"


class EMASymmetricActQuant(nn.Module):
    """Symmetric activation fake quant with an exponential moving average of max|x| (Q8BERT).

    Training mode: r ← momentum·r + (1 − momentum)·max|x| (the first batch sets r = max|x|), then
    quantize with the updated r. Eval mode: quantize with the stored r, no update (if no training
    batch was seen yet, the current batch's max|x| is used). Q8BERT's reference code uses a decay of
    0.9999 for long runs; the default here is 0.9 so the range settles within a short fine-tuning run.
    Buffers ``running_max`` (float32 scalar) and ``initialized`` (bool) live in the state dict.
    Identity (and no update) when disabled.
    """

    running_max: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, bits: int = 8, momentum: float = 0.9, enabled: bool = True) -> None:
        super().__init__()
        _check_act_bits(bits)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ConfigError(f"EMA momentum must be in [0, 1), got {momentum!r}")
        self.bits = bits
        self.momentum = float(momentum)
        self.enabled = enabled
        self.register_buffer("running_max", torch.zeros((), dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or x.numel() == 0:
            return x
        cur = x.detach().abs().amax().to(torch.float32)
        if self.training:
            with torch.no_grad():
                ema = self.momentum * self.running_max + (1.0 - self.momentum) * cur
                self.running_max.copy_(torch.where(self.initialized, ema, cur))
                self.initialized.fill_(True)
            r = self.running_max
        else:
            r = torch.where(self.initialized, self.running_max, cur)
        return fake_quant_symmetric(x, self.bits, r.clone())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}, enabled={self.enabled}"
