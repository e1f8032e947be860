import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError, NonFiniteGradientError
from lowbit.quant import (ErrorFeedback, cast_half, check_finite, clip_sigma, qsgd, quantize_grad_stochastic,
                          sign_ef, stochastic_round, terngrad)

SETTINGS = settings(deadline=None, max_examples=50)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _unbiased(draw, target, var_bound, n=4000):
    """mean of n draws within 5 sigma of target, elementwise (var_bound: per-element variance bound)."""
    mean = torch.stack([draw() for _ in range(n)]).mean(0)
    tol = 5 * torch.sqrt(torch.as_tensor(var_bound) / n) + 1e-6
    assert ((mean - target).abs() <= tol).all(), (mean - target).abs().max()


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(2, 200), c=st.floats(0.5, 4.0), scale=st.floats(1e-3, 1e3))
def test_clip_bound(seed, n, c, scale):
    g = torch.randn(n, generator=_gen(seed)) * scale
    gc = clip_sigma(g, c)
    sigma = float(g.std(unbiased=False))
    assert float(gc.abs().max()) <= c * sigma * (1 + 1e-6)
    inside = g.abs() <= c * sigma * (1 - 1e-6)
    assert torch.equal(gc[inside], g[inside])


def test_clip_constant_and_inf():
    g = torch.full((5,), 3.0)
    assert torch.equal(clip_sigma(g), g)
    h = torch.randn(100)
    assert torch.equal(clip_sigma(h, math.inf), h)
    assert clip_sigma(h.half(), 1.0).dtype == torch.float16


@pytest.mark.parametrize("c", [0, -1.0, math.nan])
def test_clip_bad_c(c):
    with pytest.raises(ConfigError, match="c must be > 0"):
        clip_sigma(torch.randn(3), c)


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 50))
def test_stochastic_round_brackets_and_reproducible(seed, n):
    x = torch.randn(n, generator=_gen(seed)) * 10
    r1 = stochastic_round(x, _gen(seed + 1))
    r2 = stochastic_round(x, _gen(seed + 1))
    assert torch.equal(r1, r2)
    assert ((r1 == torch.floor(x)) | (r1 == torch.floor(x) + 1)).all()


