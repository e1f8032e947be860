"""The model every client and the server hold, the task data, and evaluation."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.sim.config import FedConfig, mix_seed

__all__ = ["build_model", "trainable", "load_task_data", "evaluate", "set_params", "batch_of"]


def build_model(cfg: FedConfig) -> nn.Module:
    """The preset's model, or a random-init BERT from ``cfg.model_config``. Whatever is randomly
    initialized (all of it, or a pretrained preset's new classifier head) is seeded by cfg.seed, so
    every call gives the same model. Parameters under ``cfg.freeze`` get ``requires_grad=False``."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(mix_seed(cfg.seed, 13))
        if cfg.model_config:
            from transformers import BertConfig, BertForSequenceClassification

            model = BertForSequenceClassification(BertConfig(num_labels=cfg.num_labels, **cfg.model_config))
        else:
            from lowbit.models.presets import load_preset

            model = load_preset(cfg.model, num_labels=cfg.num_labels)[0]
    finally:
        torch.random.set_rng_state(state)
    prefixes = tuple(cfg.freeze)
    if prefixes:
        names = [n for n, _ in model.named_parameters()]
        for pre in prefixes:
            if not any(n.startswith(pre) for n in names):
                raise ConfigError(f"freeze prefix {pre!r} matches no parameter of the model")
        for n, p in model.named_parameters():
            if n.startswith(prefixes):
                p.requires_grad_(False)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"freeze {prefixes!r} leaves no parameter to train")
    return model


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the parameters that train and cross the links, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def load_task_data(cfg: FedConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Tokenized (train subset, dev subset) of ``cfg.task``."""
    from lowbit.train.data import encode, load_glue_tsv, subset

    if cfg.model_config:
        from transformers import AutoTokenizer

        from lowbit.models.presets import minilm_path
        tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    else:
        from lowbit.models.presets import load_preset
        tok = load_preset(cfg.model, num_labels=cfg.num_labels)[1]
    out = []
    for split, n in (("train", cfg.train_subset), ("dev", cfg.eval_subset)):
        sents, labels = load_glue_tsv(cfg.task, split)
        idx = subset(n, cfg.seed, len(sents))
        out.append(encode(tok, [sents[i] for i in idx], [labels[i] for i in idx], cfg.max_len))
    return out[0], out[1]


def batch_of(data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in data.items()}


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor], batch: int = 128) -> dict[str, float]:
    model.eval()
    n = len(data["labels"])
    correct, loss = 0, 0.0
    for i in range(0, n, batch):
        b = {k: v[i:i + batch] for k, v in data.items()}
        out = model(**b)
        loss += float(out.loss) * len(b["labels"])
        correct += int((out.logits.argmax(-1) == b["labels"]).sum())
    return {"accuracy": correct / max(1, n), "eval_loss": loss / max(1, n)}


def set_params(model: nn.Module, tensors: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for (_, p), t in zip(trainable(model), tensors):
            p.copy_(t.reshape(p.shape))
