"""The model every rank builds: the same preset and seed everywhere, optionally wrapped by a scheme
for low-bit weights."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowbit.train.config import Config

__all__ = ["build_model"]


def build_model(cfg: Config):
    """The model every rank starts from: the same seed everywhere, the dropout override applied, and
    with ``codec.scheme`` wrapped for low-bit weights (the scheme's activation quantizers, no weight
    quantizer: the owners send the weights already quantized; :func:`lowbit.models.wrap_low_bit`)."""
    from lowbit.models.presets import load_preset

    torch.manual_seed(cfg.run.seed)
    model, tokenizer = load_preset(cfg.run.model, num_labels=2)
    if cfg.run.dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.run.dropout
    if cfg.codec.scheme != "none":
        from lowbit.models.registry import wrap_low_bit

        model._lowbit_scheme_bits = wrap_low_bit(model, cfg.codec.scheme)
    return model, tokenizer
