"""Weight quantizers: binary, TWN, LAT (loss-aware ternary), LAQ (loss-aware m-bit linear / log).

Every quantizer here solves (exactly or approximately) a *D-weighted* projection

    ŵ = α·b = argmin_{α>0, b∈Q^n}  Σ_i d_i (w_i − α b_i)²  =  ‖w − α b‖²_D

where Q is the grid (see :mod:`lowbit.quant.qtensor`) and ``d`` is the diagonal of
D = diag(√v̂) + ε built from Adam's second moment (Hou, Yao & Kwok ICLR 2017 "Loss-aware
binarization"; Hou & Kwok ICLR 2018 "Loss-aware weight quantization" (LAT); Hou, Zhang & Kwok
ICLR 2019 "Analysis of quantized models" (LAQ)). ``d=None`` means D = I, the plain projection.

All functions accept float32/float16/bfloat16 tensors on any device, compute in float32 and return
a :class:`QTensor` whose ``codes`` have ``w``'s shape and whose ``scale`` is float32, shape ``()`` or
``(w.shape[0],)`` with ``per_row=True`` (one α per row; a row is ``w[i]`` flattened, so ``per_row``
needs ``w.dim() >= 2``).

Scales: for the sym/log grids an all-zero tensor (or row) gets scale 1.0 and the zero code, so the
scale is always finite and > 0 and dequantizes to exact zeros. The binary grid has no zero, so
:func:`binarize` keeps α = mean|w| = 0 for an all-zero row (finite, ≥ 0, exact zeros back).
"""
from __future__ import annotations

import math
import os

import torch

from lowbit.errors import ConfigError
from lowbit.quant._base import _check_inputs, _d_rows, _finish, _rows, _wsum
from lowbit.quant.qtensor import QTensor, grid_k
from lowbit.quant.ternary import binarize, ternarize_lat, ternarize_twn

try:  # LAQ's linear-grid round and grads.py's stochastic codes, one pass each (lowbit/quant/_laq.c), built by setup.py where it can be
    from lowbit.quant import _laq
except ImportError:
    _laq = None
_native_on = _laq is not None and os.environ.get("LOWBIT_NATIVE_LAQ", "1").strip() != "0"

__all__ = [
    "binarize",
    "ternarize_twn",
    "ternarize_lat",
    "laq_project",
    "weight_objective",
    "quantize_weight",
    "WEIGHT_SCHEMES",
    "native_laq_available",
    "set_native_laq",
]

WEIGHT_SCHEMES = ("binary", "twn", "lat", "lat2", "laq-linear", "laq-log")

# --------------------------------------------------------------------------- LAQ m-bit


def _log_tables(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitudes [0, 2^-(k-1), …, 1/2, 1] (ascending) and the k midpoints between neighbours."""
    mags = torch.cat([torch.zeros(1), torch.tensor([2.0 ** -(k - 1 - j) for j in range(k)])]).to(device)
    mids = (mags[1:] + mags[:-1]) / 2
    return mags, mids


def _project(w2: torch.Tensor, alpha: torch.Tensor, k: int, grid: str,
             tables: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid point Π_Q(w/α) per element. Returns (b float32 in units of α, codes int)."""
    u = w2 / alpha.unsqueeze(1)
    if grid == "sym":
        q = torch.round(torch.clamp(u * k, -k, k))
        return q / k, (q + k)
    mags, mids = tables  # type: ignore[misc]
    idx = torch.bucketize(u.abs().contiguous(), mids)  # 0 -> magnitude 0, j -> 2^-(k-j)
    neg = u < 0
    b = torch.where(neg, -mags[idx], mags[idx])
    code_pos = k - idx + 1
    codes = torch.where(idx == 0, torch.zeros_like(idx), torch.where(neg, code_pos + k, code_pos))
    return b, codes


CHUNK = 1 << 17  # elements per chunk on CPU
SECANT_MAX_K = 7  # secant steps up to 4 bits (k = 7); see _laq_alternate


def native_laq_available() -> bool:
    """Whether ``lowbit.quant._laq`` was built (it is optional: the torch ops give the same codes)."""
    return _laq is not None


def switch_extension(space: dict, flag: str, lib: str, on: bool, what: str) -> bool:
    """Set a module's switch ``space[flag]`` (``space``: its globals) to run the compiled extension
    ``space[lib]`` (``True``) or the torch ops (``False``); returns the previous setting. ``True``
    where the extension (``what``) was not built is a :class:`ConfigError`."""
    if on and space[lib] is None:
        raise ConfigError(f"{what} was not built (no C compiler when lowbit was installed?): "
                          "reinstall with one, or keep the torch ops")
    was, space[flag] = space[flag], bool(on)
    return was


def set_native_laq(on: bool) -> bool:
    """Run the quant extension's loops (LAQ's linear-grid round here, the stochastic gradient codes of
    :func:`lowbit.quant.grads.stochastic_code_chunks`) compiled (``True``) or as torch ops
    (``False``); returns the previous setting. ``LOWBIT_NATIVE_LAQ=0`` turns it off for a process."""
    return switch_extension(globals(), "_native_on", "_laq", on, "lowbit.quant._laq")


def _native_ok(*ts: torch.Tensor | None) -> bool:
    return _native_on and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32
                                            and t.is_contiguous()) for t in ts)


