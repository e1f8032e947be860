"""Distillation inside distributed training (TernaryBERT, Zhang et al. EMNLP 2020): a worker's loss
is the distance of its low-bit model to a full-precision teacher instead of (or besides) the labels.

    --teacher DIR|RUN --distill workers    the teacher runs on every worker; loss = Σ_k w_k·L_k over
                                           logits (soft cross-entropy at T), hidden (MSE of every
                                           layer's hidden states) and attention (MSE of every
                                           layer's pre-softmax scores), plus label (hard CE)
    --teacher DIR|RUN --distill logits     the teacher's logits over the training set are computed
                                           once, before the ranks start, and cached in
                                           OUT/teacher_logits.safetensors: workers hold no fp32
                                           model at all (logit and label terms only)

A teacher is a model folder (config.json + weights, e.g. ``save_pretrained``'s) or a ``lowbit
train`` run folder (its owners' fp32 weights at the latest checkpoint that verifies, e.g. of a
``--w-bits 32 --g-bits 32`` run).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models.ternarybert import distill_losses, install_lowbit_attention, soft_cross_entropy
from lowbit.train.config import parse_weights

__all__ = ["parse_weights", "load_teacher", "check_teacher", "TeacherLoss", "CachedLogitLoss", "cache_logits",
           "make_distiller", "LOGITS_FILE"]

LOGITS_FILE = "teacher_logits.safetensors"


def load_teacher(path: str, num_labels: int = 2) -> nn.Module:
    """The teacher in eval mode, from a model folder or a lowbit run folder (fp32 owner weights)."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"--teacher {path!r} is not a folder (a model folder or a lowbit run folder)")
    if (p / "ckpt").is_dir():
        from lowbit.train.checkpoint import Checkpointer
        from lowbit.train.config import Config
        from lowbit.train.model import build_model
        from lowbit.train.plan import assemble, make_plan

        tcfg = Config.from_dict(json.loads((p / "config.json").read_text()))
        tcfg.codec.scheme = "none"  # the owners' fp32 weights, whatever the run's workers held
        ck = Checkpointer(p)
        rp = ck.resume_point()
        if rp.step is None:
            raise ConfigError(f"--teacher {path!r}: no checkpoint that verifies")
        model, _ = build_model(tcfg)
        plan = make_plan(model, tcfg.codec)
        whole = assemble(plan, ck.weights(rp.step))
        with torch.no_grad():
            for i, (_, prm) in enumerate(model.named_parameters()):
                prm.copy_(whole[i].reshape(prm.shape))
    elif (p / "config.json").is_file():
        from lowbit.models.presets import load_preset

        conf = json.loads((p / "config.json").read_text())
        labels = conf.get("num_labels") or len(conf.get("id2label") or {}) or num_labels
        model = load_preset(str(p), num_labels=labels)[0]  # the teacher's own head, checked against the student
    else:
        raise ConfigError(f"--teacher {path!r} has no config.json: not a model folder nor a lowbit run folder")
    return model.eval()


def check_teacher(teacher: nn.Module, student: nn.Module, weights: dict[str, float]) -> None:
    """The teacher must share the student's vocabulary and labels (and its layer count when hidden
    states or attention scores are compared)."""
    tc, sc = teacher.config, student.config
    for name in ("vocab_size", "num_labels"):
        if getattr(tc, name) != getattr(sc, name):
            raise ConfigError(f"the teacher has {name} {getattr(tc, name)}, the student {getattr(sc, name)}: "
                              "they must match")
    if (weights["hidden"] or weights["attention"]) and tc.num_hidden_layers != sc.num_hidden_layers:
        raise ConfigError(f"the teacher has {tc.num_hidden_layers} layers, the student {sc.num_hidden_layers}: "
                          "hidden-state and attention distillation need equal depth (set their weights to 0)")


class TeacherLoss:
    """The teacher runs on the worker: Σ_k w_k·L_k (:func:`lowbit.models.distill_losses`)."""

    def __init__(self, teacher: nn.Module, weights: dict[str, float], T: float = 1.0):
        self.teacher, self.w, self.T = teacher.eval(), weights, T
        self._installed = False

    def __call__(self, student: nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        need_h, need_a = bool(self.w["hidden"]), bool(self.w["attention"])
        if need_a and not self._installed:
            for m in (student, self.teacher):
                install_lowbit_attention(m, return_scores=True)
            self._installed = True
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            t_out = self.teacher(**inputs, output_hidden_states=need_h, output_attentions=need_a)
        s_out = student(**inputs, output_hidden_states=need_h, output_attentions=need_a)
        terms = distill_losses(s_out, t_out, self.T)
        if self.w["label"]:
            terms["label"] = nn.functional.cross_entropy(s_out.logits, batch["labels"])
        return sum(self.w[k] * v for k, v in terms.items() if self.w.get(k))


class CachedLogitLoss:
    """The teacher's logits, looked up by example position: soft cross-entropy (+ label CE)."""

    def __init__(self, logits: torch.Tensor, weights: dict[str, float], T: float = 1.0):
        self.logits, self.w, self.T = logits, weights, T

    def __call__(self, student: nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        out = student(**{k: v for k, v in batch.items() if k != "labels"})
        loss = self.w["logits"] * soft_cross_entropy(out.logits, self.logits[positions].to(out.logits.device), self.T)
        if self.w["label"]:
            loss = loss + self.w["label"] * nn.functional.cross_entropy(out.logits, batch["labels"])
        return loss


def _cache_meta(cfg) -> dict:
    r = cfg.run
    return {"teacher": str(Path(r.teacher).resolve()), "task": r.task, "train_subset": r.train_subset,
            "seed": r.seed, "max_len": r.max_len, "model": r.model}


@torch.no_grad()
def cache_logits(cfg, teacher: nn.Module, tokenizer, batch: int = 64) -> Path:
    """Compute ``teacher``'s logits (checked against the student by the caller) over the run's
    training examples once, in the order :func:`lowbit.train.data.load_data` numbers them, into
    ``OUT/teacher_logits.safetensors``; an existing cache made for the same teacher and data is kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowbit.train.checkpoint import atomic_write
    from lowbit.train.data import load_data

    path = Path(cfg.run.out) / LOGITS_FILE
    meta = _cache_meta(cfg)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if json.loads((f.metadata() or {}).get("lowbit", "{}")) == meta:
                return path
    tok = tokenizer
    train, _ = load_data(cfg, tok, 0, 1, leader=False)
    n = train["labels"].shape[0]
    rows = []
    for i in range(0, n, batch):
        rows.append(teacher(**{k: v[i:i + batch] for k, v in train.items() if k != "labels"}).logits.float())
    logits = torch.cat(rows).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"logits": logits}, str(tmp), metadata={"lowbit": json.dumps(meta)}))
    return path


def make_distiller(cfg, student: nn.Module):
    """What a worker computes its loss with (None: the model's own label loss)."""
    r = cfg.run
    if not r.teacher:
        return None
    weights = parse_weights(r.distill_weights, r.distill)
    if r.distill == "logits":
        from safetensors.torch import load_file

        return CachedLogitLoss(load_file(str(Path(r.out) / LOGITS_FILE))["logits"], weights, r.distill_temperature)
    teacher = load_teacher(r.teacher)
    check_teacher(teacher, student, weights)
    return TeacherLoss(teacher, weights, r.distill_temperature)
