"""The ``lowbit train`` flags (also ``python -m lowbit.train`` and ``launch/ray_cluster.py``): one table
of flag -> config field with its help, and the config they make (YAML, then the flags over it)."""
from __future__ import annotations

import argparse

from lowbit.train.config import G_SCHEMES, GRAD_BITS, SCHEMES, TRANSPORTS, W_SCHEMES, WEIGHT_BITS, Config

_D = Config()  # the defaults shown in --help
PRESETS_HELP = ("tiny-bert, roberta-tiny (random init, for smoke runs), minilm (pretrained all-MiniLM-L6-v2), "
                "minilm-l1 .. minilm-l5 (its first N layers), a local Hugging Face model folder, or a "
                "transformers config class name such as BertConfig")

# flag -> (section, field, type, choices, help); the default shown is the Config dataclass's
TRAIN_FLAGS: dict[str, tuple[str, str, type, tuple | None, str]] = {
    "transport": ("transport", "kind", str, TRANSPORTS, "how gradients and weights move: parameter server, "
                  "ring or tree exchange over torch.distributed, or Ray actors"),
    "workers": ("transport", "workers", int, None, "worker ranks (each computes gradients on its data shard)"),
    "servers": ("transport", "servers", int, None, "server ranks (ps and ray only; ranks 0..S-1)"),
    "backend": ("transport", "backend", str, ("auto", "gloo", "nccl"), "torch.distributed backend "
                "(auto: nccl where CUDA is visible, else gloo)"),
    "addr": ("transport", "addr", str, None, "rendezvous address of rank 0"),
    "port": ("transport", "port", int, None, "rendezvous port (0 = pick a free one)"),
    "timeout": ("transport", "timeout_s", float, None, "seconds to wait for any peer before failing"),
    "on_worker_failure": ("transport", "on_worker_failure", str, ("stop", "continue"),
                          "stop: a lost rank stops the run (resume from the checkpoint); continue (ps, ray): "
                          "servers go on with the workers left"),
    "chunks": ("transport", "chunks", int, None, "ps: key groups per step, each decoded while the next arrives"),
    "recv_window": ("transport", "recv_window", int, None, "ps: gradient chunks per worker a server posts ahead "
                    "(0 = all at once)"),
    "w_bits": ("codec", "w_bits", int, WEIGHT_BITS, "bits of the Transformer weight matrices sent down "
               "(32 = fp32, 16 = fp16)"),
    "g_bits": ("codec", "g_bits", int, GRAD_BITS, "bits of the gradients sent up (clipped stochastic; "
               "32 = fp32, 16 = fp16)"),
    "scale_hold": ("codec", "scale_hold", float, None, "LAQ weights keep last step's scale while the new one is "
                   "within this relative distance of it (e.g. 0.01), so codes change only where weights "
                   "cross a grid boundary: far fewer bytes down with delta-coded weights (0 = re-solve every step)"),
    "g_scheme": ("codec", "g_scheme", str, G_SCHEMES, "gradient quantizer: stochastic (clipped, unbiased "
                 "m-bit) or threshold (ternary: values above g-threshold * rms as +-scale; biased, needs "
                 "--error-feedback and --g-bits 2)"),
    "g_threshold": ("codec", "g_threshold", float, None, "threshold gradients: the multiple of the gradient's "
                    "rms a value must exceed to be sent"),
    "w_scheme": ("codec", "w_scheme", str, W_SCHEMES, "weight quantizer of the Transformer matrices"),
    "scheme": ("codec", "scheme", str, SCHEMES, "workers run the model wrapped by this scheme (its activation "
               "quantizers) and it sets each tensor's width (ternarybert: ternary Transformer matrices and "
               "word embedding, the rest fp32; q8bert: 8-bit); none: the widths above"),
    "embed_bits": ("codec", "embed_bits", int, WEIGHT_BITS, "bits of the embedding tables"),
    "head_bits": ("codec", "head_bits", int, WEIGHT_BITS, "bits of the classifier and pooler matrices"),
    "small_bits": ("codec", "small_bits", int, WEIGHT_BITS, "bits of 1-D tensors (LayerNorm, biases)"),
    "clip": ("codec", "clip", float, None, "gradients are clipped at clip * sigma before quantization"),
    "keyframe_every": ("codec", "keyframe_every", int, None, "with delta-coded weights, whole weight frames every "
                       "N steps (0 = only at the start, on resume and when a delta would not be smaller)"),
    "nonfinite": ("codec", "nonfinite", str, ("error", "skip", "zero"),
                  "what a worker does with a gradient holding NaN/Inf"),
    "optimizer": ("optim", "name", str, ("adam", "sgd"), "the servers' optimizer (Adam makes LAQ loss-aware)"),
    "lr": ("optim", "lr", float, None, "peak learning rate (linear warm-up, then linear decay to 0)"),
    "warmup": ("optim", "warmup_steps", int, None, "warm-up steps"),
    "weight_decay": ("optim", "weight_decay", float, None, "decoupled weight decay (AdamW when > 0)"),
    "model": ("run", "model", str, None, "model: " + PRESETS_HELP),
    "task": ("run", "task", str, None, "GLUE task (sst2, SST-2 and sst-2 are one; SST-2 ships with lowbit)"),
    "data_dir": ("run", "data_dir", str, None, "folder holding glue/<TASK>/{train,dev}.tsv "
                 "(default: $LOWBIT_DATA, else the packaged SST-2)"),
    "steps": ("run", "steps", int, None, "optimizer steps"),
    "batch_size": ("run", "batch_size", int, None, "examples per worker per step"),
    "max_len": ("run", "max_len", int, None, "tokens per example (padded / truncated)"),
    "train_subset": ("run", "train_subset", int, None, "train on this many examples (0 = all)"),
    "eval_subset": ("run", "eval_subset", int, None, "evaluate on this many dev examples (0 = all)"),
    "eval_every": ("run", "eval_every", int, None, "evaluate every N steps (0 = only at the end)"),
    "checkpoint_every": ("run", "checkpoint_every", int, None, "checkpoint every N steps (0 = only at the end)"),
    "keep_checkpoints": ("run", "keep_checkpoints", int, None, "keep the newest N checkpoints, delete older ones"),
    "seed": ("run", "seed", int, None, "seed of the initialisation, data order and stochastic rounding"),
    "out": ("run", "out", str, None, "run folder: metrics.jsonl, summary.json, ckpt/"),
    "fault": ("run", "fault", str, None, "fault injection for tests, e.g. kill-worker:1@5 (rank 1 dies in step 5)"),
    "dropout": ("run", "dropout", float, None, "override the model's dropout probability"),
    "teacher": ("run", "teacher", str, None, "distill from this fp32 teacher: a model folder or a lowbit run "
                "folder (e.g. of a --w-bits 32 --g-bits 32 run)"),
    "distill": ("run", "distill", str, ("workers", "logits"), "workers: the teacher runs on every worker; "
                "logits: its logits are computed once and cached, workers hold no fp32 model"),
    "distill_weights": ("run", "distill_weights", str, None, "the loss terms, TERM=WEIGHT,... over logits, hidden, "
                        "attention, label"),
    "distill_temperature": ("run", "distill_temperature", float, None, "softmax temperature of the logit term"),
    "threads_per_rank": ("run", "threads_per_rank", int, None, "torch threads per rank (0 = cores / ranks)"),
}
# flag -> (section, field, the value it sets, help)
TRAIN_SWITCHES = {
    "error_feedback": ("codec", "error_feedback", True,
                       "workers keep the quantization error and add it to the next gradient"),
    "per_row": ("codec", "per_row", True, "one weight scale per output row instead of per tensor"),
    "no_delta_weights": ("codec", "delta_weights", False, "send whole weight frames every step instead of the "
                         "codes that changed (delta coding is exact; this only costs bytes)"),
    "dense_embeddings": ("codec", "sparse_embeddings", False, "send the embeddings' gradients whole instead of "
                         "without their all-zero rows (row-sparse frames are exact; this only costs bytes)"),
    "entropy_grads": ("codec", "entropy_grads", True, "rANS-code the matrix gradients' codes (exact: 3-bit codes "
                      "in about 1.9 bits, 2-bit in under 1; worth it on links slower than about 1 Gbit/s)"),
    "resume": ("run", "resume", True, "continue from the newest checkpoint under --out"),
}


def _default(section: str, field: str):
    v = getattr(getattr(_D, section), field)
    return "none" if v in ("", None) else v


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="YAML file with codec/transport/optim/run sections; "
                   "flags given on the command line override it")
    for flag, (section, field, typ, choices, text) in TRAIN_FLAGS.items():
        shown = f" (choices: {', '.join(map(str, choices))})" if choices and flag != "model" else ""
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, default=None, choices=choices,
                       metavar=field.upper() if choices else None,
                       help=f"{text}{shown} [default: {_default(section, field)}]")
    for flag, (section, field, _, text) in TRAIN_SWITCHES.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, action="store_true", default=None,
                       help=f"{text} [default: off]")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar (it is drawn only on a terminal anyway)")
    p.add_argument("--debug", action="store_true", default=False,
                   help="show the traceback of an error (also LOWBIT_DEBUG=1) [default: off]")


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config.from_yaml(args.config) if getattr(args, "config", None) else Config()
    for flag, (section, field, *_) in TRAIN_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            cfg.override(section, {field: v})
    for flag, (section, field, value, _) in TRAIN_SWITCHES.items():
        if getattr(args, flag, None):
            cfg.override(section, {field: value})
    cfg.run.progress = getattr(args, "progress", True)
    return cfg.validate()
