"""LAQ's stochastic gradient codes on large CPU tensors (lowbit.quant.grads.stochastic_code_chunks):
the counter-based generator's bits (the compiled loop lowbit.quant._laq.stochastic and the torch
ops give the same codes, AVX2 and scalar, across chunk and 2^32-index boundaries), the quality of
its draws, unbiasedness, chunking independence, tiny scales, and the switch."""
import math

import pytest
import torch

from lowbit.codec import StochasticGradCodec
from lowbit.quant import grads as G
from lowbit.quant import quantize_grad_stochastic
from lowbit.quant import weights as W

needs_native = pytest.mark.skipif(not W.native_laq_available(), reason="lowbit.quant._laq was not built")


def _codes(gf, k, s, seed):
    out = torch.empty(gf.numel(), dtype=torch.uint8)
    for a, c in G.stochastic_code_chunks(gf, k, s, torch.Generator().manual_seed(seed)):
        out[a:a + c.numel()] = c
    return out


def _reference(g, k, s, start, s0, s1):
    """The codes by the formula, from the torch-ops generator: t = g * c + u (fp32, two roundings),
    the clamp, * 2^-24, + k, truncation."""
    one = float(1 << 24)
    c = float(torch.tensor(k / s * one, dtype=torch.float32))
    t = torch.mul(g, c) + G._counter_u24(start, g.numel(), s0, s1).to(torch.float32)
    return t.clamp(-k * one, k * one).mul(1.0 / one).add(k).to(torch.int32).to(torch.uint8)


@pytest.mark.parametrize("k", [1, 3, 7, 127])
@pytest.mark.parametrize("n", [G.COUNTER_RNG_MIN, G.CHUNK * 2 + 13])
def test_compiled_and_torch_paths_give_the_same_codes(simd, k, n):
    g = torch.randn(n, generator=torch.Generator().manual_seed(n + k)) * 0.02
    g[:3] = torch.tensor([1.0, -1.0, 0.0])  # beyond the scale on both sides (the clamp), and zero
    gf, s = G._clip_scale(g, 3.0)
    got = _codes(gf, k, s, seed=7)
    was = W.set_native_laq(False)
    try:
        ref = _codes(gf, k, s, seed=7)
    finally:
        W.set_native_laq(was)
    assert torch.equal(got, ref)
    assert int(got.max()) <= 2 * k and int(got[0]) == 2 * k and int(got[1]) == 0
    s0, s1 = G._seed_words(torch.Generator().manual_seed(7))
    assert torch.equal(ref, _reference(gf, k, s, 0, s0, s1))


def test_compiled_loop_across_the_2_to_the_32_index_boundary(simd):
    """Elements 2^32 - 5 .. 2^32 + 6 of a (very large) tensor: the index's high half enters the hash,
    and the compiled loop's segments split there, as the torch ops do."""
    n, start, k = 11, (1 << 32) - 5, 3
    g = torch.linspace(-0.01, 0.01, n)
    out = torch.full((n,), 255, dtype=torch.uint8)
    c = float(torch.tensor(k / 0.01 * (1 << 24), dtype=torch.float32))
    W._laq.stochastic(g.data_ptr(), n, start, 12345, 678, c, k, out.data_ptr())
    assert torch.equal(out, _reference(g, k, 0.01, start, 12345, 678))
    u_lo = G._counter_u24(start, n, 12345, 678)
    u_hi = G._counter_u24(start + (1 << 32), n, 12345, 678)
    assert not torch.equal(u_lo, u_hi)  # 2^32 apart: the high half changes the draws


@needs_native
def test_compiled_loop_checks_its_arguments():
    lib, x = W._laq, torch.zeros(8)
    out = torch.empty(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="k must be in 1..127"):
        lib.stochastic(x.data_ptr(), 8, 0, 1, 2, 1.0, 0, out.data_ptr())
    with pytest.raises(ValueError, match="n must be >= 0"):
        lib.stochastic(x.data_ptr(), -1, 0, 1, 2, 1.0, 3, out.data_ptr())
    with pytest.raises(ValueError, match="must be addresses"):
        lib.stochastic(0, 8, 0, 1, 2, 1.0, 3, out.data_ptr())
    with pytest.raises(ValueError, match="finite and >= 0"):
        lib.stochastic(x.data_ptr(), 8, 0, 1, 2, math.inf, 3, out.data_ptr())


