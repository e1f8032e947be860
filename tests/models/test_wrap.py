import copy

import pytest
import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models import (QuantEmbedding, QuantLinear, Scheme, attach_optimizer, register_scheme,
                           set_quant_enabled, wrap)
from lowbit.quant.ternary import binarize, ternarize_lat



def _outs(model, batch):
    with torch.no_grad():
        o = model(**batch, output_hidden_states=True)
    return o.logits, o.hidden_states


@pytest.mark.parametrize("preset", ["tiny", "tiny_roberta"])
@pytest.mark.parametrize("scheme", ["ternarybert", "q8bert"])
def test_disabled_quantizers_match_original(preset, scheme, request, batch_of):
    model, tok = request.getfixturevalue(preset)
    model = copy.deepcopy(model).eval()
    batch = batch_of(tok)
    ref_logits, ref_hidden = _outs(model, batch)
    wrapped = wrap(copy.deepcopy(model), scheme).eval()
    assert any(isinstance(m, QuantLinear) for m in wrapped.modules())
    assert any(isinstance(m, QuantEmbedding) for m in wrapped.modules())
    set_quant_enabled(wrapped, False)
    logits, hidden = _outs(wrapped, batch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(hidden, ref_hidden):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    set_quant_enabled(wrapped, True)
    q_logits, _ = _outs(wrapped, batch)
    assert (q_logits - ref_logits).abs().max() > 1e-4


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("method", ["twn", "lat"])
def test_ternary_weights_take_three_values_per_scale_group(fresh, per_row, method):
    model, _ = fresh
    wrap(model, "ternarybert", method=method, per_row=per_row)
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding)) and m.weight_quant]
    assert len(layers) == 2 * 6 + 1 + 1  # 6 linears per layer, pooler, word embedding
    for m in layers:
        w = m.quantized_state().dequantize()
        groups = w if per_row else w.reshape(1, -1)
        for g in groups:
            assert g.unique().numel() <= 3
    assert model.classifier.__class__ is nn.Linear  # task head stays fp32
    assert type(model.bert.embeddings.position_embeddings) is nn.Embedding


def test_q8bert_weights_take_at_most_256_values_and_ema_ranges(fresh):
    model, batch = fresh
    wrap(model, "q8bert")
    n = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and m.weight_quant is not None:
            q = m.quantized_state()
            assert q.bits == 8 and q.dequantize().unique().numel() <= 256
            # S = 127 / max|W|: the extreme weight lands on ±127 exactly
            torch.testing.assert_close(q.dequantize().abs().max(), m.weight.detach().abs().max())
            n += 1
    assert n == 2 * 6 + 1 + 3  # linears, pooler, word/position/token-type embeddings
    lin = model.bert.encoder.layer[0].attention.self.query
    assert float(lin.act_quant.running_max) == 0.0
    model.train()
    model(**batch)
    assert float(lin.act_quant.running_max) > 0.0


@pytest.mark.parametrize("bits,wb,eb", [("2-2-8", 2, 2), ("2-8-8", 2, 8), ("8-8-8", 8, 8)])
def test_wea_bits(fresh, bits, wb, eb):
    model, _ = fresh
    wrap(model, "ternarybert", bits=bits)
    assert model.bert.encoder.layer[0].output.dense.quantized_state().bits == wb
    assert model.bert.embeddings.word_embeddings.quantized_state().bits == eb
    assert model.bert.encoder.layer[0].attention.self.lowbit_matmul_quant["p"].bits == 8


def test_gradients_flow_to_latent_weights(fresh):
    model, batch = fresh
    wrap(model, "ternarybert")
    model.train()
    labels = torch.tensor([1, 0, 0, 1])
    out = model(**batch, labels=labels)
    out.loss.backward()
    q = model.bert.encoder.layer[1].attention.self.key
    emb = model.bert.embeddings.word_embeddings
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    before = q.weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, q.weight)


def test_lat_uses_adam_second_moment(fresh):
    model, batch = fresh
    wrap(model, "ternarybert", method="lat")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    attach_optimizer(model, opt)
    model.train()
    model(**batch, labels=torch.tensor([1, 0, 0, 1])).loss.backward()
    opt.step()
    lin = model.bert.encoder.layer[0].intermediate.dense
    d = opt.state[lin.weight]["exp_avg_sq"].sqrt() + 1e-8
    expect = ternarize_lat(lin.weight.detach(), d=d)
    got = lin.quantized_state()
    assert torch.equal(got.codes, expect.codes) and torch.equal(got.scale, expect.scale)


def test_custom_scheme_is_one_function(fresh):
    model, batch = fresh

    class Bin:
        def __call__(self, w):
            return binarize(w.detach())

    @register_scheme("test-binary")
    def _factory(**opts):
        return Scheme("test-binary", linear=lambda n, m: None if "classifier" in n else (Bin(), None),
                      embedding=lambda n, m: None, options=opts)

    wrap(model, "test-binary")
    w = model.bert.encoder.layer[0].output.dense.quantized_state().dequantize()
    assert w.unique().numel() == 2
    assert model._lowbit_scheme["name"] == "test-binary"


def test_unsupported_model_type_names_it():
    from transformers import GPT2Config, GPT2Model
    m = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=16))
    with pytest.raises(ConfigError, match="gpt2"):
        wrap(m, "ternarybert")


def test_unsupported_module_names_it():
    from transformers.pytorch_utils import Conv1D
    m = nn.Sequential(nn.Linear(4, 4), Conv1D(4, 4))
    with pytest.raises(ConfigError, match="Conv1D"):
        wrap(m, "q8bert")


def test_model_without_linear_and_unknown_scheme(fresh):
    with pytest.raises(ConfigError, match="no nn.Linear"):
        wrap(nn.Sequential(nn.LayerNorm(4)), "q8bert")
    model, _ = fresh
    with pytest.raises(ConfigError, match="nope"):
        wrap(model, "nope")
    with pytest.raises(ConfigError, match="ternary method"):
        wrap(model, "ternarybert", method="xyz")
    wrap(model, "q8bert")
    with pytest.raises(ConfigError, match="already wrapped"):
        wrap(model, "q8bert")
