"""Which codec each parameter travels with, and how parameters are cut into pieces.

A *piece* is the unit that travels and is owned: a whole parameter, or a block of rows of a large
one (``CodecConfig.max_piece_numel``), so that one huge tensor (a 30522-row word embedding is half
of MiniLM) does not land on a single owner. Keys number the pieces in ``model.named_parameters()``
order; they are identical on every rank because every rank builds the same architecture. Each
piece has its own scale(s) and its own clipping σ."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.codec.codecs import StochasticGradCodec, grad_codec, weight_codec
from lowbit.codec.entropy import EntropyCodec
from lowbit.codec.sparse import RowSparseCodec
from lowbit.codec.threshold import ThresholdGradCodec
from lowbit.train.config import CodecConfig


GRID_CODECS = (StochasticGradCodec, ThresholdGradCodec)  # gradient codecs of symmetric-grid frames


@dataclass(frozen=True)
class ParamSpec:
    key: int
    name: str  # parameter name, with [start:stop] when the piece is a block of rows
    shape: tuple[int, ...]  # the piece's shape
    group: str  # transformer | embedding | head | small
    w_codec: object
    g_codec: object
    param: int = 0  # index of the parameter in model.named_parameters()
    rows: tuple[int, int] | None = None  # the block of rows, None for the whole parameter

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """This piece of a full parameter (or gradient) tensor: a view, no copy."""
        return t if self.rows is None else t[self.rows[0]:self.rows[1]]

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
    """The pieces of ``model`` and their codecs. Weight widths come from the group (``w_bits``,
    ``embed_bits``, ``head_bits``, ``small_bits``), or, for a model wrapped with a scheme for training
    (:func:`lowbit.train.loop.build_model`), from the scheme: the bits its weight quantizer gave each
    parameter, fp32 for the parameters it keeps full precision."""
    bits_for = {"transformer": cfg.w_bits, "embedding": cfg.embed_bits, "head": cfg.head_bits,
                "small": cfg.small_bits}
    scheme_bits = getattr(model, "_lowbit_scheme_bits", None)
    plan: list[ParamSpec] = []
    for index, (name, p) in enumerate(model.named_parameters()):
        group = param_group(name, p)
        wb = bits_for[group] if scheme_bits is None else scheme_bits.get(name, 32)
        scheme = cfg.w_scheme if group == "transformer" else "laq-linear"
        if wb == 1:
            scheme = "binary"
        wc = weight_codec(wb, scheme=scheme, per_row=cfg.per_row, hold=cfg.scale_hold)
        gb = cfg.small_g_bits if group == "small" else cfg.g_bits
        gc = grad_codec(gb, clip=cfg.clip, nonfinite=cfg.nonfinite)
        if group != "small" and cfg.g_scheme == "threshold":
            gc = ThresholdGradCodec(cfg.g_threshold, cfg.nonfinite)
        if group == "embedding" and cfg.sparse_embeddings and isinstance(gc, GRID_CODECS):
            gc = RowSparseCodec(gc)  # a batch touches a few rows: the zero ones are not sent
        elif cfg.entropy_grads and isinstance(gc, GRID_CODECS):
            gc = EntropyCodec(gc)  # the codes in about their entropy
        for rows in row_blocks(tuple(p.shape), cfg.max_piece_numel):
            shape = tuple(p.shape) if rows is None else (rows[1] - rows[0],) + tuple(p.shape[1:])
            piece_name = name if rows is None else f"{name}[{rows[0]}:{rows[1]}]"
            plan.append(ParamSpec(len(plan), piece_name, shape, group, wc, gc, index, rows))
    return plan


def row_blocks(shape: tuple[int, ...], max_numel: int) -> list[tuple[int, int] | None]:
    """Equal blocks of rows, each at most ``max_numel`` elements (0 = never split, 1-D never split)."""
    n = 1
    for s in shape:
        n *= s
    if not max_numel or len(shape) < 2 or n <= max_numel:
        return [None]
    pieces = -(-n // max_numel)
    rows = shape[0]
    bounds = [rows * i // pieces for i in range(pieces + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def piece_tensors(model: nn.Module, plan: list[ParamSpec]) -> dict[int, torch.Tensor]:
    """key -> the (detached) piece of the model's current parameters."""
    params = [p.detach() for _, p in model.named_parameters()]
    return {s.key: s.view(params[s.param]) for s in plan}


def assemble(plan: list[ParamSpec], pieces: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Pieces back to whole parameters: param index -> tensor."""
    by_param: dict[int, list[ParamSpec]] = {}
    for s in plan:
        by_param.setdefault(s.param, []).append(s)
    return {i: pieces[ss[0].key] if ss[0].rows is None else torch.cat([pieces[s.key] for s in ss])
            for i, ss in by_param.items()}


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
