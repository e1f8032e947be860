"""`lowbit train | bench | export | simulate | demo`."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from lowbit.errors import ConfigError, guarded
from lowbit.train.args import PRESETS_HELP, add_train_args, config_from_args


def resume_command(argv: list[str]) -> str:
    """The command line that resumes the run ``argv`` (``train ...``) started: the same flags, without
    ``--fault`` (an injected fault fires once, not on every resume), with ``--resume``."""
    rest, skip = [], False
    for a in argv:
        if skip or a == "--resume" or a.startswith("--fault="):
            skip = False
            continue
        if a == "--fault":
            skip = True
            continue
        rest.append(a)
    return shlex.join(["lowbit", *rest, "--resume"])


def cmd_train(args, argv: list[str]) -> int:
    from lowbit.train.launch import launch_local

    cfg = config_from_args(args)
    summary = launch_local(cfg, resume_command=resume_command(argv))
    print(json.dumps(summary, indent=1))
    return 0


def cmd_bench(args, rest) -> int:
    from lowbit.benchmarks import run_benchmark

    return run_benchmark(args.what, rest)


def cmd_export(args) -> int:
    if args.run:
        if args.checkpoint:
            raise ConfigError("--from exports a run's own weights: it takes no --checkpoint")
        from lowbit.train.export import export_run

        r = export_run(args.run, args.out, step=args.step)
        print(f"wrote {r['path']}: {r['bytes'] / 1e6:.2f} MB, {r['fp32_bytes'] / r['bytes']:.1f}x smaller than "
              f"fp32 ({r['fp32_bytes'] / 1e6:.1f} MB); the weight frames of step {r['step']}, {r['pieces']} pieces")
        return 0
    if args.step is not None:
        raise ConfigError("--step applies to --from RUN")
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
                       "checkpoint (codes + scales, loadable with lowbit.models.load_packed); or, with "
                       "--from RUN, write a training run's final low-bit weights.")
    e.add_argument("--model", default="minilm", help=f"model: {PRESETS_HELP} [default: minilm]")
    e.add_argument("--scheme", default="ternarybert", choices=("ternarybert", "q8bert"),
                   help="quantization scheme [default: ternarybert]")
    e.add_argument("--checkpoint", help="fine-tuned weights (safetensors) loaded before the export [default: none]")
    e.add_argument("--from", dest="run", metavar="RUN",
                   help="a `lowbit train` run folder: write the low-bit weights its workers last decoded "
                   "(--model and --scheme are ignored)")
    e.add_argument("--step", type=int, default=None,
                   help="with --from: the checkpoint step [default: the latest that verifies]")
    e.add_argument("--out", required=True, help="the file to write")
    sub.add_parser("simulate", help="federated simulation with quantized links (`lowbit simulate --help`)",
                   add_help=False)
    d = sub.add_parser("demo", help="the `make demo` run: LAQ w2/g3 against fp32 on SST-2, 4 workers",
                       formatter_class=_Help)
    d.add_argument("--steps", type=int, default=None, help="steps of each run [default: 80]")
    d.add_argument("--out", default="runs/demo", help="run folder [default: runs/demo]")
    return ap, b


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap, b = build_parser()
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "bench":
        if args.what is None:  # `lowbit bench` or `lowbit bench --help`
            asked = bool({"-h", "--help"} & set(rest))
            b.print_help(sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        return guarded(lambda: cmd_bench(args, rest))
    if args.cmd == "simulate":
        return guarded(lambda: cmd_simulate(args, rest))
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "train":
        return guarded(lambda: cmd_train(args, argv), debug=args.debug)
    return guarded(lambda: {"export": cmd_export, "demo": cmd_demo}[args.cmd](args))


if __name__ == "__main__":
    sys.exit(main())
