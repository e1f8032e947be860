import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError
from lowbit.quant.qtensor import grid_k
from lowbit.quant import (QTensor, binarize, laq_project, quantize_weight, ternarize_lat, ternarize_twn,
                          weight_objective)

SETTINGS = settings(deadline=None, max_examples=50)


def _wd(seed, shape, d_spread=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    d = torch.rand(shape, generator=g) * (10.0 if d_spread else 1.0) + 0.01
    return w, d


shapes = st.tuples(st.integers(1, 6), st.integers(1, 12))


def _groups(q: QTensor):
    x = q.dequantize()
    return [x[i] for i in range(x.shape[0])] if q.per_row else [x]


@SETTINGS
@given(seed=st.integers(0, 10_000), shape=shapes, per_row=st.booleans(),
       sb=st.sampled_from([("binary", 1), ("twn", 2), ("lat", 2), ("lat2", 2), ("laq-linear", 2),
                           ("laq-linear", 3), ("laq-linear", 5), ("laq-log", 2), ("laq-log", 4)]))
def test_values_on_grid(seed, shape, per_row, sb):
    scheme, bits = sb
    w, d = _wd(seed, shape)
    q = quantize_weight(w, scheme, bits, d=d, per_row=per_row)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert q.scale.dtype == torch.float32
    assert q.scale.shape == ((shape[0],) if per_row else ())
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    cap = 3 if bits == 2 else 2 ** bits
    for grp in _groups(q):
        assert grp.unique().numel() <= cap
    if scheme.startswith("laq"):
        # codes stay inside the table
        assert int(q.codes.max()) < (2 ** bits - 1 if scheme == "laq-linear" else 2 * (2 ** (bits - 1) - 1) + 1)


def _brute_lat(w, d):
    """min over every b in {-1,0,1}^n, α = optimal (>0) for b, of Σ d (w - α b)²."""
    best = float((d * w * w).sum())
    n = w.numel()
    for b in itertools.product((-1.0, 0.0, 1.0), repeat=n):
        b = torch.tensor(b, dtype=torch.float64)
        num, den = float((d * w * b).sum()), float((d * b * b).sum())
        if den > 0 and num > 0:
            a = num / den
            best = min(best, float((d * (w - a * b) ** 2).sum()))
    return best


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6))
def test_lat_exact_matches_brute_force(seed, n):
    w, d = _wd(seed, (n,))
    q = ternarize_lat(w, d=d)
    got = float(weight_objective(w, q, d))
    want = _brute_lat(w.double(), d.double())
    assert got <= want + 1e-5 * (1 + abs(want))
    assert got >= want - 1e-5 * (1 + abs(want))


@SETTINGS
@given(seed=st.integers(0, 10_000), shape=shapes, per_row=st.booleans())
def test_lat_exact_beats_twn_and_approx(seed, shape, per_row):
    w, d = _wd(seed, shape)
    ex = float(weight_objective(w, ternarize_lat(w, d=d, per_row=per_row), d))
    tw = float(weight_objective(w, ternarize_twn(w, per_row=per_row), d))
    ap = float(weight_objective(w, ternarize_lat(w, d=d, per_row=per_row, exact=False), d))
    lq = float(weight_objective(w, laq_project(w, d=d, bits=2, per_row=per_row), d))
    tol = 1e-5 * (1 + ex)
    assert ex <= tw + tol
    assert ex <= ap + tol
    assert ex <= lq + tol


@SETTINGS
@given(seed=st.integers(0, 10_000), shape=shapes, per_row=st.booleans(), bits=st.integers(2, 6),
       scheme=st.sampled_from(["linear", "log"]))
def test_laq_weighted_not_worse_than_plain(seed, shape, per_row, bits, scheme):
    w, d = _wd(seed, shape)
    qd = laq_project(w, d=d, bits=bits, scheme=scheme, per_row=per_row)
    qp = laq_project(w, d=None, bits=bits, scheme=scheme, per_row=per_row)
    od, op = float(weight_objective(w, qd, d)), float(weight_objective(w, qp, d))
    assert od <= op + 1e-5 * (1 + op)


@SETTINGS
@given(seed=st.integers(0, 10_000), shape=shapes, bits=st.integers(2, 5), scheme=st.sampled_from(["linear", "log"]),
       weighted=st.booleans(), a0=st.floats(0.05, 5.0))
