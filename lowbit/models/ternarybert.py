"""TernaryBERT (Zhang, Hou, Yin, Shang, Chen, Jiang & Liu, "TernaryBERT: Distillation-aware
Ultra-low Bit BERT", EMNLP 2020).

Weights: ternary ŵ = α·b, b ∈ {−1, 0, 1}, for every Transformer nn.Linear (Q, K, V, attention
output, FFN in/out, pooler) and the word embedding:
  - TWN (default):  Δ = 0.7·mean|w|, b = sign(w)·1[|w| > Δ], α = mean_{|w|>Δ}|w|;
  - LAT (``method="lat"``): the loss-aware ternarization min_{α,b} ‖w − αb‖²_D with
    D = diag(√v) + ε from Adam's second moment v of that weight (attach the optimizer with
    :func:`attach_optimizer`); before the first step, or with no optimizer, D = I (the exact
    unweighted ternary projection).
  ``per_row=True`` gives one α per output row (per token vector for the embedding).
Activations: 8-bit asymmetric min-max fake quant of the input of every matmul: every quantized
nn.Linear input and, with ``quantize_attention=True`` (default), the four inputs Q, K, P (softmax
probabilities), V of the two attention matmuls (through the "lowbit_eager" attention kernel).
Bits "W-E-A": ``weight_bits`` (Transformer linears) - ``emb_bits`` (word embedding) - ``act_bits``:
2 → ternary, 3..8 → symmetric max-scaled (the Q8BERT rule), 32 → full precision.
Position / token-type embeddings, LayerNorm, biases and the task classifier stay fp32.

Distillation (TernaryBERT §3.3, after TinyBERT): L = L_logits + L_hidden + L_attention with
soft cross-entropy on logits, MSE on every hidden state (embedding output included) and MSE on
attention scores, the teacher being the full-precision fine-tuned model.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models.layers import QuantEmbedding, QuantLinear, attention_modules, install_lowbit_attention
from lowbit.models.q8bert import SymmetricMaxWeightQuant, _skipped
from lowbit.models.registry import Scheme, register_scheme
from lowbit.quant.acts import MinMaxActQuant
from lowbit.quant.qtensor import QTensor
from lowbit.quant.ternary import ternarize_lat, ternarize_twn

__all__ = ["TernaryWeightQuant", "ternarybert", "attach_optimizer", "distill_losses", "distill_step",
           "BITS_PRESETS"]

#: the W-E-A configurations of the paper's Table 1/2
BITS_PRESETS = {"2-2-8": (2, 2, 8), "2-8-8": (2, 8, 8), "8-8-8": (8, 8, 8)}


class TernaryWeightQuant:
    """Callable ``w -> QTensor`` (2-bit "sym" grid): TWN or LAT, per tensor or per row.

    For LAT, ``optimizer`` (Adam/AdamW) supplies d = √v + ε with v = ``state[w]["exp_avg_sq"]``
    (no bias correction: it multiplies D by a constant, which leaves the argmin unchanged up to ε)."""

    def __init__(self, method: str = "twn", per_row: bool = False, optimizer: torch.optim.Optimizer | None = None,
                 eps: float = 1e-8) -> None:
        if method not in ("twn", "lat"):
            raise ConfigError(f"ternary method must be 'twn' or 'lat', got {method!r}")
        self.method, self.per_row, self.optimizer, self.eps = method, bool(per_row), optimizer, float(eps)
        self.version = 0

    def attach(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer
        self.version += 1

    def _d(self, w: torch.Tensor) -> torch.Tensor | None:
        if self.optimizer is None:
            return None
        st = self.optimizer.state.get(w)
        v = None if not st else st.get("exp_avg_sq")
        if v is None or v.shape != w.shape:
            return None
        return v.detach().to(torch.float32).sqrt() + self.eps

    def __call__(self, w: torch.Tensor) -> QTensor:
        per_row = self.per_row and w.dim() >= 2
        if self.method == "twn":
            return ternarize_twn(w.detach(), per_row=per_row)
        return ternarize_lat(w.detach(), d=self._d(w), per_row=per_row, exact=True)

    def __repr__(self) -> str:
        return f"Ternary(method={self.method}, per_row={self.per_row})"


def _weight_quant(bits: int, method: str, per_row: bool, optimizer):
    if bits == 2:
        return TernaryWeightQuant(method, per_row, optimizer)
    if isinstance(bits, int) and 3 <= bits <= 8:
        return SymmetricMaxWeightQuant(bits, per_row)
    if bits == 32:
        return None
    raise ConfigError(f"TernaryBERT weight/embedding bits must be 2 (ternary), 3..8 (symmetric) or 32 (fp), got {bits!r}")


@register_scheme("ternarybert")
def ternarybert(weight_bits: int = 2, emb_bits: int = 2, act_bits: int = 8, method: str = "twn",
                per_row: bool = False, quantize_attention: bool = True,
                optimizer: torch.optim.Optimizer | None = None,
                skip: tuple[str, ...] | list[str] = ("classifier",), bits: str | None = None) -> Scheme:
    """TernaryBERT scheme. ``bits="2-2-8"`` (or "2-8-8", "8-8-8") overrides weight/emb/act bits."""
    if bits is not None:
        if bits not in BITS_PRESETS:
            raise ConfigError(f"bits preset must be one of {sorted(BITS_PRESETS)}, got {bits!r}")
        weight_bits, emb_bits, act_bits = BITS_PRESETS[bits]
    if method not in ("twn", "lat"):
        raise ConfigError(f"ternary method must be 'twn' or 'lat', got {method!r}")
    if act_bits != 32 and not (isinstance(act_bits, int) and 2 <= act_bits <= 16):
        raise ConfigError(f"activation bits must be 2..16 or 32 (fp), got {act_bits!r}")
    skip = tuple(skip)
    wq = _weight_quant(weight_bits, method, per_row, optimizer)
    eq = _weight_quant(emb_bits, method, per_row, optimizer)
    act_on = act_bits != 32

    def linear(name, mod):
        if _skipped(name, skip) or wq is None and not act_on:
            return None
        return wq, (MinMaxActQuant(act_bits) if act_on else None)

    def embedding(name, mod):
        if eq is None or not name.endswith("word_embeddings") or _skipped(name, skip):
            return None
        return eq, None

    def setup(model: nn.Module) -> None:
        install_lowbit_attention(model)
        if quantize_attention and act_on:
            for _, m in attention_modules(model):
                m.lowbit_matmul_quant = nn.ModuleDict({k: MinMaxActQuant(act_bits) for k in "qkpv"})

    return Scheme("ternarybert", linear, embedding, setup,
                  dict(weight_bits=weight_bits, emb_bits=emb_bits, act_bits=act_bits, method=method,
                       per_row=per_row, quantize_attention=quantize_attention, skip=list(skip),
                       optimizer=optimizer))


def attach_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Give every LAT quantizer of ``model`` the optimizer whose second moments define D."""
    seen = set()
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and isinstance(m.weight_quant, TernaryWeightQuant):
            if id(m.weight_quant) not in seen:
                m.weight_quant.attach(optimizer)
                seen.add(id(m.weight_quant))


