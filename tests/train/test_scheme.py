"""lowbit train --scheme: workers run the model wrapped by the scheme around the low-bit weights the
owners send; the scheme sets each tensor's width on the wire."""
import pytest
import torch

from lowbit.cli import main
from lowbit.models import wrap
from lowbit.models.layers import QuantEmbedding, QuantLinear
from lowbit.models.presets import load_preset
from lowbit.testing import tiny_config
from lowbit.train.loop import build_model
from lowbit.train.plan import make_plan


def _widths(scheme):
    cfg = tiny_config("unused", {"codec": {"scheme": scheme}})
    model, _ = build_model(cfg)
    return model, {s.name: getattr(s.w_codec, "bits", 32) for s in make_plan(model, cfg.codec)}


@pytest.mark.timeout(60)
def test_ternarybert_widths_follow_the_paper():
    _, w = _widths("ternarybert")
    assert w["bert.encoder.layer.0.attention.self.query.weight"] == 2
    assert w["bert.encoder.layer.1.output.dense.weight"] == 2
    assert all(b == 2 for n, b in w.items() if n.startswith("bert.embeddings.word_embeddings.weight"))
    for fp in ("bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight",
               "bert.embeddings.LayerNorm.weight", "bert.encoder.layer.0.attention.self.query.bias",
               "classifier.weight", "classifier.bias"):
        assert w[fp] == 32, fp


@pytest.mark.timeout(60)
def test_q8bert_widths_are_8_bit_but_the_classifier():
    _, w = _widths("q8bert")
    assert w["bert.encoder.layer.0.attention.self.query.weight"] == 8
    assert w["bert.embeddings.position_embeddings.weight"] == 8
    assert w["classifier.weight"] == 32 and w["bert.embeddings.LayerNorm.weight"] == 32


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme", ["ternarybert", "q8bert"])
def test_worker_forward_equals_the_wrapped_model_at_the_same_codes(scheme):
    """The single-process wrapped model quantizes its weights on the fly; a worker holds exactly those
    quantized values (decoded from the owners' frames) and no weight quantizer. Same logits."""
    torch.manual_seed(0)
    ref, tok = load_preset("tiny-bert", num_labels=2)
    wrap(ref, scheme)
    ref.eval()
    worker, _ = build_model(tiny_config("unused", {"codec": {"scheme": scheme}}))
    worker.eval()
    quantized = {f"{n}.weight": m.quantized_state() for n, m in ref.named_modules()
                 if isinstance(m, (QuantLinear, QuantEmbedding)) and m.quantized_state() is not None}
    with torch.no_grad():
        sd = ref.state_dict()
        for n, p in worker.named_parameters():
            p.copy_(quantized[n].dequantize() if n in quantized else sd[n])
    batch = tok(["a fine film", "dull and far too long"], padding="max_length", max_length=16,
                return_tensors="pt")
    with torch.no_grad():
        ref.train()
        ref(**batch)  # sets Q8BERT's EMA activation ranges; a worker keeps its own, here the same
        ref.eval()
        for n, b in worker.named_buffers():
            b.copy_(dict(ref.named_buffers())[n])
        assert torch.equal(ref(**batch).logits, worker(**batch).logits)
    # the worker keeps no full-precision copy and no quantizer of its weights
    for n, m in worker.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            assert m.weight_quant is None and m._qcache is None, n
    shapes = [tuple(t.shape) for t in worker.state_dict().values()]
    for n in quantized:
        assert shapes.count(tuple(dict(worker.named_parameters())[n].shape)) >= 1
    assert sum(t.numel() for t in worker.state_dict().values()) < 1.01 * sum(
        p.numel() for p in load_preset("tiny-bert", num_labels=2)[0].state_dict().values())


@pytest.mark.timeout(60)
def test_scheme_on_an_unsupported_model_fails_before_any_rank_starts(tmp_path, capsys):
    rc = main(["train", "--model", "GPT2Config", "--scheme", "ternarybert", "--steps", "1", "--out",
               str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--scheme ternarybert" in err and "'gpt2'" in err
    assert not (tmp_path / "run" / "logs").exists()
    with pytest.raises(SystemExit) as e:  # argparse: not one of the choices
        main(["train", "--scheme", "lsq", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'lsq'" in capsys.readouterr().err
