import math

import pytest

from lowbit.errors import ConfigError
from lowbit.net.costmodel import (
    BERT_BASE_N,
    METHODS,
    Method,
    bert_param_shapes,
    bytes_per_rank,
    extrapolate,
    fit,
    holdout,
    predict,
    terms,
)

pytestmark = pytest.mark.timeout(30)

H = 64


@pytest.mark.timeout(10)
def test_bytes_per_rank_hand_computed():
    n, p = 1_000_000, 4
    # fp32 ring all_reduce: 2(p-1)/p * (4n + h*p) = 1.5 * (4e6 + 256)
    assert bytes_per_rank(METHODS["fp32"], p, n, H) == 6_000_384
    assert bytes_per_rank(METHODS["fp16"], p, n, H) == 3_000_384
    # 2-bit ring: (p-1)/p * (n/4 + n/4) + 2(p-1)*h = 0.75 * 500000 + 384
    assert bytes_per_rank(METHODS["lowbit_ring"], p, n, H) == 375_384
    # tree: log2(4)/2 * 250000 + 0.75 * 250000 + 2*2*64
    assert bytes_per_rank(METHODS["lowbit_tree"], p, n, H) == 250_000 + 187_500 + 256
    # separate PS with 2 servers: worker uploads Pg + S*h
    ps = Method("ps2", "ps", g_bits=2, w_bits=2, servers=2)
    assert bytes_per_rank(ps, 8, n, H) == 250_000 + 128
    # PowerSGD rank 2 on one 100x50 matrix + 10 biases: P = 4*2*100, Q = 4*2*50, u = 40
    psgd = Method("psgd", "powersgd", rank=2, shapes=((100, 50), (10,)))
    expect = sum(1.5 * (b + H * p) for b in (800, 400, 40))
    assert bytes_per_rank(psgd, p, 0 + 5010, H) == math.ceil(expect)
    assert terms(psgd, p, 5010, H).messages == 3 * 2 * (p - 1)


@pytest.mark.timeout(10)
def test_ps_server_bottleneck_and_single_rank():
    n = 1_000_000
    # 8 workers, 1 server: the server NIC carries 8 * Pg in and 8 * Pw out
    ps = Method("ps1", "ps", g_bits=8, w_bits=8, servers=1)
    t = terms(ps, 8, n, 0)
    assert t.wire_bytes == pytest.approx(8 * n + 8 * n)
    assert t.messages == 16
    assert terms(METHODS["fp32"], 1, n).wire_bytes == 0
    assert predict(METHODS["lowbit_ring"], 1, n, 1e9) == 0.0


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_predict_monotone_in_rate_and_lowbit_cheaper(name):
    m = METHODS[name]
    times = [predict(m, 8, 10_000_000, r, alpha_s=5e-5, gamma_s_per_byte=1e-10) for r in (1e8, 1e9, 1e10, 1e11)]
    assert all(a > b for a, b in zip(times, times[1:]))
    if m.kind in ("ps", "ring", "tree"):
        assert predict(m, 8, 10_000_000, 1e9) < predict(METHODS["fp32"], 8, 10_000_000, 1e9) / 4


@pytest.mark.timeout(20)
@pytest.mark.parametrize("fit_gamma", [False, True])
def test_fit_recovers_known_parameters(fit_gamma):
    alpha, eta, gamma = 2.5e-4, 0.82, 3e-10
    recs = []
    for name in ("fp32", "fp16", "lowbit_ps", "lowbit_ring", "lowbit_tree"):
        for p in (2, 4, 8):
            for n in (1_000_000, 10_000_000):
                for rate in (5e7, 1e9):
                    step = predict(METHODS[name], p, n, rate, alpha, gamma, efficiency=eta)
                    recs.append({"method": name, "p": p, "n": n, "rate_bps": rate, "step_s": step})
    res = fit(recs, gamma_s_per_byte=None if fit_gamma else gamma)
    assert res.alpha_s == pytest.approx(alpha, rel=0.01)
    assert res.efficiency == pytest.approx(eta, rel=0.01)
    assert res.gamma_s_per_byte == pytest.approx(gamma, rel=0.01)
    assert res.r2 > 0.9999 and res.max_rel_err < 1e-6
    assert res.predict("lowbit_ring", 16, 5_000_000, 1e10) == pytest.approx(
        predict(METHODS["lowbit_ring"], 16, 5_000_000, 1e10, alpha, gamma, efficiency=eta), rel=0.01)