# --------------------------------------------------------------------------- distillation


def _get(out, key: str):
    return out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Soft CE −Σ p_t log p_s minus the teacher entropy −Σ p_t log p_t (= KL(p_t ‖ p_s)), p = softmax(z/T),
    averaged over the batch. Subtracting the entropy (a constant of the teacher) leaves the gradient
    of TernaryBERT's soft CE unchanged and makes the loss 0 when the logits agree."""
    log_ps = F.log_softmax(student_logits.float() / T, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / T, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


def distill_losses(student_out, teacher_out, T: float = 1.0) -> dict[str, torch.Tensor]:
    """TernaryBERT's three distillation terms between two model outputs (HF ModelOutput or dict):

    - ``logits``: :func:`soft_cross_entropy` at temperature T;
    - ``hidden``: Σ_l MSE(H_s^l, H_t^l) over all hidden states, l = 0 being the embedding output;
    - ``attention``: Σ_l MSE(A_s^l, A_t^l) over ``attentions`` (pre-softmax scores with masked
      positions zeroed when the models use the lowbit attention kernel with scores on, as
      :func:`distill_step` arranges; otherwise the probabilities).

    Terms whose outputs are missing (no ``output_hidden_states`` / ``output_attentions``) are 0.
    """
    zero = _get(student_out, "logits").new_zeros(())
    out = {"logits": soft_cross_entropy(_get(student_out, "logits"), _get(teacher_out, "logits"), T)}
    for key, field in (("hidden", "hidden_states"), ("attention", "attentions")):
        s, t = _get(student_out, field), _get(teacher_out, field)
        if s is None or t is None:
            out[key] = zero
            continue
        if len(s) != len(t):
            raise ConfigError(f"student has {len(s)} {field}, teacher {len(t)}: layer counts must match")
        out[key] = sum((F.mse_loss(a.float(), b.detach().float()) for a, b in zip(s, t)), zero)
    return out


DEFAULT_WEIGHTS = {"logits": 1.0, "hidden": 1.0, "attention": 1.0, "label": 0.0}


def distill_step(student: nn.Module, teacher: nn.Module, batch: Mapping[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer, weights: Mapping[str, float] | None = None,
                 T: float = 1.0, max_grad_norm: float | None = 1.0, scheduler=None) -> dict[str, float]:
    """One distillation-aware training step: teacher forward (no grad, eval), student forward at the
    quantized weights, L = Σ_k weights[k]·L_k (k ∈ logits, hidden, attention, and ``label`` = hard CE on
    ``batch["labels"]``), backward through the STE to the latent weights, optimizer step.
    Returns the float value of each term and of the total."""
    w = dict(DEFAULT_WEIGHTS)
    if weights:
        unknown = set(weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ConfigError(f"unknown distillation weight(s) {sorted(unknown)}; expected {sorted(DEFAULT_WEIGHTS)}")
        w.update(weights)
    for model in (student, teacher):
        if hasattr(model, "set_attn_implementation"):
            install_lowbit_attention(model, return_scores=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    need_h, need_a = w["hidden"] != 0, w["attention"] != 0
    teacher.eval()
    with torch.no_grad():
        t_out = teacher(**inputs, output_hidden_states=need_h, output_attentions=need_a)
    student.train()
    s_out = student(**inputs, output_hidden_states=need_h, output_attentions=need_a)
    terms = distill_losses(s_out, t_out, T)
    if w["label"] != 0:
        if "labels" not in batch:
            raise ConfigError("distillation weight 'label' is non-zero but the batch has no 'labels'")
        terms["label"] = F.cross_entropy(s_out.logits, batch["labels"])
    loss = sum(w[k] * v for k, v in terms.items() if w.get(k, 0) != 0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    res = {k: float(v.detach()) for k, v in terms.items()}
    res["loss"] = float(loss.detach())
    return res
