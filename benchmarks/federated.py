"""Federated SST-2 with quantized links: rounds and bytes to reach a target dev accuracy.

tiny-bert (4.2 M parameters, MiniLM vocabulary), K = 100 clients, 10 % sampled per round, Dirichlet
alpha over labels (or IID), fp32 links vs m-bit links (uplink: clipped stochastic m-bit model
delta; downlink: LAQ m-bit weights; 1-D tensors stay fp32). Writes benchmarks/results/federated.json
and benchmarks/results/federated.png.

    python benchmarks/federated.py                       # default grid (sized for ~10 min on 2 cores)
    python benchmarks/federated.py --full                # alpha 0.1 / 1.0 / IID x fp32, 8, 3, 2 bits
    python benchmarks/federated.py --alphas 0.1,iid --bits 32,2 --rounds 40
    python benchmarks/federated.py --merge a.json b.json --target 0.7   # one table/plot from several runs
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


import torch  # noqa: E402

from lowbit.benchmarks._common import RESULTS, print_table, write_json  # noqa: E402
from lowbit.sim.federated import (FedConfig, load_task_data, plot_accuracy_vs_bytes,  # noqa: E402
                                  rounds_to_target, simulate)


def parse_alpha(s: str):
    return None if s.strip().lower() in ("iid", "none") else float(s)


COLS = ["alpha", "bits", "label_skew", "best_acc", "final_acc", "rounds_to_target", "MB_to_target",
        "MB_per_round", "fp32_MB_per_round", "wall_s"]


def merge(paths, target: float, out: Path, argv) -> int:
    """One JSON + plot from several benchmark JSONs (same setup apart from alpha and bits)."""
    import json

    records, curves, commands, setup = [], {}, [], None
    for p in paths:
        d = json.loads(Path(p).read_text())
        commands.append(d["command"])
        setup = setup or d["setup"]
        for r in d["records"]:
            hit = rounds_to_target(
                [{**c, "cum_fp32_bytes": c["round"] * r["fp32_MB_per_round"] * 1e6} for c in r["curve"]], target)
            r = {**r, "target": target, "rounds_to_target": hit["round"] if hit else "not reached",
                 "MB_to_target": round(hit["cum_bytes"] / 1e6, 1) if hit else None,
                 "fp32_MB_to_target": round(hit["cum_fp32_bytes"] / 1e6, 1) if hit else None}
            records.append(r)
            curves[f"alpha {r['alpha']}, {'fp32' if r['bits'] == 32 else str(r['bits']) + '-bit'} links"] = r["curve"]
    table = print_table(records, COLS, {"best_acc": "{:.3f}", "final_acc": "{:.3f}"})
    meta = {"benchmark": "federated", "command": commands,
            "merge_command": " ".join(["python", "benchmarks/federated.py"] + (argv or sys.argv[1:])),
            "setup": setup, "target": target, "table": table}
    write_json(out, records, meta)
    png = plot_accuracy_vs_bytes(curves, out.with_suffix(".png"), target=target,
                                 title=f"SST-2 federated ({setup['model']}, K={setup['clients']}, "
                                       f"{setup['fraction']:.0%}/round, {setup['aggregator']}, "
                                       f"local {setup.get('local_optimizer', 'sgd')})")
    print(f"wrote {png}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", default="1.0", help="comma list of Dirichlet alphas or 'iid'")
    ap.add_argument("--bits", default="32,8,3,2", help="comma list of link bits (both directions); 32 = fp32")
    ap.add_argument("--full", action="store_true", help="alphas 0.1,1.0,iid and bits 32,8,3,2")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--local-batch", type=int, default=16)
    ap.add_argument("--local-lr", type=float, default=0.1)
    ap.add_argument("--local-optimizer", default="sgd", choices=["sgd", "adam"])
    ap.add_argument("--local-momentum", type=float, default=0.0)
    ap.add_argument("--aggregator", default="fedavg", choices=["fedavg", "fedadam"])
    ap.add_argument("--server-lr", type=float, default=None)
    ap.add_argument("--error-feedback", action="store_true")
    ap.add_argument("--model", default="tiny-bert", help="preset, e.g. tiny-bert or minilm-l1")
    ap.add_argument("--freeze", nargs="+", default=[], metavar="PREFIX",
                    help="parameter-name prefixes kept at their initial values (not trained, not sent)")
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--train-subset", type=int, default=0, help="0 = all 67k SST-2 training sentences")
    ap.add_argument("--eval-subset", type=int, default=0, help="0 = all 872 dev sentences")
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.60, help="dev accuracy to reach")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "federated.json"))
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine the results of earlier runs (e.g. one process per alpha) into --out, "
                         "re-reading rounds to --target from their curves; runs nothing")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.target, Path(args.out), argv)
    alphas = [0.1, 1.0, None] if args.full else [parse_alpha(a) for a in args.alphas.split(",")]
    bits = [32, 8, 3, 2] if args.full else [int(b) for b in args.bits.split(",")]
    torch.set_num_threads(args.threads)

    base = FedConfig(clients=args.clients, fraction=args.fraction, rounds=args.rounds,
                     local_steps=args.local_steps, local_batch=args.local_batch, local_lr=args.local_lr,
                     local_optimizer=args.local_optimizer, local_momentum=args.local_momentum,
                     freeze=tuple(args.freeze),
                     aggregator=args.aggregator, server_lr=args.server_lr, error_feedback=args.error_feedback,
                     model=args.model, max_len=args.max_len, train_subset=args.train_subset,
                     eval_subset=args.eval_subset, eval_every=args.eval_every, threads=args.threads,
                     ray=args.ray, seed=args.seed, out=None, progress=True)
    t0 = time.time()
    train, dev = load_task_data(base)
    print(f"SST-2: {len(train['labels'])} train, {len(dev['labels'])} dev sentences "
          f"(max_len {args.max_len}); data {time.time() - t0:.1f}s", flush=True)

    records, curves = [], {}
    for alpha in alphas:
        for b in bits:
            cfg = FedConfig(**{**base.to_dict(), "alpha": alpha, "up_bits": b, "down_bits": b})
            t = time.time()
            s = simulate(cfg, train, dev)
            hit = rounds_to_target(s["records"], args.target)
            a_name = "iid" if alpha is None else f"{alpha:g}"
            label = f"alpha {a_name}, {'fp32' if b == 32 else f'{b}-bit'} links"
            curves[label] = s["records"]
            rec = {"alpha": a_name, "bits": b, "label_skew": round(s["label_skew"], 3),
                   "rounds": cfg.rounds, "final_acc": s["final_accuracy"], "best_acc": s["best_accuracy"],
                   "target": args.target,
                   "rounds_to_target": hit["round"] if hit else "not reached",
                   "MB_to_target": round(hit["cum_bytes"] / 1e6, 1) if hit else None,
                   "fp32_MB_to_target": round(hit["cum_fp32_bytes"] / 1e6, 1) if hit else None,
                   "MB_per_round": round(s["total_bytes"] / cfg.rounds / 1e6, 2),
                   "fp32_MB_per_round": round(s["total_fp32_bytes"] / cfg.rounds / 1e6, 2),
                   "up_bytes_per_client": s["records"][-1]["up_bytes_per_client"],
                   "down_bytes_per_client": s["records"][-1]["down_bytes_per_client"],
                   "wall_s": s["wall_s"], "curve": [{k: r[k] for k in ("round", "accuracy", "cum_bytes")}
                                                    for r in s["records"] if "accuracy" in r]}
            records.append(rec)
            print(f"{label}: best acc {s['best_accuracy']:.3f}, to target {rec['rounds_to_target']}, "
                  f"{time.time() - t:.0f}s", flush=True)
            write_json(Path(args.out), records, {"benchmark": "federated", "partial": True,
                                                 "command": " ".join(["python", "benchmarks/federated.py"]
                                                                    + (argv or sys.argv[1:])),
                                                 "setup": {k: v for k, v in base.to_dict().items()
                                                           if k not in ("out", "progress")},
                                                 "target": args.target})

    table = print_table(records, COLS, {"best_acc": "{:.3f}", "final_acc": "{:.3f}"})
    meta = {"benchmark": "federated", "command": " ".join(["python", "benchmarks/federated.py"] + (argv or sys.argv[1:])),
            "setup": {k: v for k, v in base.to_dict().items() if k not in ("out", "progress")},
            "target": args.target, "table": table}
    out = Path(args.out)
    write_json(out, records, meta)
    png = plot_accuracy_vs_bytes(curves, out.with_suffix(".png"), target=args.target,
                                 title=f"SST-2 federated ({args.model}, K={args.clients}, "
                                       f"{args.fraction:.0%}/round, {args.aggregator}, "
                                       f"local {args.local_optimizer})")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
