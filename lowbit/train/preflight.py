"""Everything checked before any rank or actor starts, once: the configuration's values
(:meth:`Config.validate`), the task's data files, the model, the output folder and, on ``--resume``,
the checkpoint (verified against its manifest, compatible with this run). A problem is a
:class:`~lowbit.errors.ConfigError` whose message says what is wrong and how to fix it."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from lowbit.errors import ConfigError
from lowbit.train.checkpoint import Checkpointer, ResumePoint, check_compatible
from lowbit.train.config import Config


def check_out(out: str) -> Path:
    """``out`` as a writable folder (created when missing)."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {str(p)!r} is a file; it must be a folder (the run writes metrics, logs and "
                          "checkpoints there)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".lowbit-write-test"):
            pass
    except OSError as e:
        raise ConfigError(f"--out {str(p)!r} is not a writable folder: {e.strerror or e}") from None
    return p


def check_resume(cfg: Config, quiet: bool = False) -> ResumePoint:
    """The checkpoint ``--resume`` continues from: the newest one under ``OUT/ckpt`` that verifies
    (the ones passed over are named), compatible with ``cfg``. With no checkpoint at all the run
    starts at step 0 (said in one line); with checkpoints none of which verifies it is an error."""
    ck = Checkpointer(cfg.run.out)
    rp = ck.resume_point()
    say = (lambda m: None) if quiet else (lambda m: print(f"lowbit: --resume: {m}", file=sys.stderr, flush=True))
    for line in rp.skipped:
        say(f"passing over {line}")
    if rp.step is None:
        if rp.skipped:
            raise ConfigError(f"--resume: no checkpoint under {ck.root} verifies ({'; '.join(rp.skipped)})")
        say(f"no checkpoint under {ck.root}; starting at step 0")
        return rp
    check_compatible(rp.manifest.get("fingerprint", {}), cfg, f"checkpoint {ck.step_dir(rp.step)}")
    if rp.step >= cfg.run.steps:
        raise ConfigError(f"--resume: the checkpoint is at step {rp.step} and --steps is {cfg.run.steps}: nothing "
                          "left to train (raise --steps)")
    say(f"resuming from {ck.step_dir(rp.step)}")
    return rp


def check_scheme_model(model: str, scheme: str) -> None:
    """The model's type must be one the scheme wrappers handle (read from its config, no weights)."""
    import transformers

    from lowbit.models.presets import PRESETS
    from lowbit.models.registry import SUPPORTED_MODEL_TYPES

    if model in PRESETS:
        mtype = "roberta" if model == "roberta-tiny" else "bert"
    elif Path(model).is_dir():
        mtype = transformers.AutoConfig.from_pretrained(model, local_files_only=True).model_type
    else:
        mtype = getattr(getattr(transformers, model), "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"--scheme {scheme} wraps BERT-family models ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                          f"model {model!r} is of type {mtype!r}")


def preflight(cfg: Config, quiet: bool = False) -> tuple[Config, ResumePoint | None]:
    """Validate ``cfg`` and everything it names (see the module docstring). Returns the config with the
    task's canonical name and, on ``--resume``, where to resume from. ``quiet``: no messages (every
    rank of a torchrun launch checks, rank 0 speaks)."""
    from lowbit.models.presets import check_model
    from lowbit.train.data import check_task

    cfg.validate()
    cfg.run.task = check_task(cfg.run.task, cfg.run.data_dir or None)
    check_model(cfg.run.model)
    if cfg.codec.scheme != "none":
        check_scheme_model(cfg.run.model, cfg.codec.scheme)
    t = cfg.transport
    if t.kind == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("the ray transport needs Ray: pip install 'lowbit[ray]'") from None
    if t.backend == "nccl":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("backend nccl asked for, but no CUDA device is visible")
        if torch.cuda.device_count() < t.world_size and not os.environ.get("LOCAL_RANK"):
            raise ConfigError(f"backend nccl: {t.world_size} ranks on this machine need as many GPUs, "
                              f"{torch.cuda.device_count()} are visible")
    check_out(cfg.run.out)
    if cfg.run.teacher:
        check_distill(cfg, quiet)
    resume = check_resume(cfg, quiet) if cfg.run.resume else None
    return cfg, resume


def check_distill(cfg: Config, quiet: bool) -> None:
    """The teacher loads and matches the student; with ``--distill logits`` its logits are cached
    now, once (by the launcher, or torchrun's rank 0 while the other ranks wait for the file)."""
    import time

    from lowbit.train.distill import LOGITS_FILE, cache_logits, check_teacher, load_teacher, parse_weights
    from lowbit.train.model import build_model

    weights = parse_weights(cfg.run.distill_weights, cfg.run.distill)
    if cfg.run.distill == "logits" and quiet and os.environ.get("LOCAL_RANK") not in (None, "0"):
        path, deadline = Path(cfg.run.out) / LOGITS_FILE, time.monotonic() + cfg.transport.timeout_s
        while not path.is_file():
            if time.monotonic() > deadline:
                raise ConfigError(f"rank 0 did not write {path} within {cfg.transport.timeout_s:.0f} s")
            time.sleep(0.5)
        return
    teacher = load_teacher(cfg.run.teacher)
    student, tokenizer = build_model(cfg)
    check_teacher(teacher, student, weights)
    if cfg.run.distill == "logits":
        cache_logits(cfg, teacher, tokenizer)
