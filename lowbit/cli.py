"""`lowbit train | bench | export | simulate | demo`."""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# flag -> (section, field, type)
TRAIN_FLAGS = {
    "transport": ("transport", "kind", str), "workers": ("transport", "workers", int),
    "servers": ("transport", "servers", int), "backend": ("transport", "backend", str),
    "addr": ("transport", "addr", str), "port": ("transport", "port", int),
    "timeout": ("transport", "timeout_s", float), "on_worker_failure": ("transport", "on_worker_failure", str),
    "chunks": ("transport", "chunks", int), "recv_window": ("transport", "recv_window", int),
    "w_bits": ("codec", "w_bits", int), "g_bits": ("codec", "g_bits", int),
    "w_scheme": ("codec", "w_scheme", str), "embed_bits": ("codec", "embed_bits", int),
    "head_bits": ("codec", "head_bits", int), "small_bits": ("codec", "small_bits", int),
    "clip": ("codec", "clip", float), "nonfinite": ("codec", "nonfinite", str),
    "optimizer": ("optim", "name", str), "lr": ("optim", "lr", float),
    "warmup": ("optim", "warmup_steps", int), "weight_decay": ("optim", "weight_decay", float),
    "model": ("run", "model", str), "task": ("run", "task", str), "steps": ("run", "steps", int),
    "batch_size": ("run", "batch_size", int), "max_len": ("run", "max_len", int),
    "train_subset": ("run", "train_subset", int), "eval_subset": ("run", "eval_subset", int),
    "eval_every": ("run", "eval_every", int), "checkpoint_every": ("run", "checkpoint_every", int),
    "seed": ("run", "seed", int), "out": ("run", "out", str), "fault": ("run", "fault", str),
    "dropout": ("run", "dropout", float), "threads_per_rank": ("run", "threads_per_rank", int),
}
TRAIN_SWITCHES = {"error_feedback": ("codec", "error_feedback"), "per_row": ("codec", "per_row"),
                  "resume": ("run", "resume")}


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with codec/transport/optim/run sections")
    for flag, (_, _, typ) in TRAIN_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, default=None)
    for flag in TRAIN_SWITCHES:
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, action="store_true", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)


def config_from_args(args: argparse.Namespace):
    from lowbit.train.config import Config

    cfg = Config.from_yaml(args.config) if getattr(args, "config", None) else Config()
    for flag, (section, field, _) in TRAIN_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            cfg.override(section, {field: v})
    for flag, (section, field) in TRAIN_SWITCHES.items():
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


BENCH_SCRIPTS = {"codec": "codec_throughput.py", "comm": "comm_bandwidth.py", "loopback": "comm_loopback.py",
                 "train": "train_sst2.py", "glue": "glue.py", "federated": "federated.py"}


def cmd_bench(args, rest) -> int:
    path = REPO / "benchmarks" / BENCH_SCRIPTS[args.what]
    if not path.exists():
        print(f"benchmark script {path} not found (benchmarks ship with the source tree)", file=sys.stderr)
        return 2
    sys.argv = [str(path)] + rest
    runpy.run_path(str(path), run_name="__main__")
    return 0


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lowbit", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_train_args(sub.add_parser("train", help="distributed low-bit training on this machine"))
    # no -h of its own: `lowbit bench comm --help` is the benchmark script's help
    b = sub.add_parser("bench", help="run a benchmark (codec | comm | loopback | train | glue | federated); "
                       "`lowbit bench NAME --help` for its options", add_help=False)
    b.add_argument("what", nargs="?", choices=list(BENCH_SCRIPTS))
    e = sub.add_parser("export", help="packed low-bit checkpoint (safetensors)")
    e.add_argument("--model", default="minilm")
    e.add_argument("--scheme", default="ternarybert")
    e.add_argument("--checkpoint", help="fine-tuned weights (safetensors) to load before export")
    e.add_argument("--out", required=True)
    sub.add_parser("simulate", help="federated simulation with quantized links (see --help)",
                   add_help=False)
    d = sub.add_parser("demo", help="the make-demo run: LAQ w2/g3 vs fp32 on SST-2, 4 workers")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--out", default="runs/demo")
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