@pytest.mark.timeout(10)
def test_fit_with_noise_reports_error_and_rejects_bad_input():
    recs = [{"method": "fp32", "p": 2, "n": 10**6, "rate_bps": r, "step_s": predict(METHODS["fp32"], 2, 10**6, r, 1e-3) * f}
            for r, f in ((1e8, 1.05), (1e9, 0.95), (5e7, 1.0), (2e8, 1.02))]
    res = fit(recs)
    assert len(res.rel_err) == 4 and 0 < res.max_rel_err < 0.2
    with pytest.raises(ConfigError):
        fit([{"method": "fp32", "p": 2}])
    with pytest.raises(ConfigError):
        fit([{"method": "nope", "p": 2, "n": 1, "rate_bps": 1e9, "step_s": 1.0}])
    with pytest.raises(ConfigError):
        Method("x", "gossip")


@pytest.mark.timeout(10)
def test_extrapolation_records():
    res = fit([{"method": m, "p": p, "n": 10**6, "rate_bps": 1e9,
                "step_s": predict(METHODS[m], p, 10**6, 1e9, 1e-4)} for m in ("fp32", "lowbit_ring") for p in (2, 4)])
    names = ["fp32", "powersgd4", "lowbit_ring", "lowbit_tree", "lowbit_ps"]
    out = extrapolate(res, names, nodes=[16, 256], gpus_per_node=4, rates=[1e9, 1e10])
    assert len(out) == len(names) * 2 * 2
    assert {(r["method"], r["nodes"], r["rate_bps"]) for r in out} == {
        (m, nd, r) for m in names for nd in (16, 256) for r in (1e9, 1e10)}
    assert all(r["gpus"] == 4 * r["nodes"] and r["n"] == BERT_BASE_N and r["step_s"] > 0 for r in out)
    by = {(r["method"], r["nodes"], r["rate_bps"]): r["step_s"] for r in out}
    assert by[("lowbit_ring", 256, 1e9)] < by[("fp32", 256, 1e9)]
    assert 105e6 < BERT_BASE_N < 115e6
    assert len(bert_param_shapes(layers=1)) < len(bert_param_shapes())


def _synthetic(alpha, eta, rates, noise=None):
    recs = []
    for i, (name, rate) in enumerate((nm, r) for nm in ("fp32", "lowbit_ps", "lowbit_ring", "lowbit_tree") for r in rates):
        step = predict(METHODS[name], 4, 5_000_000, rate, alpha, efficiency=eta)
        f = 1.0 if noise is None else 1.0 + noise * (1 if i % 2 else -1) * (1 + i % 3) / 3
        recs.append({"method": name, "p": 4, "n": 5_000_000, "rate_bps": rate, "step_s": step * f})
    return recs


@pytest.mark.timeout(10)
def test_holdout_predicts_unseen_rate_from_the_others():
    alpha, eta = 3e-3, 0.9
    recs = _synthetic(alpha, eta, (1e8, 1e9, 1e10))
    out = holdout(recs)
    assert [o["measured_s"] for o in out] == [r["step_s"] for r in recs]
    assert {o["group"] for o in out} == {1e8, 1e9, 1e10}
    for o, r in zip(out, recs):
        assert o["group"] == r["rate_bps"]
        assert abs(o["rel_err"]) < 1e-6
        assert o["alpha_s"] == pytest.approx(alpha, rel=1e-6) and o["efficiency"] == pytest.approx(eta, rel=1e-6)
    # a model that misses a per-step overhead is caught on the held-out rate, not hidden by the fit
    biased = [dict(r, step_s=r["step_s"] + (0.5 if r["method"] == "fp32" else 0.0)) for r in recs]
    assert max(abs(o["rel_err"]) for o in holdout(biased)) > 0.05
    with pytest.raises(ConfigError):
        holdout([r for r in recs if r["rate_bps"] == 1e9])


@pytest.mark.timeout(10)
def test_fit_standard_errors():
    alpha, eta = 3e-3, 0.9
    exact = fit(_synthetic(alpha, eta, (1e8, 1e9)))
    assert set(exact.stderr) == {"alpha_s", "inv_efficiency"}
    assert exact.stderr["alpha_s"] < 1e-9 * alpha + 1e-15
    noisy = fit(_synthetic(alpha, eta, (1e8, 1e9), noise=0.05))
    assert noisy.stderr["alpha_s"] > 0 and noisy.stderr["inv_efficiency"] > 0
    assert abs(noisy.alpha_s - alpha) < 5 * noisy.stderr["alpha_s"]
    assert abs(1 / noisy.efficiency - 1 / eta) < 5 * noisy.stderr["inv_efficiency"]
    with_t0 = fit(_synthetic(alpha, eta, (1e8, 1e9), noise=0.05), intercept=True)
    assert set(with_t0.stderr) == {"alpha_s", "inv_efficiency", "t0_s"}
    # as many records as coefficients: no residual degrees of freedom, no standard errors
    two = _synthetic(alpha, eta, (1e8, 1e9))[:2]
    assert fit(two).stderr == {}