def _laq_alternate_fused(w2: torch.Tensor, d2: torch.Tensor | None, alpha: torch.Tensor, k: int,
                         iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_laq_alternate` for one row on the linear grid, without full-size temporaries: a round
    is q = round(clamp(w·k/α, −k, k)) reduced at once into Σ d w q / k and Σ d q² / k²; the codes
    q + k are materialised once, for the α the best round projected with. A round is one pass of
    the compiled loop (``lowbit.quant._laq``: fp32 CPU tensors, sums in double) or torch ops per
    cache-sized chunk (fp32 dot products summed in double across chunks); q, and so the codes for
    a given α, are the same bits either way."""
    w = w2.reshape(-1)
    d = None if d2 is None else d2.reshape(-1)
    n = w.numel()
    if _native_ok(w, d):
        def round_(s: float) -> tuple[float, float]:
            return _laq.round(w.data_ptr(), 0 if d is None else d.data_ptr(), n, s, k)

        def codes_(s: float, out: torch.Tensor) -> None:
            _laq.codes(w.data_ptr(), n, s, k, out.data_ptr())
    else:
        step = CHUNK if w.device.type == "cpu" else n
        tmp = torch.empty(min(step, n), dtype=torch.float32, device=w.device)
        tmp2 = torch.empty_like(tmp) if d is not None else None

        def round_(s: float) -> tuple[float, float]:
            num = den = 0.0
            for i in range(0, n, step):
                wc = w[i:i + step]
                q = torch.mul(wc, s, out=tmp[:wc.numel()]).clamp_(-k, k).round_()
                dq = q if d is None else torch.mul(d[i:i + step], q, out=tmp2[:wc.numel()])
                num += float(torch.dot(wc, dq))
                den += float(torch.dot(dq, q))
            return num, den

        def codes_(s: float, out: torch.Tensor) -> None:
            for i in range(0, n, step):
                wc = w[i:i + step]
                out[i:i + wc.numel()].copy_(torch.mul(wc, s, out=tmp[:wc.numel()]).clamp_(-k, k).round_().add_(k))

    a = float(alpha.reshape(()))
    secant = k <= SECANT_MAX_K
    best = None  # (score, α projected with, α from those codes) of the best round so far
    before = None  # (α, f(α) − α) of the round before, for the secant step
    for _ in range(iters):
        num, den = round_(k / a)
        num, den = num / k, den / (k * k)
        ok = den > 0 and num > 0
        new = float(torch.tensor(num / den if ok else a, dtype=torch.float32))
        score = num * num / den if ok else -math.inf
        if best is None or score > best[0] or not secant:  # plain: the last round
            best = (score, a, new)
        g = new - a
        if abs(g) <= 1e-6 * a:
            break
        nxt = new
        if secant and before is not None and g != before[1]:
            sec = a - g * (a - before[0]) / (g - before[1])
            if 0.5 * a < sec < 2 * a:
                nxt = float(torch.tensor(sec, dtype=torch.float32))
        before, a = (a, g), nxt
    _, used, a = best
    codes = torch.empty(n, dtype=torch.uint8, device=w.device)
    codes_(k / used, codes)
    return torch.tensor([a], dtype=torch.float32, device=w.device), codes.reshape(1, -1)


def _laq_alternate(w2: torch.Tensor, d2: torch.Tensor | None, alpha: torch.Tensor, k: int, grid: str,
                   iters: int, tables) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``iters`` rounds of b ← Π_Q(w/α), α ← f(α) = Σ d w b / Σ d b², per row; returns codes
    b = Π_Q(w/α_t) and α = f(α_t), the exact minimiser for those codes, of the best round (with
    secant steps; the objective of a round is Σ d w² − (Σ d w b)² / Σ d b², so rounds are compared
    without another pass and the result is never worse than the first round's plain projection) or
    of the last (plain alternation, whose objective never increases).

    The plain alternation is a fixed-point iteration α ← f(α) that crawls at 3 bits and more (from
    max|w|, ten rounds can leave the objective well above the optimum); from the second round on the
    next α is the secant step on f(α) − α = 0 through the last two rounds (kept where it lands within
    [α/2, 2α], else f(α)), which reaches the optimum within the usual round budget. Up to 4 bits
    (k ≤ SECANT_MAX_K) only: at 8 bits the objective is rugged in α (a kink wherever a code moves),
    so where the secant steps end depends on the sums' last bits and would differ between the
    compiled and the torch path; 8 bits keeps the plain alternation, whose result does not. Stops
    early once no row's α moves by more than 1e-6 relatively.
    """
    if grid == "sym" and w2.shape[0] == 1:
        return _laq_alternate_fused(w2, d2, alpha, k, iters)
    secant = k <= SECANT_MAX_K
    best = None  # (score, α from the codes, codes) per row
    before = None
    for _ in range(iters):
        b, codes = _project(w2, alpha, k, grid, tables)
        num = _wsum(w2 * b, d2).double()
        den = _wsum(b * b, d2).double()
        ok = (den > 0) & (num > 0)
        new = torch.where(ok, num / den.clamp_min(1e-300), alpha.double()).to(torch.float32)
        score = torch.where(ok, num * num / den.clamp_min(1e-300), torch.full_like(num, -math.inf))
        if best is None or not secant:  # plain alternation: the last round
            best = (score, new, codes)
        else:
            better = score > best[0]
            best = (torch.where(better, score, best[0]), torch.where(better, new, best[1]),
                    torch.where(better.unsqueeze(1), codes, best[2]))
        g = new - alpha
        if bool((g.abs() <= 1e-6 * alpha).all()):
            break
        nxt = new
        if secant and before is not None:
            dg = g - before[1]
            sec = alpha - g * (alpha - before[0]) / torch.where(dg != 0, dg, torch.ones_like(dg))
            nxt = torch.where((dg != 0) & (sec > 0.5 * alpha) & (sec < 2 * alpha), sec, new)
        before, alpha = (alpha, g), nxt
    return best[1], best[2]


def laq_project(w: torch.Tensor, d: torch.Tensor | None = None, bits: int = 2, scheme: str = "linear",
                per_row: bool = False, iters: int = 10, alpha: torch.Tensor | float | None = None,
                hold: float = 0.0) -> QTensor:
    """LAQ m-bit loss-aware weight quantization (Hou, Zhang & Kwok ICLR 2019, "Analysis of quantized models").

    Approximately solves min_{α>0, b∈Q^n} Σ d (w − α b)² by alternating minimisation:

        b ← Π_Q(w/α)                  (nearest grid point; for "log" nearest in the linear sense)
        α ← Σ d w b / Σ d b²          (w b ≥ 0 after the projection, so α stays > 0)

    with k = 2^(bits−1) − 1 and
      - ``scheme="linear"``: Q = {−1, …, −1/k, 0, 1/k, …, 1}            (grid "sym"; bits=2 is ternary)
      - ``scheme="log"``:    Q = {0, ±1, ±1/2, …, ±1/2^(k−1)}            (grid "log")

    Initialisation: ``alpha`` if given (a float, or a tensor of shape () / (rows,), e.g. last step's
    scale as LAQ warm-starts it), then one phase of at most ``iters`` rounds. Otherwise two phases:
    the unweighted (D = I) iteration from α₀ = max|w| (per row), then the D-weighted iteration
    warm-started from its α (each phase at most ``iters`` rounds, stopping early once α stops
    changing). Because every half-step is an exact minimisation under D (the nearest grid point does
    not depend on d), the result's D-objective is never worse than the plain projection's; running
    both phases also when ``d`` is None makes d=None and d=ones give identical results. All-zero
    rows get scale 1.0 and zero codes.

    ``hold`` (with ``alpha``): a row whose new α is within ``hold``·α of the warm start keeps the
    warm start, with the codes Π_Q(w/α) at it. A step moves the optimum α a little, and on a fine
    grid every small move of α shifts codes across the whole tensor; held, the codes change only
    where the weights crossed a grid boundary (far fewer bytes down with delta-coded weights), at a
    D-objective within O(hold²) of the re-solved one.
    """
    if scheme not in ("linear", "log"):
        raise ConfigError(f"LAQ scheme must be 'linear' or 'log', got {scheme!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"LAQ weight bits must be an integer in 2..8, got {bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"LAQ iters must be an integer >= 1, got {iters!r}")
    lo, hi = _check_inputs(w, d, per_row)
    grid = "sym" if scheme == "linear" else "log"
    k = grid_k(bits)
    w2 = _rows(w, per_row)
    d2 = _d_rows(d, w2, per_row)
    tables = _log_tables(k, w2.device) if grid == "log" else None
    if w2.shape[0] > 1:  # max |w| per row, one pass and no |w| temporary (the same values as abs().amax(1))
        lo, hi = torch.aminmax(w2, dim=1)
    rmax = torch.maximum(-lo, hi).to(torch.float32).reshape(-1)
    nonzero = rmax > 0
    if alpha is None:
        a0 = torch.where(nonzero, rmax, torch.ones_like(rmax))
        a0, _ = _laq_alternate(w2, None, a0, k, grid, iters, tables)
    else:
        a0 = torch.as_tensor(alpha, dtype=torch.float32, device=w2.device).reshape(-1)
        if a0.numel() == 1:
            a0 = a0.expand(w2.shape[0]).clone()
        if a0.numel() != w2.shape[0] or not bool(torch.isfinite(a0).all()) or not bool((a0 > 0).all()):
            raise ConfigError(f"initial alpha must be finite, > 0 and have 1 or {w2.shape[0]} entries, got {alpha!r}")
        a0 = torch.where(nonzero, a0, torch.ones_like(a0))
    a, codes = _laq_alternate(w2, d2, a0, k, grid, iters, tables)
    if hold and alpha is not None:
        held = (a - a0).abs() <= hold * a0
        if bool(held.all()):
            a, codes = a0, _project(w2, a0, k, grid, tables)[1]
        elif bool(held.any()):
            codes = torch.where(held.unsqueeze(1), _project(w2, a0, k, grid, tables)[1].to(codes.dtype),
                                codes.reshape(w2.shape))
            a = torch.where(held, a0, a)
    return _finish(codes, a, w, per_row, bits, grid)


# --------------------------------------------------------------------------- objective and dispatch


def weight_objective(w: torch.Tensor, q: QTensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """‖w − ŵ‖²_D = Σ d (w − q.dequantize())² as a float32 scalar (D = I when d is None)."""
    if q.shape != w.shape:
        raise ConfigError(f"QTensor shape {tuple(q.shape)} does not match weight shape {tuple(w.shape)}")
    r = (w.to(torch.float32) - q.dequantize().to(w.device)) ** 2
    if d is not None:
        if d.shape != w.shape:
            raise ConfigError(f"d must have the weight's shape {tuple(w.shape)}, got {tuple(d.shape)}")
        r = r * d.to(device=w.device, dtype=torch.float32)
    return r.sum()


def quantize_weight(w: torch.Tensor, scheme: str, bits: int, d: torch.Tensor | None = None,
                    per_row: bool = False) -> QTensor:
    """Dispatch on ``scheme``:

    ======================  =====  ===================================================
    scheme                  bits   function
    ======================  =====  ===================================================
    ``"binary"``            1      :func:`binarize` (D-weighted)
    ``"twn"``               2      :func:`ternarize_twn` (``d`` is ignored: TWN is not loss-aware)
    ``"lat"``               2      :func:`ternarize_lat` exact
    ``"lat2"``              2      :func:`ternarize_lat` approximate (2 alternating steps)
    ``"laq-linear"``        2..8   :func:`laq_project` scheme "linear"
    ``"laq-log"``           2..8   :func:`laq_project` scheme "log"
    ======================  =====  ===================================================
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ConfigError(f"unknown weight scheme {scheme!r}; expected one of {WEIGHT_SCHEMES}")
    need = {"binary": (1,), "twn": (2,), "lat": (2,), "lat2": (2,)}.get(scheme, tuple(range(2, 9)))
    if isinstance(bits, bool) or bits not in need:
        want = f"bits={need[0]}" if len(need) == 1 else "bits in 2..8"
        raise ConfigError(f"weight scheme {scheme!r} needs {want}, got bits={bits!r}")
    if scheme == "binary":
        return binarize(w, per_row=per_row, d=d)
    if scheme == "twn":
        return ternarize_twn(w, per_row=per_row)
    if scheme in ("lat", "lat2"):
        return ternarize_lat(w, d=d, per_row=per_row, exact=scheme == "lat")
    return laq_project(w, d=d, bits=bits, scheme=scheme[4:], per_row=per_row)
