"""Q8BERT (Zafrir, Boudoukh, Izsak & Wasserblat, "Q8BERT: Quantized 8Bit BERT", EMC² 2019).

Symmetric linear quantization with M = 2^(b−1) − 1 (= 127 at 8 bits):

    weights:      S_W = M / max|W|,       Ŵ = clamp(round(W·S_W), −M, M) / S_W
    activations:  S_x = M / EMA(max|x|),  x̂ = clamp(round(x·S_x), −M, M) / S_x

in every nn.Linear (weights + input activations) and nn.Embedding (weights only), trained with the
straight-through estimator (quantization-aware fine-tuning). The task classifier stays fp32 by
default (``skip=("classifier",)``); pass ``skip=()`` to quantize it too.
"""
from __future__ import annotations

import torch

from lowbit.errors import ConfigError
from lowbit.models.registry import Scheme, register_scheme
from lowbit.quant.acts import EMASymmetricActQuant
from lowbit.quant.qtensor import QTensor, grid_k

__all__ = ["quantize_symmetric_max", "SymmetricMaxWeightQuant", "q8bert"]


def quantize_symmetric_max(w: torch.Tensor, bits: int = 8, per_row: bool = False) -> QTensor:
    """Q8BERT weight rule as a QTensor on the "sym" grid: α = max|W| (per tensor or row), codes
    c = round(W/α·M) + M, so Ŵ = (c − M)/M·α = round(W·S)/S with S = M/max|W|. All-zero → α = 1."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"symmetric weight bits must be an integer in 2..8, got {bits!r}")
    if per_row and w.dim() < 2:
        raise ConfigError(f"per_row needs a tensor with >= 2 dims, got shape {tuple(w.shape)}")
    m = grid_k(bits)
    w2 = w.detach().to(torch.float32)
    w2 = w2.reshape(w2.shape[0], -1) if per_row else w2.reshape(1, -1)
    a = w2.abs().amax(1)
    a = torch.where(a > 0, a, torch.ones_like(a))
    codes = (torch.clamp(torch.round(w2 / a.unsqueeze(1) * m), -m, m) + m).to(torch.uint8)
    scale = a if per_row else a.reshape(())
    return QTensor(codes=codes.reshape(w.shape), scale=scale.contiguous(), bits=bits, grid="sym")


class SymmetricMaxWeightQuant:
    """Callable weight quantizer ``w -> QTensor`` applying :func:`quantize_symmetric_max`."""

    def __init__(self, bits: int = 8, per_row: bool = False) -> None:
        quantize_symmetric_max(torch.ones(1, 1), bits)  # validates bits
        self.bits, self.per_row = bits, per_row

    def __call__(self, w: torch.Tensor) -> QTensor:
        return quantize_symmetric_max(w, self.bits, self.per_row and w.dim() >= 2)

    def __repr__(self) -> str:
        return f"SymmetricMax(bits={self.bits}, per_row={self.per_row})"


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.startswith(s + ".") or name.split(".")[-1] == s for s in skip)


@register_scheme("q8bert")
def q8bert(bits: int = 8, act_bits: int = 8, momentum: float = 0.9, per_row: bool = False,
           skip: tuple[str, ...] | list[str] = ("classifier",)) -> Scheme:
    """Q8BERT: ``bits``-bit symmetric weights in all Linear and Embedding layers, ``act_bits``-bit
    symmetric EMA activations on Linear inputs (act_bits=32: no activation quantization)."""
    skip = tuple(skip)
    wq = SymmetricMaxWeightQuant(bits, per_row)

    def linear(name, mod):
        if _skipped(name, skip):
            return None
        aq = None if act_bits >= 32 else EMASymmetricActQuant(act_bits, momentum=momentum)
        return wq, aq

    def embedding(name, mod):
        return None if _skipped(name, skip) else (wq, None)

    return Scheme("q8bert", linear, embedding, None,
                  dict(bits=bits, act_bits=act_bits, momentum=momentum, per_row=per_row, skip=list(skip)))
