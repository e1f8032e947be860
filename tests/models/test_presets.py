import os

import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.models import load_preset


def test_presets_offline(tiny, tiny_roberta):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model, tok = tiny
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (128, 2, 2, 256)
    assert cfg.vocab_size == tok.vocab_size == 30522
    assert tiny_roberta[0].config.model_type == "roberta"


def test_tiny_is_deterministic_and_config_class_names():
    a, _ = load_preset("tiny-bert")
    b, _ = load_preset("BertConfig")
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))
    m, _ = load_preset("RobertaConfig", num_labels=3)
    assert m.config.model_type == "roberta" and m.config.num_labels == 3


def test_local_directory_and_unknown(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    loaded, tok2 = load_preset(str(tmp_path / "m"))
    assert loaded.config.hidden_size == 128 and tok2.vocab_size == tok.vocab_size
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_preset("no-such-model")


def test_truncated_minilm_keeps_the_first_layers():
    full, tok = load_preset("minilm")
    two, tok2 = load_preset("minilm-l2")
    assert len(two.bert.encoder.layer) == two.config.num_hidden_layers == 2
    assert tok2.vocab_size == tok.vocab_size
    sd = full.state_dict()
    kept = {k: v for k, v in two.state_dict().items() if not k.startswith("classifier")}
    assert any(k.startswith("bert.encoder.layer.1.") for k in kept)
    assert not any(k.startswith("bert.encoder.layer.2.") for k in kept)
    for k, v in kept.items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_preset("minilm-l7")