def test_laq_objective_non_increasing_over_iterations(seed, shape, bits, scheme, weighted, a0):
    w, d = _wd(seed, shape)
    dd = d if weighted else None
    objs = [float(weight_objective(w, laq_project(w, d=dd, bits=bits, scheme=scheme, iters=t, alpha=a0), dd))
            for t in range(1, 8)]
    for a, b in zip(objs, objs[1:]):
        assert b <= a + 1e-5 * (1 + a)


def test_laq_converges_and_improves_on_first_iterate():
    w, d = _wd(3, (400,))
    o1 = float(weight_objective(w, laq_project(w, d=d, bits=3, iters=1, alpha=float(w.abs().max())), d))
    o10 = float(weight_objective(w, laq_project(w, d=d, bits=3, iters=10), d))
    assert o10 < o1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_log_levels_are_powers_of_two(bits):
    w, d = _wd(7, (5, 40))
    q = laq_project(w, d=d, bits=bits, scheme="log", per_row=True)
    b = q.signs()
    nz = b[b != 0].abs()
    e = torch.log2(nz)
    assert torch.equal(e, torch.round(e))
    assert (e <= 0).all() and (e >= -(2 ** (bits - 1) - 2)).all()


def test_laq_linear_2bit_is_ternary():
    w, d = _wd(11, (300,))
    q = laq_project(w, d=d, bits=2, scheme="linear")
    assert set(q.signs().unique().tolist()) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("scheme,bits", [("binary", 1), ("lat", 2), ("lat2", 2), ("laq-linear", 3), ("laq-log", 3)])
@pytest.mark.parametrize("per_row", [False, True])
def test_d_none_equals_ones(scheme, bits, per_row):
    w, _ = _wd(5, (4, 30))
    a = quantize_weight(w, scheme, bits, d=None, per_row=per_row)
    b = quantize_weight(w, scheme, bits, d=torch.ones_like(w), per_row=per_row)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.scale, b.scale, rtol=1e-5, atol=0)


