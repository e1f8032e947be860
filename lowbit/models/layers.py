"""Quantization-aware drop-in layers and the low-bit attention kernel.

``QuantLinear`` / ``QuantEmbedding`` keep the fp32 *latent* weight w (the one the optimizer updates,
as in BinaryConnect / LAT / TernaryBERT) and compute the forward pass at the quantized weight

    ŵ = Q(w) = levels[codes]·α          (a :class:`~lowbit.quant.qtensor.QTensor`)
    y = act_q(x) · ŵᵀ + b               (QuantLinear)
    y = ŵ[ids]                          (QuantEmbedding)

with a straight-through gradient ∂L/∂w = ∂L/∂ŵ (``ste(w, ŵ)``). The weight quantizer is any callable
``w -> QTensor | None`` (None = keep fp); it receives the ``nn.Parameter`` itself, so a loss-aware
quantizer can look up its optimizer state (see :class:`lowbit.models.ternarybert.TernaryWeightQuant`).

The quantized weight is cached and recomputed only when the parameter changes (its in-place version
counter moves, as after ``optimizer.step()``), so evaluation does not re-quantize every batch.

``lowbit_attention`` is an ``AttentionInterface`` kernel ("lowbit_eager") equal to transformers'
eager attention, plus optional activation fake-quant of the inputs of the two attention matmuls
(Q·Kᵀ and P·V, TernaryBERT) and, when asked, returning the pre-softmax attention *scores* instead of
the probabilities as ``outputs.attentions`` (the quantity TernaryBERT/TinyBERT distil).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.qtensor import QTensor

__all__ = ["QuantLinear", "QuantEmbedding", "WeightQuantizer", "lowbit_attention", "ATTN_IMPL",
           "install_lowbit_attention", "attention_modules"]

WeightQuantizer = Callable[[torch.Tensor], Optional[QTensor]]


class _QuantMixin:
    """Shared weight-quantizer state for QuantLinear / QuantEmbedding."""

    weight: nn.Parameter

    def _init_quant(self, weight_quant: WeightQuantizer | None, act_quant: nn.Module | None) -> None:
        self.weight_quant = weight_quant
        self.act_quant = act_quant  # nn.Module -> registered as a submodule (its buffers are state)
        self.enabled = True
        self._qcache: tuple | None = None

    def _cache_key(self) -> tuple:
        w = self.weight
        return (w._version, w.data_ptr(), id(self.weight_quant), getattr(self.weight_quant, "version", 0))

    def quantized_state(self) -> QTensor | None:
        """The QTensor of the current latent weight (what export packs); None for an fp weight."""
        if self.weight_quant is None:
            return None
        key = self._cache_key()
        if self._qcache is not None and self._qcache[0] == key:
            return self._qcache[1]
        with torch.no_grad():
            q = self.weight_quant(self.weight)
        if q is not None and tuple(q.shape) != tuple(self.weight.shape):
            raise ValueError(f"weight quantizer returned shape {tuple(q.shape)} for weight {tuple(self.weight.shape)}")
        deq = None if q is None else q.dequantize(self.weight.dtype).to(self.weight.device)
        self._qcache = (key, q, deq)
        return q

    def set_quantized_state(self, q: QTensor) -> None:
        """Load a stored QTensor: latent weight := dequantized q, and the cache holds q itself, so the
        forward pass uses exactly these codes and scales (no re-quantization round-off)."""
        deq = q.dequantize(self.weight.dtype).to(self.weight.device)
        with torch.no_grad():
            self.weight.copy_(deq)
        self._qcache = (self._cache_key(), q, deq)

    def effective_weight(self) -> torch.Tensor:
        """ŵ with the straight-through gradient to w (w itself when disabled or fp)."""
        if not self.enabled or self.weight_quant is None:
            return self.weight
        if self.quantized_state() is None:
            return self.weight
        deq = self._qcache[2]
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return deq
        # straight-through, value exactly ŵ: ŵ + (w − w.detach()) is ŵ + 0 forward, ∂/∂w = 1 backward
        # (ste(w, ŵ) = w + (ŵ − w) can differ from ŵ in the last ulp, which an 8-bit activation
        # quantizer downstream may amplify into a different code)
        return deq + (self.weight - self.weight.detach())


class QuantLinear(_QuantMixin, nn.Linear):
    """nn.Linear with a weight quantizer and an input-activation quantizer:
    y = F.linear(act_q(x), ste(w, Q(w)), b). ``enabled=False`` is exactly nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight_quant: WeightQuantizer | None = None, act_quant: nn.Module | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quant(weight_quant, act_quant)

    @classmethod
    def from_float(cls, module: nn.Linear, weight_quant: WeightQuantizer | None = None,
                   act_quant: nn.Module | None = None) -> "QuantLinear":
        """A QuantLinear sharing nothing with ``module`` but holding copies of its weight and bias."""
        q = cls(module.in_features, module.out_features, bias=module.bias is not None,
                weight_quant=weight_quant, act_quant=act_quant,
                device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(module.weight)
            if module.bias is not None:
                q.bias.copy_(module.bias)
        q.train(module.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_quant={self.weight_quant!r}, enabled={self.enabled}"


class QuantEmbedding(_QuantMixin, nn.Embedding):
    """nn.Embedding looking rows up in the quantized table ŵ (straight-through to w). The input is
    integer ids, so an activation quantizer, if given, applies to the *output* rows."""

    @classmethod
    def from_float(cls, module: nn.Embedding, weight_quant: WeightQuantizer | None = None,
                   act_quant: nn.Module | None = None) -> "QuantEmbedding":
        q = cls(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                max_norm=module.max_norm, norm_type=module.norm_type,
                scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse,
                device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(module.weight)
        q._init_quant(weight_quant, act_quant)
        q.train(module.training)
        return q

    def __init__(self, *args, weight_quant: WeightQuantizer | None = None, act_quant: nn.Module | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant(weight_quant, act_quant)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(ids, self.effective_weight(), self.padding_idx, self.max_norm, self.norm_type,
                        self.scale_grad_by_freq, self.sparse)
        if self.enabled and self.act_quant is not None:
            y = self.act_quant(y)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_quant={self.weight_quant!r}, enabled={self.enabled}"


# --------------------------------------------------------------------------- attention

ATTN_IMPL = "lowbit_eager"


def lowbit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs):
    """transformers' eager attention, softmax(Q·Kᵀ·s + mask)·V, with two optional hooks read from
    attributes of the calling attention module:

    - ``module.lowbit_matmul_quant``: an ``nn.ModuleDict`` with keys q, k, p, v whose entries
      fake-quantize the inputs of Q·Kᵀ (q, k) and of P·V (p = probabilities, v) when enabled;
    - ``module.lowbit_return_scores``: return the pre-softmax scores Q·Kᵀ·s (masked positions set
      to 0, as TernaryBERT's distillation code does) instead of the probabilities.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    mq = getattr(module, "lowbit_matmul_quant", None)
    on = mq is not None and getattr(module, "lowbit_quant_enabled", True)
    if on:
        query, key = mq["q"](query), mq["k"](key)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    logits = scores if attention_mask is None else scores + attention_mask
    probs = F.softmax(logits, dim=-1)
    probs = F.dropout(probs, p=dropout, training=module.training)
    if on:
        probs_in, value = mq["p"](probs), mq["v"](value)
    else:
        probs_in = probs
    out = torch.matmul(probs_in, value).transpose(1, 2).contiguous()
    if getattr(module, "lowbit_return_scores", False):
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask < -1e4, 0.0)
        return out, scores
    return out, probs


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPL, lowbit_attention)
    AttentionMaskInterface.register(ATTN_IMPL, eager_mask)
    _registered = True


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that call the attention kernel (BertSelfAttention, RobertaSelfAttention, ...)."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("SelfAttention")]


def install_lowbit_attention(model: nn.Module, return_scores: bool | None = None) -> None:
    """Switch a transformers model to the "lowbit_eager" attention kernel (numerically the eager
    kernel) and optionally make ``output_attentions`` return pre-softmax scores."""
    _register()
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPL:
        model.set_attn_implementation(ATTN_IMPL)
    if return_scores is not None:
        for _, m in attention_modules(model):
            m.lowbit_return_scores = bool(return_scores)
