"""LAQ's compiled linear-grid round (lowbit.quant._laq): the same q as the torch ops, sums that match a
float64 reference, laq_project results that match the torch path, its switch and its argument checks."""
import math

import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.quant import laq_project, weight_objective
from lowbit.quant import weights as W

needs_native = pytest.mark.skipif(not W.native_laq_available(), reason="lowbit.quant._laq was not built")


def _wd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 0.05, torch.rand(n, generator=g) * 1e-3 + 1e-6


@pytest.mark.parametrize("k", [1, 3, 7, 127])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n", [1, 7, 8, 1000, 100_003])
def test_round_and_codes_match_torch(simd, k, weighted, n):
    w, d = _wd(n, seed=k + n)
    if n > 10:  # values exactly on a rounding tie (x.5 after the multiply) and at the clamp
        w[:4] = torch.tensor([0.5, -1.5, 2.5, 1e3]) / (k / 0.04)
    s = k / 0.04
    q = torch.mul(w, s).clamp_(-k, k).round_()  # the torch path's q (fp32 multiply, half to even)
    dd = d.double() if weighted else torch.ones(n, dtype=torch.float64)
    num, den = W._laq.round(w.data_ptr(), d.data_ptr() if weighted else 0, n, s, k)
    ref_num = float((dd * w.double() * q.double()).sum())
    ref_den = float((dd * q.double() ** 2).sum())
    assert num == pytest.approx(ref_num, rel=1e-12, abs=1e-300)
    assert den == pytest.approx(ref_den, rel=1e-12, abs=1e-300)
    out = torch.full((n,), 255, dtype=torch.uint8)
    W._laq.codes(w.data_ptr(), n, s, k, out.data_ptr())
    assert torch.equal(out, (q + k).to(torch.uint8))


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("warm", [False, True])
def test_laq_project_native_matches_torch_path(bits, weighted, warm):
    w, d = _wd(300_001, seed=bits)
    d = d if weighted else None
    was = W.set_native_laq(False)
    try:
        # warm: the previous step's scale, as the server warm-starts LAQ (5% off this step's fixed
        # point). A start far from it (0.2 max|w| at 8 bits) is still moving after the 10 rounds,
        # and there torch's fp32 sums alone (1 or 2 threads) stop 3e-4 apart in alpha.
        alpha = float(laq_project(w, d=d, bits=bits).scale) * 1.05 if warm else None
        ref = laq_project(w, d=d, bits=bits, alpha=alpha)
        W.set_native_laq(True)
        got = laq_project(w, d=d, bits=bits, alpha=alpha)
    finally:
        W.set_native_laq(was)
    # Both paths minimise the same objective; the torch path's sums are fp32 (cascade summation:
    # relative error up to log2(n)·u per sum, u = 2^-24), the compiled path's double. So the two
    # optima agree to a few such sums: obj_tol = 16·log2(n)·u (1.7e-5 here), at any thread count.
    # The minimum is flat in α (the codes re-round as α moves): α is pinned only to about the square
    # root of that, which still tells a wrong fixed point (several % off) from the right one.
    obj_tol = 16 * math.log2(w.numel()) * 2.0 ** -24
    o_got, o_ref = float(weight_objective(w, got, d)), float(weight_objective(w, ref, d))
    assert o_got == pytest.approx(o_ref, rel=obj_tol)
    assert float(got.scale) == pytest.approx(float(ref.scale), rel=math.sqrt(obj_tol))
    assert (got.codes != ref.codes).float().mean() < math.sqrt(obj_tol)


@needs_native
def test_native_is_used_and_the_switch_turns_it_off(laq_calls):
    calls = laq_calls
    w, d = _wd(4096)
    laq_project(w, d=d, bits=4)
    assert "round" in calls and "codes" in calls
    calls.clear()
    was = W.set_native_laq(False)
    try:
        laq_project(w, d=d, bits=4)
    finally:
        W.set_native_laq(was)
    assert calls == []


def test_switch_without_the_build(monkeypatch):
    monkeypatch.setattr(W, "_laq", None)
    assert not W.native_laq_available()
    with pytest.raises(ConfigError, match="_laq was not built"):
        W.set_native_laq(True)


@pytest.mark.timeout(60)
def test_env_turns_it_off(python_with_env):
    out = python_with_env("from lowbit.quant import weights as W; print(W._native_on)", LOWBIT_NATIVE_LAQ="0")
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@needs_native
@pytest.mark.parametrize("args, needle", [((0, 0, -1, 1.0, 1), "n must be >= 0"),
                                          ((0, 0, 0, 1.0, 0), "k must be in 1..127"),
                                          ((0, 0, 0, 1.0, 128), "k must be in 1..127")])
def test_round_argument_checks(args, needle):
    with pytest.raises(ValueError, match=needle):
        W._laq.round(*args)
    with pytest.raises(ValueError, match=needle):
        W._laq.codes(args[0], args[2], args[3], args[4], 0)