def test_stochastic_round_unbiased():
    x = torch.tensor([0.3, -0.3, 2.5, -7.9, 0.0, 4.0, 1e-3])
    gen = _gen(0)
    _unbiased(lambda: stochastic_round(x, gen), x, 0.25)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_grad_stochastic_unbiased_given_clip(bits):
    g = torch.randn(12, generator=_gen(bits)) * 3
    gen = _gen(1)
    gc = clip_sigma(g, 1.5)
    s = float(gc.abs().max())
    k = 2 ** (bits - 1) - 1
    _unbiased(lambda: quantize_grad_stochastic(g, bits, clip=1.5, generator=gen).dequantize(), gc, (s / k) ** 2 / 4)


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 100), bits=st.integers(2, 8),
       clip=st.sampled_from([None, math.inf, 2.5]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_grad_stochastic_grid(seed, n, bits, clip, dtype):
    g = (torch.randn(n, generator=_gen(seed)) * 5).to(dtype)
    q = quantize_grad_stochastic(g, bits, clip=clip, generator=_gen(seed))
    k = 2 ** (bits - 1) - 1
    assert q.grid == "sym" and q.bits == bits and q.scale.dtype == torch.float32 and q.scale.shape == ()
    assert int(q.codes.max()) <= 2 * k
    assert q.dequantize().unique().numel() <= 2 ** bits
    # each value is one of the two grid neighbours of the (clipped) input
    gc = g.float() if clip in (None, math.inf) else clip_sigma(g, clip).float()
    err = (q.dequantize() - gc).abs()
    assert (err <= q.scale / k * (1 + 1e-4) + 1e-6).all()
    q2 = quantize_grad_stochastic(g, bits, clip=clip, generator=_gen(seed))
    assert torch.equal(q.codes, q2.codes)


def test_grad_zero():
    q = quantize_grad_stochastic(torch.zeros(10), 4)
    assert float(q.scale) == 1.0 and (q.codes == 7).all() and torch.equal(q.dequantize(), torch.zeros(10))


@pytest.mark.parametrize("bits", [0, 1, 9, 2.0, True])
def test_grad_bad_bits(bits):
    with pytest.raises(ConfigError, match=f"gradient bits must be in 2..8, got {bits!r}"):
        quantize_grad_stochastic(torch.randn(4), bits)


def test_grad_nonfinite_raises():
    with pytest.raises(NonFiniteGradientError):
        quantize_grad_stochastic(torch.tensor([1.0, math.inf]), 4)


def test_check_finite_policies():
    g = torch.tensor([1.0, math.nan, math.inf, 2.0])
    with pytest.raises(NonFiniteGradientError, match=r"layer\.w holds 2 NaN/Inf"):
        check_finite(g, name="layer.w")
    assert check_finite(g, policy="skip") is None
    assert torch.equal(check_finite(g, policy="zero"), torch.zeros(4))
    ok = torch.randn(3)
    for p in ("error", "skip", "zero"):
        assert check_finite(ok, policy=p) is ok
    with pytest.raises(ConfigError, match="'ignore'"):
        check_finite(ok, policy="ignore")


def test_cast_half_saturates():
    g = torch.tensor([1e6, -1e6, 1.5, math.inf])
    h = cast_half(g)
    assert h.dtype == torch.float16 and h.tolist() == [65504.0, -65504.0, 1.5, 65504.0]
    b = cast_half(g, torch.bfloat16)
    assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
    with pytest.raises(ConfigError, match="float64"):
        cast_half(g, torch.float64)


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 60), steps=st.integers(1, 4))
def test_sign_ef_residual_identity(seed, n, steps):
    gen = _gen(seed)
    res = None
    for _ in range(steps):
        g = torch.randn(n, generator=gen)
        p = g + (res if res is not None else 0)
        q, res = sign_ef(g, res)
        assert q.grid == "bin" and q.bits == 1
        torch.testing.assert_close(q.dequantize() + res, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.scale, p.abs().mean())
    with pytest.raises(ConfigError):
        sign_ef(torch.randn(3), torch.zeros(4))


@pytest.mark.parametrize("levels", [1, 3, 7, 127])
def test_qsgd_unbiased(levels):
    g = torch.randn(10, generator=_gen(levels))
    gen = _gen(9)
    q = qsgd(g, levels, gen)
    assert q.bits == [1, 3, 7, 15, 31, 63, 127].index(levels) + 2
    norm = float(g.norm())
    _unbiased(lambda: qsgd(g, levels, gen).dequantize(), g, (norm / levels) ** 2 / 4)


@pytest.mark.parametrize("levels", [0, 2, 4, 255])
def test_qsgd_bad_levels(levels):
    with pytest.raises(ConfigError, match=f"got {levels}"):
        qsgd(torch.randn(4), levels)


def test_terngrad_unbiased_and_ternary():
    g = torch.randn(10, generator=_gen(4))
    gen = _gen(5)
    q = terngrad(g, gen)
    assert q.bits == 2 and set(q.signs().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(q.scale, g.abs().max())
    _unbiased(lambda: terngrad(g, gen).dequantize(), g, float(g.abs().max()) ** 2 / 4)
    z = terngrad(torch.zeros(3))
    assert torch.equal(z.dequantize(), torch.zeros(3))


def test_error_feedback_with_codec():
    ef = ErrorFeedback()
    gen = _gen(2)
    total_in, total_out = torch.zeros(20), torch.zeros(20)
    for _ in range(30):
        g = torch.randn(20, generator=gen)
        gc = ef.compensate("w", g)
        dec = quantize_grad_stochastic(gc, 2, clip=None, generator=gen).dequantize()
        e = ef.update("w", gc, dec)
        torch.testing.assert_close(dec + e, gc)
        total_in += g
        total_out += dec
    # telescoping: Σ decoded = Σ g − e_final
    torch.testing.assert_close(total_out, total_in - ef.residuals["w"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError):
        ef.compensate("w", torch.randn(3))
