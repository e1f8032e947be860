"""Gradient quantizers: LAQ's clipped stochastic m-bit scheme and the usual baselines.

Main scheme (Hou, Zhang & Kwok ICLR 2019, "Analysis of quantized models", gradient quantization):
clip at c·σ, then stochastic m-bit rounding on the symmetric grid; unbiased given the clip.

Baselines: fp16/bf16 cast, EF-signSGD (Karimireddy et al. ICML 2019), QSGD (Alistarh et al. NeurIPS
2017), TernGrad (Wen et al. NeurIPS 2017), and an :class:`ErrorFeedback` state any codec can use.

Everything works on CPU/CUDA tensors of float32/float16/bfloat16, computes in float32 and returns
float32 scales. Random draws use ``torch.rand(..., generator=generator)``; the generator must live
on the tensor's device (``torch.Generator(device=g.device)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lowbit.errors import ConfigError, NonFiniteGradientError
from lowbit.quant.qtensor import QTensor, grid_k

__all__ = [
    "clip_sigma",
    "stochastic_round",
    "quantize_grad_stochastic",
    "check_finite",
    "cast_half",
    "sign_ef",
    "qsgd",
    "terngrad",
    "ErrorFeedback",
    "FINITE_POLICIES",
    "QSGD_LEVELS",
]

FINITE_POLICIES = ("error", "skip", "zero")
QSGD_LEVELS = tuple(grid_k(m) for m in range(2, 9))  # (1, 3, 7, 15, 31, 63, 127)


def _check_grad_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"gradient bits must be in 2..8, got {bits!r}")


def _require_finite(g: torch.Tensor, name: str = "gradient") -> None:
    if not bool(torch.isfinite(g).all()):
        bad = int((~torch.isfinite(g)).sum())
        raise NonFiniteGradientError(f"{name} holds {bad} NaN/Inf entries out of {g.numel()}")


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax() if x.numel() else torch.zeros((), device=x.device)


def clip_sigma(g: torch.Tensor, c: float = 3.0) -> torch.Tensor:
    """Clip at c standard deviations (LAQ gradient clipping): gc = clamp(g, −cσ, cσ), σ = std(g) (population,
    over the whole tensor, computed in float32). Returns ``g``'s dtype.

    ``c = math.inf`` disables clipping. A constant tensor (σ = 0) is returned unchanged rather than
    clipped to zero, which would destroy its whole signal.
    """
    if isinstance(c, bool) or not isinstance(c, (int, float)) or math.isnan(c) or c <= 0:
        raise ConfigError(f"clip factor c must be > 0, got {c!r}")
    if math.isinf(c) or g.numel() < 2:
        return g
    gf = g.to(torch.float32)
    sigma = gf.std(unbiased=False)
    bound = torch.where(sigma > 0, c * sigma, torch.full_like(sigma, math.inf))
    return torch.maximum(torch.minimum(gf, bound), -bound).to(g.dtype)


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased stochastic rounding: floor(x + U), U ~ U[0, 1), so E[result] = x (float32 result).

    Rounds up with probability x − floor(x). Pass a seeded ``torch.Generator`` on ``x.device`` for
    reproducible draws.
    """
    xf = x.to(torch.float32)
    u = torch.rand(xf.shape, generator=generator, device=xf.device, dtype=torch.float32)
    return torch.floor(xf + u)


def quantize_grad_stochastic(g: torch.Tensor, bits: int, clip: float | None = 3.0,
                             generator: torch.Generator | None = None) -> QTensor:
    """LAQ clipped stochastic m-bit gradient quantization (m = ``bits`` in 2..8), k = 2^(m−1) − 1:

        gc = clip_sigma(g, clip)            (``clip=None`` or ``math.inf``: no clipping)
        s  = max|gc|                        (s = 0: scale 1.0, every code = k, i.e. zero)
        level = stochastic_round(gc/s · k) ∈ [−k, k],  codes = level + k,  grid "sym", scale s

    E[dequantize] = gc (unbiased given the clip). Raises :class:`NonFiniteGradientError` on NaN/Inf
    (screen with :func:`check_finite` first to choose another policy).
    """
    _check_grad_bits(bits)
    _require_finite(g)
    k = grid_k(bits)
    gc = g if clip is None or (isinstance(clip, float) and math.isinf(clip)) else clip_sigma(g, clip)
    gc = gc.to(torch.float32)
    s = _max_abs(gc)
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    level = torch.clamp(stochastic_round(gc / s_safe * k, generator), -k, k)
    codes = (level + k).to(torch.uint8)
    return QTensor(codes=codes, scale=s_safe.to(torch.float32), bits=bits, grid="sym")


def check_finite(g: torch.Tensor, name: str = "gradient", policy: str = "error") -> torch.Tensor | None:
    """Screen ``g`` for NaN/Inf. If it has any: ``"error"`` raises :class:`NonFiniteGradientError`
    (naming the tensor and counting the bad entries), ``"skip"`` returns None (drop this gradient),
    ``"zero"`` returns zeros like ``g``. A finite ``g`` is returned as is."""
    if policy not in FINITE_POLICIES:
        raise ConfigError(f"non-finite policy must be one of {FINITE_POLICIES}, got {policy!r}")
    finite = torch.isfinite(g)
    if bool(finite.all()):
        return g
    if policy == "error":
        bad = int((~finite).sum())
        raise NonFiniteGradientError(f"{name} holds {bad} NaN/Inf entries out of {g.numel()}")
    if policy == "skip":
        return None
    return torch.zeros_like(g)


