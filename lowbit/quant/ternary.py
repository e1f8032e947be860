"""Binary and ternary weight quantizers: loss-aware binarization, TWN and LAT (exact and approximate),
each the D-weighted projection of :mod:`lowbit.quant.weights` onto a one- or two-level grid."""
from __future__ import annotations

import torch

from lowbit.quant._base import _check_inputs, _d_rows, _finish, _rows, _safe_div, _sign_codes_ternary, _wsum
from lowbit.quant.qtensor import QTensor

def binarize(w: torch.Tensor, per_row: bool = False, d: torch.Tensor | None = None) -> QTensor:
    """Loss-aware binarization (Hou, Yao & Kwok ICLR 2017; BinaryConnect/XNOR scale when D = I).

    b = sign(w) (sign(0) = +1), α = Σ d|w| / Σ d  (α = mean|w| when d is None); this is the exact
    minimiser of ‖w − α b‖²_D over α ≥ 0, b ∈ {±1}^n. Grid "bin", bits 1. An all-zero row keeps
    α = 0 (the binary grid has no zero level).
    """
    _check_inputs(w, d, per_row)
    w2 = _rows(w, per_row)
    d2 = _d_rows(d, w2, per_row)
    a = w2.abs()
    den = _wsum(torch.ones_like(a), d2) if d2 is not None else torch.full((a.shape[0],), float(a.shape[1]),
                                                                          device=a.device)
    alpha = _wsum(a, d2) / den
    codes = (w2 >= 0).to(torch.uint8)
    return _finish(codes, alpha, w, per_row, 1, "bin", zero_scale_one=False)


def ternarize_twn(w: torch.Tensor, per_row: bool = False) -> QTensor:
    """Ternary weight networks (Li, Zhang & Liu 2016), the approximate threshold rule.

    Δ = 0.7·mean|w|, b = sign(w)·1[|w| > Δ], α = mean of |w| over {|w| > Δ}. Grid "sym", bits 2.
    For any non-zero row max|w| ≥ mean|w| > Δ, so the support is never empty; an all-zero row gets
    codes 0 (zero) and scale 1.0. TWN is not loss-aware: it takes no ``d``.
    """
    _check_inputs(w, None, per_row)
    w2 = _rows(w, per_row)
    a = w2.abs()
    delta = 0.7 * a.mean(1, keepdim=True)
    mask = a > delta
    alpha = _safe_div((a * mask).sum(1), mask.sum(1).to(torch.float32))
    return _finish(_sign_codes_ternary(w2, mask), alpha, w, per_row, 2, "sym")


def ternarize_lat(w: torch.Tensor, d: torch.Tensor | None = None, per_row: bool = False,
                  exact: bool = True) -> QTensor:
    """Loss-aware ternarization, LAT (Hou & Kwok ICLR 2018): min_{α>0, b∈{−1,0,1}^n} Σ d_i (w_i − α b_i)².

    Exact (``exact=True``): for a support S with b_i = sign(w_i) on S, α*(S) = Σ_S d|w| / Σ_S d and the
    objective drops by (Σ_S d|w|)² / Σ_S d. For fixed α the best b is b_i = sign(w_i)·1[|w_i| > α/2]
    whatever d is, so the optimal S is a top-t set of |w|: sort |w| descending, take cumulative sums of
    d|w| and d, and pick t = argmax_t (cumsum d|w|)_t² / (cumsum d)_t (sums in float64). Per row this is
    one batched sort along dim 1.

    Approximate (``exact=False``, scheme "lat2"): LAT's alternating solver, started from the
    D-weighted TWN point (Δ = 0.7·mean|w|, α₀ = Σ_{|w|>Δ} d|w| / Σ_{|w|>Δ} d) and run for two
    iterations of  b ← sign(w)·1[|w| > α/2],  α ← Σ d|w||b| / Σ d|b|.

    Grid "sym", bits 2; all-zero rows get scale 1.0 and zero codes.
    """
    _check_inputs(w, d, per_row)
    w2 = _rows(w, per_row)
    d2 = _d_rows(d, w2, per_row)
    a = w2.abs()
    if exact:
        a_s, idx = torch.sort(a, dim=1, descending=True)
        a64 = a_s.to(torch.float64)
        if d2 is not None:
            d64 = torch.gather(d2, 1, idx).to(torch.float64)
            cdw = torch.cumsum(d64 * a64, 1)
            cd = torch.cumsum(d64, 1)
        else:
            cdw = torch.cumsum(a64, 1)
            cd = torch.arange(1, a.shape[1] + 1, device=a.device, dtype=torch.float64).expand_as(cdw)
        gain = cdw * cdw / cd
        t = torch.argmax(gain, dim=1, keepdim=True)  # first max: smallest optimal support
        alpha = (torch.gather(cdw, 1, t) / torch.gather(cd, 1, t)).squeeze(1).to(torch.float32)
        in_sorted = torch.arange(a.shape[1], device=a.device).unsqueeze(0) <= t
        mask = torch.zeros_like(in_sorted).scatter(1, idx, in_sorted)
        mask = mask & (a > 0)
    else:
        ones = torch.ones_like(a)
        delta = 0.7 * a.mean(1, keepdim=True)
        mask = a > delta
        alpha = _safe_div(_wsum(a * mask, d2), _wsum(ones * mask, d2))
        for _ in range(2):
            mask = a > (alpha / 2).unsqueeze(1)
            alpha = _safe_div(_wsum(a * mask, d2), _wsum(ones * mask, d2))
    mask = mask & (alpha > 0).unsqueeze(1)
    return _finish(_sign_codes_ternary(w2, mask), alpha, w, per_row, 2, "sym")
