"""Which codec each parameter travels with. Keys are positions in ``model.named_parameters()``,
identical on every rank because every rank builds the same architecture."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.codec.codecs import grad_codec, weight_codec
from lowbit.train.config import CodecConfig


@dataclass(frozen=True)
class ParamSpec:
    key: int
    name: str
    shape: tuple[int, ...]
    group: str  # transformer | embedding | head | small
    w_codec: object
    g_codec: object

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def param_group(name: str, p: torch.Tensor) -> str:
    """transformer (2-D weights inside the encoder), embedding (2-D ``*embeddings*`` tables),
    head (classifier / pooler matrices), small (1-D: LayerNorm, biases)."""
    if p.dim() < 2:
        return "small"
    if "embeddings" in name:
        return "embedding"
    if name.startswith("classifier") or ".pooler." in name or name.startswith("pooler") \
            or "lm_head" in name or "score" in name.split(".")[0]:
        return "head"
    return "transformer"


def make_plan(model: nn.Module, cfg: CodecConfig) -> list[ParamSpec]:
    bits_for = {"transformer": cfg.w_bits, "embedding": cfg.embed_bits, "head": cfg.head_bits,
                "small": cfg.small_bits}
    plan = []
    for key, (name, p) in enumerate(model.named_parameters()):
        group = param_group(name, p)
        wb = bits_for[group]
        scheme = cfg.w_scheme if group == "transformer" else "laq-linear"
        if wb == 1:
            scheme = "binary"
        wc = weight_codec(wb, scheme=scheme, per_row=cfg.per_row)
        gb = cfg.small_g_bits if group == "small" else cfg.g_bits
        gc = grad_codec(gb, clip=cfg.clip, nonfinite=cfg.nonfinite)
        plan.append(ParamSpec(key, name, tuple(p.shape), group, wc, gc))
    return plan


def plan_bytes(plan: list[ParamSpec]) -> dict[str, int]:
    """Frame bytes of one full gradient and one full weight set, and the fp32 equivalents."""
    from lowbit.codec.codecs import RawCodec

    raw = RawCodec()
    return {
        "grad_frames": sum(s.g_codec.frame_nbytes(s.shape) for s in plan),
        "weight_frames": sum(s.w_codec.frame_nbytes(s.shape) for s in plan),
        "fp32_frames": sum(raw.frame_nbytes(s.shape) for s in plan),
        "numel": sum(s.numel for s in plan),
    }