def test_counter_draws_are_uniform_and_uncorrelated():
    n = 1 << 18
    u = G._counter_u24(0, n, *G._seed_words(torch.Generator().manual_seed(3))).double()
    assert int(u.min()) >= 0 and int(u.max()) < 1 << 24
    # mean and variance of U[0, 2^24): within 6 standard errors
    m = 2.0**24
    assert abs(float(u.mean()) - m / 2) < 6 * m / math.sqrt(12 * n)
    assert float(u.var()) == pytest.approx(m * m / 12, rel=0.02)
    # the top and the bottom 8 bits spread evenly over 256 bins (chi-square, 255 dof: mean 255, sd 22.6)
    for bins in ((u / 2**16).floor(), u.remainder(256)):
        counts = torch.bincount(bins.long(), minlength=256).double()
        chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
        assert chi2 < 255 + 6 * 22.6, chi2
    # neighbours and elements 8 apart (a vector's lanes) are not correlated
    z = (u - u.mean()) / u.std()
    for lag in (1, 8):
        assert abs(float((z[:-lag] * z[lag:]).mean())) < 6 / math.sqrt(n)
    # another seed: another stream
    v = G._counter_u24(0, n, *G._seed_words(torch.Generator().manual_seed(4))).double()
    assert float((u == v).double().mean()) < 1e-3
    assert abs(float(((u - u.mean()) * (v - v.mean())).mean() / (u.std() * v.std()))) < 6 / math.sqrt(n)


def test_codes_do_not_depend_on_the_chunking(monkeypatch):
    g = torch.randn(G.CHUNK + 4097, generator=torch.Generator().manual_seed(0))
    gf, s = G._clip_scale(g, 3.0)
    ref = _codes(gf, 3, s, seed=11)
    monkeypatch.setattr(G, "CHUNK", 4096)
    assert torch.equal(_codes(gf, 3, s, seed=11), ref)


@pytest.mark.parametrize("native", [True, False])
def test_large_tensor_quantization_is_unbiased_given_the_clip(native):
    """E[dequantize] = clip(g) on a tensor large enough for the counter generator, averaged over
    seeds (each draw a new seed from the generator), within 5 standard errors per element."""
    if native and not W.native_laq_available():
        pytest.skip("lowbit.quant._laq was not built")
    n, draws, bits = G.COUNTER_RNG_MIN, 300 if native else 60, 3
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    was = W.set_native_laq(native)
    try:
        q = [quantize_grad_stochastic(g, bits, clip=2.0, generator=gen) for _ in range(draws)]
    finally:
        W.set_native_laq(was)
    s, k = float(q[0].scale), 3
    mean = torch.stack([x.dequantize() for x in q]).mean(0)
    tol = 5 * (s / k / 2) / math.sqrt(draws) + 1e-6
    assert ((mean - g.clamp(-s, s)).abs() <= tol).all()
    assert len({int(x.codes.sum()) for x in q}) > draws // 2  # every draw has its own seed


@pytest.mark.parametrize("native", [True, False])
def test_a_scale_near_the_smallest_float_still_gives_codes(native):
    """max|g| ~ 1e-40 (subnormal): k / s · 2^24 is no fp32 number, so values and scale are taken
    times 2^64 first; the codes are those of the same tensor times 2^64."""
    if native and not W.native_laq_available():
        pytest.skip("lowbit.quant._laq was not built")
    g = torch.randn(G.COUNTER_RNG_MIN, generator=torch.Generator().manual_seed(5))
    tiny = (g * 1e-40).clamp(-1e-39, 1e-39)
    assert float(tiny.abs().max()) < 1.2e-38  # below fp32's smallest normal
    was = W.set_native_laq(native)
    try:
        f = StochasticGradCodec(3, clip=None).encode(tiny, generator=torch.Generator().manual_seed(6))
        big = tiny * 2.0**64
        s_big = float(big.abs().max())
        ref = _codes(big, 3, s_big, seed=6)
        gf, s = G._clip_scale(tiny, None)
        got = _codes(gf, 3, s, seed=6)
    finally:
        W.set_native_laq(was)
    assert f is not None and torch.equal(got, ref)
    assert int(got.max()) <= 6 and len(set(got.tolist())) > 3


@needs_native
def test_the_compiled_loop_is_used_and_the_switch_turns_it_off(laq_calls):
    calls = laq_calls
    g = torch.randn(G.COUNTER_RNG_MIN * 2)
    quantize_grad_stochastic(g, 3)
    assert calls.count("stochastic") == math.ceil(g.numel() / G.CHUNK)
    calls.clear()
    was = W.set_native_laq(False)
    try:
        quantize_grad_stochastic(g, 3)
    finally:
        W.set_native_laq(was)
    assert calls == []
