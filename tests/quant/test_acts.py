import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError
from lowbit.quant import (
    EMASymmetricActQuant,
    MinMaxActQuant,
    QuantizeSTE,
    fake_quant_minmax,
    fake_quant_symmetric,
    quantize_ste,
    round_ste,
    ste,
)


@settings(deadline=None, max_examples=50)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 100), bits=st.integers(2, 8), shift=st.floats(-5, 5))
def test_minmax_levels_and_error(seed, n, bits, shift):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) + shift
    y = fake_quant_minmax(x, bits)
    s = float(x.max() - x.min()) / (2 ** bits - 1)
    assert y.unique().numel() <= 2 ** bits
    if s > 0:
        assert float((y - x).abs().max()) <= s * (1 + 1e-4) + 1e-6


def test_minmax_constant_and_grad():
    c = torch.full((4,), 2.5)
    assert torch.equal(fake_quant_minmax(c), c)
    x = torch.randn(10, requires_grad=True)
    fake_quant_minmax(x, 4).mul(torch.arange(10.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(10.0))
    m = MinMaxActQuant(bits=8, enabled=False)
    assert m(x) is x


def test_symmetric_formula_and_clipped_ste():
    x = torch.tensor([-3.0, -0.5, 0.26, 1.0, 2.0], requires_grad=True)
    y = fake_quant_symmetric(x, bits=3, max_abs=1.0)  # M = 3, S = 3
    want = torch.tensor([-1.0, -2 / 3, 1 / 3, 1.0, 1.0])
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    z = torch.randn(50)
    assert fake_quant_symmetric(z, 8).abs().max() <= z.abs().max() + 1e-6
    zero = torch.zeros(3)
    assert torch.equal(fake_quant_symmetric(zero), zero)


def test_ema_updates_only_in_training():
    q = EMASymmetricActQuant(bits=8, momentum=0.9)
    q.train()
    q(torch.tensor([1.0, -2.0]))
    assert float(q.running_max) == pytest.approx(2.0)
    q(torch.tensor([4.0]))
    assert float(q.running_max) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    r = float(q.running_max)
    q.eval()
    y = q(torch.tensor([10.0, 0.5]))
    assert float(q.running_max) == r
    assert float(y[0]) == pytest.approx(r)  # saturates at the stored range
    sd = q.state_dict()
    assert set(sd) == {"running_max", "initialized"}


def test_ema_eval_before_training_uses_batch_max_and_grad_passes():
    q = EMASymmetricActQuant(bits=8).eval()
    x = torch.randn(20, requires_grad=True)
    y = q(x)
    assert not bool(q.initialized)
    assert float((y - x).detach().abs().max()) <= float(x.detach().abs().max()) / 127 / 2 * 1.001
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(20))


def test_ste_helpers():
    x = torch.tensor([0.4, 1.6, -2.5], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == torch.round(x.detach()).tolist()
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    w = torch.randn(5, dtype=torch.bfloat16, requires_grad=True)
    wq = torch.sign(w.detach().float())
    out = ste(w, wq)
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), wq)
    (out.float() * 3).sum().backward()
    assert torch.equal(w.grad.float(), torch.full((5,), 3.0))
    v = torch.tensor([-2.0, 0.3, 2.0], requires_grad=True)
    QuantizeSTE.apply(v, torch.round, -1.0, 1.0).sum().backward()
    assert v.grad.tolist() == [0.0, 1.0, 0.0]
    u = torch.tensor([-2.0, 0.3], requires_grad=True)
    quantize_ste(u, torch.sign).sum().backward()
    assert u.grad.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("bits", [0, 1, 17])
def test_bad_act_configs(bits):
    with pytest.raises(ConfigError, match=f"got {bits}"):
        fake_quant_minmax(torch.randn(3), bits)
    with pytest.raises(ConfigError, match=f"got {bits}"):
        EMASymmetricActQuant(bits=bits)
    with pytest.raises(ConfigError, match="momentum"):
        EMASymmetricActQuant(momentum=1.0)