# --------------------------------------------------------------------------- baselines


def cast_half(g: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """fp16 / bf16 gradient baseline: cast to ``dtype``, saturating values beyond its range to ±max
    (±65504 for fp16) instead of ±inf. NaN stays NaN. Returns a tensor of ``dtype``."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(f"cast_half dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    hi = torch.finfo(dtype).max
    return g.to(torch.float32).clamp(-hi, hi).to(dtype)


def sign_ef(g: torch.Tensor, residual: torch.Tensor | None) -> tuple[QTensor, torch.Tensor]:
    """EF-signSGD (Karimireddy et al. ICML 2019, "Error feedback fixes SignSGD"):

        p = g + e,   q = sign(p)·‖p‖₁/n  (grid "bin", sign(0) = +1),   e' = p − q

    ``residual`` None means e = 0. Returns (q as a QTensor, e' float32); p = dequant(q) + e' exactly
    up to float32 rounding.
    """
    p = g.to(torch.float32)
    if residual is not None:
        if residual.shape != g.shape:
            raise ConfigError(f"EF residual shape {tuple(residual.shape)} does not match gradient {tuple(g.shape)}")
        p = p + residual.to(device=p.device, dtype=torch.float32)
    scale = p.abs().sum() / max(p.numel(), 1)
    q = QTensor(codes=(p >= 0).to(torch.uint8), scale=scale.to(torch.float32), bits=1, grid="bin")
    return q, p - q.dequantize()


def qsgd(g: torch.Tensor, levels: int = 7, generator: torch.Generator | None = None) -> QTensor:
    """QSGD (Alistarh et al. NeurIPS 2017) with s = ``levels``:

        scale = ‖g‖₂,  level_i = sign(g_i)·stochastic_round(|g_i|/‖g‖₂ · s) ∈ [−s, s]

    stored on grid "sym" with k = s, so s must be 2^(m−1) − 1 for some m in 2..8 (1, 3, 7, 15, 31,
    63, 127) and bits = m; then the table is exact. Unbiased: E[dequantize] = g. A zero gradient gets
    scale 1.0 and zero codes.
    """
    if isinstance(levels, bool) or levels not in QSGD_LEVELS:
        raise ConfigError(f"QSGD levels must be one of {QSGD_LEVELS} (2^(m-1)-1), got {levels!r}")
    bits = QSGD_LEVELS.index(levels) + 2
    _require_finite(g)
    gf = g.to(torch.float32)
    norm = torch.linalg.vector_norm(gf)
    n_safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    mag = torch.clamp(stochastic_round(gf.abs() / n_safe * levels, generator), 0, levels)
    level = torch.where(gf < 0, -mag, mag)
    return QTensor(codes=(level + levels).to(torch.uint8), scale=n_safe.to(torch.float32), bits=bits, grid="sym")


def terngrad(g: torch.Tensor, generator: torch.Generator | None = None) -> QTensor:
    """TernGrad (Wen et al. NeurIPS 2017): scale = max|g|, b_i = sign(g_i)·Bernoulli(|g_i|/max|g|).

    Grid "sym", bits 2; unbiased: E[dequantize] = g. (TernGrad's optional 2.5σ clipping is
    :func:`clip_sigma` applied first.) A zero gradient gets scale 1.0 and zero codes.
    """
    _require_finite(g)
    gf = g.to(torch.float32)
    s = _max_abs(gf)
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    u = torch.rand(gf.shape, generator=generator, device=gf.device, dtype=torch.float32)
    keep = u < gf.abs() / s_safe
    level = torch.where(keep, torch.where(gf < 0, -1.0, 1.0), 0.0)
    return QTensor(codes=(level + 1).to(torch.uint8), scale=s_safe.to(torch.float32), bits=2, grid="sym")


@dataclass
class ErrorFeedback:
    """Error-feedback state shared by any codec (Seide et al. 2014; Karimireddy et al. 2019).

    Per named tensor, keeps e = (g + e) − decode(encode(g + e)):

        gc = ef.compensate(name, g)        # g + e (e = 0 the first time)
        q  = codec.encode(gc); ĝ = decode(q)
        ef.update(name, gc, ĝ)             # e ← gc − ĝ
    """

    residuals: dict[str, torch.Tensor] = field(default_factory=dict)

    def compensate(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """g + e_name (float32); g itself (as float32) when no residual is stored yet."""
        gf = g.to(torch.float32)
        e = self.residuals.get(name)
        if e is None:
            return gf
        if e.shape != g.shape:
            raise ConfigError(f"error-feedback residual for {name!r} has shape {tuple(e.shape)}, gradient {tuple(g.shape)}")
        return gf + e.to(gf.device)

    def update(self, name: str, g_compensated: torch.Tensor, g_decoded: torch.Tensor) -> torch.Tensor:
        """Store and return e_name = g_compensated − g_decoded (float32)."""
        if g_compensated.shape != g_decoded.shape:
            raise ConfigError(
                f"error-feedback shapes differ for {name!r}: {tuple(g_compensated.shape)} vs {tuple(g_decoded.shape)}"
            )
        e = g_compensated.to(torch.float32) - g_decoded.to(device=g_compensated.device, dtype=torch.float32)
        self.residuals[name] = e
        return e

    def reset(self) -> None:
        self.residuals.clear()
