"""A training run's final weights as a packed file: exactly the weight frames its workers decoded.

    lowbit export --from runs/x [--step N] --out model.safetensors

The owners' checkpoint at step N (default: the latest one that verifies) is loaded into one
:class:`ShardServer` over every piece, which re-derives the quantized weights sent after that step
(the same fp32 weights, Adam curvature and LAQ warm starts: what a resumed run sends its workers).
A run trained with ``--scheme`` records it, with worker 0's activation ranges where the scheme
keeps any (Q8BERT), so the loaded model is wrapped and runs as the workers ran.
The file holds those frames as they travel (codes at their bits, scales, CRC) with the model's
transformers config and the parameter rows each frame fills, in the ``lowbit-packed/1`` format;
:func:`lowbit.models.load_packed` rebuilds the model, decoding each frame with the function the
workers use, so predictions are bit-identical to the last worker's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lowbit.errors import ConfigError
from lowbit.models.export import FORMAT, default_mode
from lowbit.train.checkpoint import Checkpointer
from lowbit.train.config import Config
from lowbit.train.loop import load_scheme_buffers, scheme_buffers
from lowbit.train.model import build_model
from lowbit.train.plan import make_plan, piece_tensors
from lowbit.train.server import ShardServer

__all__ = ["export_run"]


def export_run(run: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> dict:
    """Write run ``run``'s weights at ``step`` (default: its latest verified checkpoint) to ``out``;
    returns {path, bytes, fp32_bytes, step, pieces}."""
    from safetensors.torch import save_file

    run = Path(run)
    if not (run / "config.json").is_file():
        raise ConfigError(f"{str(run)!r} is not a lowbit run folder (no config.json)")
    cfg = Config.from_dict(json.loads((run / "config.json").read_text())).validate()
    ck = Checkpointer(run)
    if step is None:
        rp = ck.resume_point()
        if rp.step is None:
            raise ConfigError(f"{run} holds no checkpoint that verifies ({'; '.join(rp.skipped) or 'none written'})")
        step = rp.step
    else:
        ck.verify(step)
    model, _ = build_model(cfg)
    plan = make_plan(model, cfg.codec)
    owner = ShardServer(plan, piece_tensors(model, plan), cfg.optim, total_steps=cfg.run.steps)
    owner.load(ck.shard_files(step))
    frames = owner.weight_frames(step)
    names = [n for n, _ in model.named_parameters()]
    tensors = {f"frame.{k}": torch.frombuffer(bytearray(b), dtype=torch.uint8) for k, b in frames.items()}
    if scheme_buffers(model):  # activation ranges (Q8BERT's EMA) live on the workers: worker 0's
        state = ck.worker_path(step, 0)
        if not state.is_file():
            raise ConfigError(f"{state} is missing: the run's activation ranges are kept by its workers")
        tensors.update({f"buffer.{n}": t for n, t in load_scheme_buffers(state).items()})
    pieces = [{"key": s.key, "param": names[s.param], "rows": list(s.rows) if s.rows else None} for s in plan]
    meta = {"format": FORMAT, "architecture": type(model).__name__,
            "config": model.config.to_json_string(use_diff=False), "scheme": json.dumps({"name": cfg.codec.scheme}),
            "frames": json.dumps(pieces),
            "run": json.dumps({"step": step, "w_bits": cfg.codec.w_bits, "embed_bits": cfg.codec.embed_bits,
                               "head_bits": cfg.codec.head_bits, "small_bits": cfg.codec.small_bits,
                               "w_scheme": cfg.codec.w_scheme})}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    default_mode(out)
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    return {"path": str(out), "bytes": out.stat().st_size, "fp32_bytes": fp32, "step": step, "pieces": len(plan)}
