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
from lowbit.quant import weights as _quant  # the quant extension (_laq) and its switch

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


CHUNK = 1 << 17  # elements per chunk on CPU: a few 512 KiB buffers (L2/L3-resident); fewer Python calls


def _chunk(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else 1 << 62


def _all_finite(g: torch.Tensor) -> bool:
    """True when ``g`` holds no NaN/Inf: min and max are finite (NaN propagates through both), one
    cheap pass instead of materialising an ``isfinite`` mask."""
    if g.numel() == 0 or not g.is_floating_point():
        return True
    lo, hi = torch.aminmax(g)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _stats(gf: torch.Tensor) -> tuple[float, float, float]:
    """(min, max, population std) of a float32 tensor in one read of it.

    Per chunk: aminmax, the sum and the sum of squared deviations from the chunk mean (two passes
    over a cache-resident chunk); chunks are merged with Chan's parallel formula in float64, so
    the std is as accurate as a two-pass computation with no cancellation."""
    flat = gf.reshape(-1)
    n = flat.numel()
    step = _chunk(flat.device)
    if step >= n:
        lo, hi = torch.aminmax(flat)
        var, mean = torch.var_mean(flat, correction=0)
        return float(lo), float(hi), float(var) ** 0.5
    tmp = torch.empty(min(step, n), dtype=torch.float32, device=flat.device)
    lo, hi, cnt, mean, m2 = float("inf"), float("-inf"), 0, 0.0, 0.0
    for a in range(0, n, step):
        c = flat[a:a + step]
        m = c.numel()
        clo, chi = torch.aminmax(c)
        lo, hi = min(lo, float(clo)), max(hi, float(chi))
        cmean = float(c.sum()) / m
        t = torch.sub(c, cmean, out=tmp[:m])
        cm2 = float(torch.dot(t, t))
        delta = cmean - mean
        tot = cnt + m
        mean += delta * m / tot
        m2 += cm2 + delta * delta * cnt * m / tot
        cnt = tot
    return lo, hi, (m2 / n) ** 0.5


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
    sigma = _stats(gf)[2]
    if not sigma > 0:
        return g
    bound = _f32(c * sigma)
    return gf.clamp(-bound, bound).to(g.dtype)


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (the bound every float32 op actually uses)."""
    return float(torch.tensor(x, dtype=torch.float32))


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased stochastic rounding: floor(x + U), U ~ U[0, 1), so E[result] = x (float32 result).

    Rounds up with probability x − floor(x). Pass a seeded ``torch.Generator`` on ``x.device`` for
    reproducible draws.
    """
    xf = x.to(torch.float32)
    u = torch.rand(xf.shape, generator=generator, device=xf.device, dtype=torch.float32)
    return torch.floor(xf + u)


def _clip_scale(g: torch.Tensor, clip: float | None) -> tuple[torch.Tensor, float]:
    """(float32 view of g, s) where s = max|clip_sigma(g, clip)| (1.0 when that is 0). Raises
    NonFiniteGradientError on NaN/Inf. One read of g (min, max and σ together)."""
    if clip is not None and not (isinstance(clip, float) and math.isinf(clip)) and g.dtype != torch.float32:
        g = clip_sigma(g, clip)  # keeps the half-precision rounding of the clipped values
        clip = None
    gf = g.to(torch.float32)
    if gf.numel() == 0:
        return gf, 1.0
    if clip is None or (isinstance(clip, float) and math.isinf(clip)) or gf.numel() < 2:
        lo, hi = torch.aminmax(gf)
        lo, hi, sigma = float(lo), float(hi), 0.0
    else:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or math.isnan(clip) or clip <= 0:
            raise ConfigError(f"clip factor c must be > 0, got {clip!r}")
        lo, hi, sigma = _stats(gf)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        _require_finite(gf)
    s = max(-lo, hi)
    if sigma > 0:
        s = min(s, _f32(clip * sigma))  # max|clamp(g, ±cσ)| = min(max|g|, cσ), exactly
    return gf, (s if s > 0 else 1.0)


_M32 = 0xFFFFFFFF


def _seed_words(generator: torch.Generator | None) -> tuple[int, int]:
    """The counter generator's seed (two 32-bit words): one draw from ``generator`` (torch's default
    CPU generator when None), so a seeded torch.Generator makes every draw reproducible."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return seed & _M32, (seed >> 32) & _M32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2^32 for int64 ``x`` in [0, 2^32) and a 32-bit constant, without int64 overflow:
    c in 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _counter_u24(start: int, m: int, s0: int, s1: int) -> torch.Tensor:
    """The 24 random bits of elements start .. start + m of a tensor under seed (s0, s1), as int64:
    the torch-ops twin of lowbit/quant/_laq.c's U24 (a Weyl step on the index's halves, murmur3's
    32-bit finalizer, a second xor-multiply-shift round keyed by s1, the top 24 bits), bit for bit."""
    idx = torch.arange(start, start + m, dtype=torch.int64)
    x = (_mul32(idx & _M32, 0x9E3779B9) + s0) & _M32
    x = x ^ _mul32(idx >> 32, 0x632BE5AB)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    x = x ^ (x >> 16)
    x = _mul32(x ^ s1, 0x27D4EB2D)
    x = x ^ (x >> 15)
    return x >> 8


COUNTER_RNG_MIN = 1 << 15  # below this many elements torch.rand (one call) is the cheaper draw


def stochastic_code_chunks(gf: torch.Tensor, k: int, s: float, generator: torch.Generator | None = None):
    """Yield (start, codes) for consecutive chunks of the flattened float32 ``gf``:

        codes = floor(clamp(gf·k/s + U, −k, k)) + k,   U ~ U[0, 1)  (uint8, in [0, 2k])

    i.e. unbiased stochastic rounding of clamp(gf·k/s, −k, k) shifted to codes (clamping after adding
    U gives the same floor as clamping before). On CPU the work runs over L2-sized chunks (the
    yielded buffer is reused: consume it before the next step); on other devices one chunk.
    Chunk starts are multiples of 8.

    Large CPU tensors (``COUNTER_RNG_MIN`` elements and more) draw U as 24 random bits (the
    resolution of torch.rand's float32) from a counter-based generator: element i's bits are a hash
    of (i, seed), the seed one draw from ``generator``, so no state is kept and a chunk's draws do
    not depend on the chunking. In units of 2^-24 levels, in fp32: t = g·(k/s·2^24) + U·2^24, the
    clamp to ±k·2^24, ·2^-24, + k, truncation. The compiled loop (``lowbit.quant._laq.stochastic``,
    one pass; the switch of :func:`lowbit.quant.weights.set_native_laq`) and the torch ops give the
    same codes. The rest (small tensors, other devices) use torch.rand.
    """
    flat = gf.reshape(-1)
    n = flat.numel()
    alpha = k / s
    if not math.isfinite(_f32(alpha * (1 << 24))):
        # a scale near fp32's smallest (a gradient of ~1e-31 and below): values and scale times 2^64,
        # which is exact, so the fp32 factors stay finite and the codes are the intended ones
        flat, alpha = flat * 2.0**64, k / (s * 2.0**64)
    if flat.device.type != "cpu" or n < COUNTER_RNG_MIN:
        u = torch.rand(n, generator=generator, device=flat.device, dtype=torch.float32)
        u.add_(flat, alpha=alpha).clamp_(-k, k).add_(k)
        yield 0, u.to(torch.int32).to(torch.uint8)
        return
    s0, s1 = _seed_words(generator)
    one = float(1 << 24)
    c = _f32(alpha * one)
    step = CHUNK
    c8 = torch.empty(step, dtype=torch.uint8)
    lib = _quant._laq if _quant._native_ok(flat) else None
    if lib is not None:
        for a in range(0, n, step):
            m = min(step, n - a)
            lib.stochastic(flat.data_ptr() + 4 * a, m, a, s0, s1, c, k, c8.data_ptr())
            yield a, c8[:m]
        return
    t = torch.empty(step, dtype=torch.float32)
    i32 = torch.empty(step, dtype=torch.int32)
    for a in range(0, n, step):
        m = min(step, n - a)
        tc, ic, cc = t[:m], i32[:m], c8[:m]
        torch.mul(flat[a:a + m], c, out=tc)
        tc.add_(_counter_u24(a, m, s0, s1).to(torch.float32))
        tc.clamp_(-k * one, k * one).mul_(1.0 / one).add_(k)
        ic.copy_(tc)  # truncation = floor: the value is >= 0
        cc.copy_(ic)
        yield a, cc


def quantize_grad_stochastic(g: torch.Tensor, bits: int, clip: float | None = 3.0,
                             generator: torch.Generator | None = None) -> QTensor:
    """LAQ clipped stochastic m-bit gradient quantization (m = ``bits`` in 2..8), k = 2^(m−1) − 1:

        gc = clip_sigma(g, clip)            (``clip=None`` or ``math.inf``: no clipping)
        s  = max|gc|                        (s = 0: scale 1.0, every code = k, i.e. zero)
        level = stochastic_round(gc/s · k) ∈ [−k, k],  codes = level + k,  grid "sym", scale s

    E[dequantize] = gc (unbiased given the clip). Raises :class:`NonFiniteGradientError` on NaN/Inf
    (screen with :func:`check_finite` first to choose another policy).

    Fused implementation: one read of g for (min, max, σ) — s = min(max|g|, cσ) needs no clipped
    copy — and one more for the rounding (see :func:`stochastic_code_chunks`).
    """
    _check_grad_bits(bits)
    k = grid_k(bits)
    gf, s = _clip_scale(g, clip)
    codes = torch.empty(gf.numel(), dtype=torch.uint8, device=gf.device)
    if gf.numel():
        for a, c in stochastic_code_chunks(gf, k, s, generator):
            codes[a:a + c.numel()].copy_(c)
    scale = torch.tensor(s, dtype=torch.float32, device=gf.device)
    return QTensor(codes=codes.reshape(g.shape), scale=scale, bits=bits, grid="sym")


def check_finite(g: torch.Tensor, name: str = "gradient", policy: str = "error") -> torch.Tensor | None:
    """Screen ``g`` for NaN/Inf. If it has any: ``"error"`` raises :class:`NonFiniteGradientError`
    (naming the tensor and counting the bad entries), ``"skip"`` returns None (drop this gradient),
    ``"zero"`` returns zeros like ``g``. A finite ``g`` is returned as is."""
    if policy not in FINITE_POLICIES:
        raise ConfigError(f"non-finite policy must be one of {FINITE_POLICIES}, got {policy!r}")
    if _all_finite(g):
        return g
    finite = torch.isfinite(g)
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