def test_binarize_formula():
    w = torch.tensor([[1.0, -3.0, 0.0], [2.0, 2.0, -2.0]])
    d = torch.tensor([[1.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    q = binarize(w, per_row=True, d=d)
    torch.testing.assert_close(q.scale, torch.tensor([4.0 / 4.0, 12.0 / 6.0]))
    assert q.signs()[0].tolist() == [1.0, -1.0, 1.0]  # sign(0) = +1
    q0 = binarize(w)
    torch.testing.assert_close(q0.scale, w.abs().mean())


def test_twn_formula():
    w = torch.tensor([0.1, -0.2, 1.0, -2.0, 0.05])
    q = ternarize_twn(w)
    delta = 0.7 * w.abs().mean()
    m = w.abs() > delta
    torch.testing.assert_close(q.scale, w.abs()[m].mean())
    assert torch.equal(q.signs(), torch.sign(w) * m)


@pytest.mark.parametrize("scheme,bits", [("binary", 1), ("twn", 2), ("lat", 2), ("lat2", 2), ("laq-linear", 4),
                                         ("laq-log", 4)])
def test_all_zero_dequantizes_to_zero(scheme, bits):
    w = torch.zeros(3, 5)
    w[1] = torch.arange(5.0) - 2
    for per_row in (False, True):
        q = quantize_weight(w if per_row else torch.zeros(3, 5), scheme, bits, d=torch.ones(3, 5), per_row=per_row)
        assert torch.isfinite(q.scale).all()
        x = q.dequantize()
        if per_row:
            assert torch.equal(x[0], torch.zeros(5)) and torch.equal(x[2], torch.zeros(5))
        else:
            assert torch.equal(x, torch.zeros(3, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    w, d = _wd(2, (4, 16))
    for scheme, bits in [("binary", 1), ("twn", 2), ("lat", 2), ("laq-log", 3)]:
        q = quantize_weight(w.to(dtype), scheme, bits, d=d.to(dtype), per_row=True)
        assert q.scale.dtype == torch.float32 and q.codes.shape == w.shape


def test_conv_shaped_per_row():
    w, d = _wd(4, (6, 3, 2, 2))
    q = ternarize_lat(w, d=d, per_row=True)
    assert q.scale.shape == (6,)
    # per-row must equal quantizing each row on its own
    for i in range(6):
        qi = ternarize_lat(w[i], d=d[i])
        assert torch.equal(q.codes[i], qi.codes)
        torch.testing.assert_close(q.scale[i], qi.scale)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(scheme="ternary", bits=2), "ternary"),
        (dict(scheme="twn", bits=3), "bits=3"),
        (dict(scheme="lat", bits=1), "bits=1"),
        (dict(scheme="binary", bits=2), "bits=2"),
        (dict(scheme="laq-linear", bits=9), "bits=9"),
        (dict(scheme="laq-log", bits=0), "bits=0"),
        (dict(scheme="laq-linear", bits=1), "bits=1"),
    ],
)
def test_bad_configs(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        quantize_weight(torch.randn(4, 4), **kwargs)


def test_bad_inputs():
    w = torch.randn(4, 5)
    with pytest.raises(ConfigError, match=r"\(4, 5\).*\(5, 4\)"):
        ternarize_lat(w, d=torch.ones(5, 4))
    with pytest.raises(ConfigError, match="> 0"):
        laq_project(w, d=torch.zeros(4, 5))
    with pytest.raises(ConfigError, match="NaN/Inf"):
        binarize(torch.tensor([1.0, math.nan]))
    with pytest.raises(ConfigError, match="NaN/Inf"):
        laq_project(w, d=torch.full((4, 5), math.inf))
    with pytest.raises(ConfigError, match="per_row"):
        ternarize_twn(torch.randn(5), per_row=True)
    with pytest.raises(ConfigError, match="'cubic'"):
        laq_project(w, scheme="cubic")
    with pytest.raises(ConfigError, match="iters"):
        laq_project(w, iters=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_laq_linear_reaches_the_best_scale_from_a_cold_start(bits, weighted):
    """LAQ's alternation with secant steps (up to 4 bits) ends at the best scale a dense search over α
    finds (for each α: codes b = Π_Q(w/α) and the exact minimiser α* = Σdwb / Σdb² of those codes),
    within the default 10 rounds per phase."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(50_000, generator=g) * 0.05
    d = torch.rand(50_000, generator=g) + 0.1 if weighted else torch.ones(50_000)
    k = 2 ** (bits - 1) - 1
    q = laq_project(w, d=d if weighted else None, bits=bits)
    got = float(weight_objective(w, q, d))
    a_max = float(w.abs().max())
    best = float("inf")
    for alphas in torch.linspace(0.05 * a_max, a_max, 4000).split(250):  # the search, 250 αs at a time
        b = torch.round(torch.clamp(w / alphas[:, None] * k, -k, k)) / k
        num, den = (d * w * b).double().sum(1), (d * b * b).double().sum(1)
        err = (d.double() * w.double() ** 2).sum() - num ** 2 / den
        best = min(best, float(err.min()))
    assert got <= best * (1 + 1e-5), (got, best)  # to the objective's fp32 rounding


@pytest.mark.parametrize("per_row", [False, True])
def test_a_held_scale_moves_codes_only_where_weights_crossed_a_boundary(per_row):
    """hold: while the re-solved alpha stays within hold*alpha of the warm start, the warm start is
    kept and the codes are the plain projection at it; a move of alpha beyond hold is adopted."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    d = torch.rand(64, 256, generator=gen) + 0.1
    q0 = laq_project(w, d, bits=8, per_row=per_row)
    w1 = w + 1e-4 * torch.randn(64, 256, generator=gen)  # one small optimizer step
    free = laq_project(w1, d, bits=8, per_row=per_row, alpha=q0.scale)
    held = laq_project(w1, d, bits=8, per_row=per_row, alpha=q0.scale, hold=0.05)
    assert torch.equal(held.scale, q0.scale)
    k = grid_k(8)
    expect = torch.round(torch.clamp(w1 / q0.scale.reshape(-1, 1) * k, -k, k)) + k
    assert torch.equal(held.codes.long(), expect.long())
    assert (held.codes != q0.codes).sum() < (free.codes != q0.codes).sum()
    assert weight_objective(w1, held, d) <= 1.01 * weight_objective(w1, free, d)
    moved = laq_project(2 * w, d, bits=8, per_row=per_row, alpha=q0.scale, hold=0.05)
    assert not torch.allclose(moved.scale, q0.scale)
