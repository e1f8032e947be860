import torch
import torch.nn.functional as F
from torch import nn

from lowbit.models import QuantEmbedding, QuantLinear
from lowbit.models.q8bert import SymmetricMaxWeightQuant
from lowbit.models.ternarybert import TernaryWeightQuant
from lowbit.quant.acts import MinMaxActQuant
from lowbit.quant.ternary import ternarize_twn


def test_quantlinear_disabled_is_linear_and_copies_weights():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    q = QuantLinear.from_float(lin, TernaryWeightQuant("twn"), MinMaxActQuant(8))
    x = torch.randn(3, 16)
    q.enabled = False
    assert torch.equal(q(x), lin(x))
    q.enabled = True
    y = q(x)
    assert not torch.allclose(y, lin(x))
    # forward = F.linear(act_q(x), Q(w), b)
    ref = F.linear(MinMaxActQuant(8)(x), ternarize_twn(lin.weight.detach()).dequantize(), lin.bias)
    torch.testing.assert_close(y, ref)
    # copies, not shares
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert not torch.equal(q.weight, lin.weight)


def test_ste_gradient_reaches_latent_weight():
    torch.manual_seed(0)
    q = QuantLinear(16, 8, weight_quant=TernaryWeightQuant("twn"))
    x = torch.randn(5, 16)
    q(x).pow(2).sum().backward()
    # straight-through: dL/dw = dL/dŵ = (2·y)ᵀ x evaluated at ŵ
    w_hat = q.quantized_state().dequantize()
    y = F.linear(x, w_hat, q.bias)
    torch.testing.assert_close(q.weight.grad, (2 * y).t() @ x)
    assert q.weight.grad.abs().sum() > 0


def test_quant_embedding_ternary_and_grad():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 12, padding_idx=0)
    q = QuantEmbedding.from_float(emb, TernaryWeightQuant("twn", per_row=True))
    ids = torch.tensor([[1, 2, 3, 0]])
    out = q(ids)
    st = q.quantized_state()
    assert st.per_row and st.scale.shape == (50,)
    torch.testing.assert_close(out[0], st.dequantize()[ids[0]])
    out.sum().backward()
    assert q.weight.grad[1].abs().sum() > 0 and q.weight.grad[10].abs().sum() == 0
    for row in st.dequantize():
        assert row.unique().numel() <= 3


def test_cache_follows_optimizer_updates():
    torch.manual_seed(0)
    q = QuantLinear(8, 8, weight_quant=SymmetricMaxWeightQuant(8))
    a = q.quantized_state()
    assert q.quantized_state() is a  # cached while the weight is unchanged
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    q(torch.randn(4, 8)).sum().backward()
    opt.step()
    b = q.quantized_state()
    assert b is not a and not torch.equal(b.dequantize(), a.dequantize())
