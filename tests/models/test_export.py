import os

import pytest
import torch
from safetensors import safe_open

from lowbit.errors import ConfigError
from lowbit.models import export_packed, load_packed, load_preset, wrap
from lowbit.models.presets import minilm_path



def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("scheme,opts", [("ternarybert", {}), ("ternarybert", {"method": "lat", "per_row": True}),
                                         ("ternarybert", {"bits": "2-8-8"}), ("q8bert", {})])
def test_round_trip_tiny(fresh, tmp_path, scheme, opts):
    model, batch = fresh
    wrap(model, scheme, **opts)
    model.train()
    model(**batch)  # Q8BERT: sets EMA activation ranges, which must travel with the file
    model.eval()
    want = _logits(model, batch)
    path = tmp_path / "m.safetensors"
    size = export_packed(model, path)
    assert size == os.path.getsize(path)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "bert.encoder.layer.0.attention.self.query.weight.__codes" in keys
    assert "bert.encoder.layer.0.attention.self.query.weight" not in keys
    assert "classifier.weight" in keys and "bert.embeddings.LayerNorm.weight" in keys
    assert meta["architecture"] == "BertForSequenceClassification"
    loaded = load_packed(path)
    got = _logits(loaded, batch)
    assert torch.equal(got, want)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_fp16_storage_and_errors(fresh, tmp_path):
    model, batch = fresh
    with pytest.raises(ConfigError, match="not wrapped"):
        export_packed(model, tmp_path / "x.safetensors")
    wrap(model, "ternarybert")
    s32 = export_packed(model, tmp_path / "a.safetensors")
    s16 = export_packed(model, tmp_path / "b.safetensors", fp_dtype=torch.float16)
    assert s16 < s32
    torch.testing.assert_close(_logits(load_packed(tmp_path / "b.safetensors"), batch), _logits(model, batch),
                               atol=5e-2, rtol=0)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ConfigError, match="not a lowbit packed"):
        load_packed(tmp_path / "plain.safetensors")


def test_minilm_ternary_export_is_small_and_round_trips(tmp_path, batch_of):
    model, tok = load_preset("minilm")
    model.eval()
    batch = batch_of(tok, n=6, max_len=24)
    wrap(model, "ternarybert")
    want = _logits(model, batch)
    size = export_packed(model, tmp_path / "minilm.safetensors")
    fp32 = os.path.getsize(minilm_path() / "model.safetensors")
    assert fp32 > 80e6
    assert fp32 / size > 12, (fp32, size)
    got = _logits(load_packed(tmp_path / "minilm.safetensors"), batch)
    assert torch.equal(got, want)
