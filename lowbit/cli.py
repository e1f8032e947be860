"""`lowbit train | bench | export | simulate | demo`."""
from __future__ import annotations

import argparse
import json
import os
import sys

from lowbit.train.config import (GRAD_BITS, TRANSPORTS, W_SCHEMES, WEIGHT_BITS, Config)

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
    "w_scheme": ("codec", "w_scheme", str, W_SCHEMES, "weight quantizer of the Transformer matrices"),
    "embed_bits": ("codec", "embed_bits", int, WEIGHT_BITS, "bits of the embedding tables"),
    "head_bits": ("codec", "head_bits", int, WEIGHT_BITS, "bits of the classifier and pooler matrices"),
    "small_bits": ("codec", "small_bits", int, WEIGHT_BITS, "bits of 1-D tensors (LayerNorm, biases)"),
    "clip": ("codec", "clip", float, None, "gradients are clipped at clip * sigma before quantization"),
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
    "seed": ("run", "seed", int, None, "seed of the initialisation, data order and stochastic rounding"),
    "out": ("run", "out", str, None, "run folder: metrics.jsonl, summary.json, ckpt/"),
    "fault": ("run", "fault", str, None, "fault injection for tests, e.g. kill-worker:1@5 (rank 1 dies in step 5)"),
    "dropout": ("run", "dropout", float, None, "override the model's dropout probability"),
    "threads_per_rank": ("run", "threads_per_rank", int, None, "torch threads per rank (0 = cores / ranks)"),
}
TRAIN_SWITCHES = {
    "error_feedback": ("codec", "error_feedback", "workers keep the quantization error and add it to the next gradient"),
    "per_row": ("codec", "per_row", "one weight scale per output row instead of per tensor"),
    "resume": ("run", "resume", "continue from the newest checkpoint under --out"),
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
    for flag, (section, field, text) in TRAIN_SWITCHES.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, action="store_true", default=None,
                       help=f"{text} [default: off]")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar (it is drawn only on a terminal anyway)")


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config.from_yaml(args.config) if getattr(args, "config", None) else Config()
    for flag, (section, field, *_) in TRAIN_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            cfg.override(section, {field: v})
    for flag, (section, field, _) in TRAIN_SWITCHES.items():
        if getattr(args, flag, None):
            cfg.override(section, {field: True})
    cfg.run.progress = getattr(args, "progress", True)
    return cfg.validate()


def cmd_train(args) -> int:
    from lowbit.train.loop import launch_local

    cfg = config_from_args(args)
    summary = launch_local(cfg)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_bench(args, rest) -> int:
    from lowbit.benchmarks import run_benchmark

    return run_benchmark(args.what, rest)


def cmd_export(args) -> int:
    from lowbit.models import export_packed, load_preset, wrap

    model, _ = load_preset(args.model, num_labels=2)
    if args.checkpoint:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(args.checkpoint), strict=False)
    model = wrap(model, args.scheme)
    export_packed(model, args.out)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {size / 1e6:.2f} MB ({args.scheme})")
    return 0


def cmd_simulate(args, rest) -> int:
    from lowbit.sim.federated import main as sim_main

    return sim_main(rest)


def cmd_demo(args) -> int:
    from lowbit.demo import main as demo_main

    return demo_main(args)


class _Help(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    from lowbit.benchmarks import BENCHMARKS

    ap = argparse.ArgumentParser(prog="lowbit", description="Distributed low-bit training (LAQ) for "
                                 "BERT-family models: quantized gradients up, loss-aware quantized weights down.",
                                 formatter_class=_Help)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    add_train_args(sub.add_parser("train", help="distributed low-bit training on this machine (spawns the ranks)",
                                  description="Distributed low-bit training on this machine: spawns every rank "
                                  "(gloo over loopback), trains, evaluates on the task's dev set and prints "
                                  "the summary JSON.", formatter_class=_Help))
    # no -h of its own: `lowbit bench comm --help` is the benchmark's help
    listing = "\n".join(f"  {name:<10} {text}" for name, (_, text) in BENCHMARKS.items())
    b = sub.add_parser("bench", help="run a benchmark; `lowbit bench` lists them, `lowbit bench NAME --help` "
                       "shows its options", add_help=False, formatter_class=_Help,
                       description="Run a benchmark (a table on stdout, JSON with --json).\n\n" + listing)
    b.add_argument("what", nargs="?", choices=list(BENCHMARKS), metavar="NAME")
    e = sub.add_parser("export", help="write a packed low-bit checkpoint (safetensors)", formatter_class=_Help,
                       description="Wrap a model with a quantization scheme and write its packed low-bit "
                       "checkpoint (codes + scales, loadable with lowbit.models.load_packed).")
    e.add_argument("--model", default="minilm", help=f"model: {PRESETS_HELP} [default: minilm]")
    e.add_argument("--scheme", default="ternarybert", choices=("ternarybert", "q8bert"),
                   help="quantization scheme [default: ternarybert]")
    e.add_argument("--checkpoint", help="fine-tuned weights (safetensors) loaded before the export [default: none]")
    e.add_argument("--out", required=True, help="the file to write")
    sub.add_parser("simulate", help="federated simulation with quantized links (`lowbit simulate --help`)",
                   add_help=False)
    d = sub.add_parser("demo", help="the `make demo` run: LAQ w2/g3 against fp32 on SST-2, 4 workers",
                       formatter_class=_Help)
    d.add_argument("--steps", type=int, default=None, help="steps of each run [default: 80]")
    d.add_argument("--out", default="runs/demo", help="run folder [default: runs/demo]")
    return ap, b


def main(argv: list[str] | None = None) -> int:
    ap, b = build_parser()
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "bench":
        if args.what is None:  # `lowbit bench` or `lowbit bench --help`
            asked = bool({"-h", "--help"} & set(rest))
            b.print_help(sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        return cmd_bench(args, rest)
    if args.cmd == "simulate":
        return cmd_simulate(args, rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"train": cmd_train, "export": cmd_export, "demo": cmd_demo}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
