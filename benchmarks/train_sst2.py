"""MiniLM on SST-2: fp32 vs LAQ w2/g3, w4/g3, w8/g8 and the thin-link w4/g2-ef over the PS and ring
transports.

    python benchmarks/train_sst2.py                       # CPU-sized defaults (see --help)
    python benchmarks/train_sst2.py --steps 2000 --train-subset 0 --batch-size 32   # full set, GPU

Each configuration is a real multi-process run (gloo on loopback, 4 workers; PS adds 1 server).
Reports dev accuracy on the full SST-2 dev set (872), bytes up/down, the fp32 equivalent and wall
time; JSON to benchmarks/results/train_sst2.json and a plot of accuracy against bytes moved.

``--baselines ddp_powersgd4,ddp_fp16``: the same training as plain DDP with PyTorch's PowerSGD
(rank 4) or fp16 comm hook (benchmarks/_ddp_train.py), the peers lowbit must beat at equal
accuracy. ``--include JSON`` adds the records of an earlier run to the table and plot, e.g.

    python benchmarks/train_sst2.py --transports '' --baselines ddp_powersgd4 \
        --include benchmarks/results/train_sst2.json --json benchmarks/results/train_sst2.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit.benchmarks._common import RESULTS, print_table, write_json  # noqa: E402

from lowbit.train.config import Config  # noqa: E402
from lowbit.train.launch import launch_local  # noqa: E402

CONFIGS = {"fp32": (32, 32), "w8/g8": (8, 8), "w4/g3": (4, 3), "w2/g3": (2, 3), "w4/g2-ef": (4, 2)}
# codec options beyond the widths: the thin-link configuration sends threshold-ternary gradients with
# error feedback, rANS-coded, and holds LAQ's scale so the weight deltas stay small
CODEC_EXTRAS = {"w4/g2-ef": {"g_scheme": "threshold", "g_threshold": 1.0, "error_feedback": True,
                             "entropy_grads": True, "scale_hold": 0.01}}
# the model wrappers inside training: name -> (w_bits, g_bits, scheme, distill mode or None). The
# distilled rows start from the fp32 row's fine-tuned model and learn from it (TernaryBERT's recipe),
# so run them after the fp32 row of the same transport.
SCHEME_CONFIGS = {"tbert-w2/g3": (2, 3, "ternarybert", None), "tbert-w2/g3+kd": (2, 3, "ternarybert", "workers"),
                  "tbert-w2/g3+kd-logits": (2, 3, "ternarybert", "logits"), "q8bert-w8/g8": (8, 8, "q8bert", None),
                  "q8bert-w8/g8+kd-logits": (8, 8, "q8bert", "logits")}


def teacher_folder(run: Path) -> Path:
    """The fp32 row's final model as a model folder (``run/model``): the distilled rows' teacher and
    starting point."""
    from lowbit.train.distill import load_teacher

    folder = run / "model"
    if not (folder / "config.json").is_file():
        load_teacher(str(run)).save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8, help="per worker")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--train-subset", type=int, default=8000)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--transports", default="ring,ps", help="lowbit transports ('' for none)")
    ap.add_argument("--baselines", default="ddp_powersgd4", help="ddp_powersgd4, ddp_fp16 ('' for none)")
    ap.add_argument("--include", default="", help="JSON of an earlier run whose records join the table")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma list of {', '.join(list(CONFIGS) + list(SCHEME_CONFIGS))}")
    ap.add_argument("--backend", default="auto", help="auto | gloo | nccl (gloo keeps the ranks on CPU cores)")
    ap.add_argument("--out", default="runs/bench_sst2")
    ap.add_argument("--json", default=str(RESULTS / "train_sst2.json"))
    args = ap.parse_args(argv)
    recs = []
    if args.include:
        import json
        doc = json.loads(Path(args.include).read_text())
        recs += [{"name": f"{r['transport']} {r['config']}", "dev_acc": r["accuracy"], "command": doc.get("command", ""),
                  **r, "included_from": args.include} for r in doc["records"]]
    for transport in filter(None, args.transports.split(",")):
        for name in args.configs.split(","):
            wb, gb, scheme, distill = CONFIGS[name] + ("none", None) if name in CONFIGS else SCHEME_CONFIGS[name]
            cfg = Config()
            cfg.override("transport", {"kind": transport, "workers": args.workers, "servers": 1, "timeout_s": 900,
                                       "backend": args.backend})
            cfg.override("codec", {"w_bits": wb, "g_bits": gb, "embed_bits": max(wb, 8) if wb < 32 else 32,
                                   "head_bits": max(wb, 8) if wb < 32 else 32, **CODEC_EXTRAS.get(name, {})})
            cfg.override("optim", {"name": "adam", "lr": args.lr, "warmup_steps": args.steps // 10})
            cfg.override("run", {"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                                 "max_len": args.max_len, "train_subset": args.train_subset,
                                 "out": f"{args.out}/{transport}_{name.replace('/', '')}"})
            if scheme != "none":
                cfg.override("codec", {"scheme": scheme})
            if distill:
                teacher = str(teacher_folder(Path(f"{args.out}/{transport}_fp32")))
                cfg.override("run", {"model": teacher, "teacher": teacher, "distill": distill,
                                     "distill_weights": "logits=1" if distill == "logits"
                                     else "logits=1,hidden=1,attention=1"})
            print(f"== {transport} {name} ==", file=sys.stderr, flush=True)
            s = launch_local(cfg.validate())
            recs = [r for r in recs if not (r["transport"] == transport and r["config"] == name)]  # replaced
            recs.append({"name": f"{transport} {name}", "transport": transport, "config": name, "scheme": scheme,
                         "distill": distill or "none", "w_bits": wb, "g_bits": gb, "dev_acc": s["accuracy"],
                         "command": "python benchmarks/train_sst2.py " + " ".join(argv or sys.argv[1:]),
                         "delta_weights": cfg.codec.delta_weights, "sparse_embeddings": cfg.codec.sparse_embeddings,
                         "g_scheme": cfg.codec.g_scheme, "error_feedback": cfg.codec.error_feedback,
                         "entropy_grads": cfg.codec.entropy_grads, "scale_hold": cfg.codec.scale_hold,
                         "accuracy": s["accuracy"], "bytes_up": s["bytes_up"], "bytes_down": s["bytes_down"],
                         "bytes_total": s["bytes_up"] + s["bytes_down"],
                         "fp32_bytes_total": s["fp32_bytes_up"] + s["fp32_bytes_down"],
                         "compression": s["compression"], "wall_s": s["wall_s"], "steps": args.steps,
                         "model": args.model, "batch_per_worker": args.batch_size, "max_len": args.max_len,
                         "train_subset": args.train_subset})
            write_json(args.json, recs, {"command": "python benchmarks/train_sst2.py " + " ".join(argv or sys.argv[1:]),
                                         "partial": True})
    for name in filter(None, args.baselines.split(",")):
        from lowbit.benchmarks._ddp_train import run_ddp
        print(f"== ddp {name} ==", file=sys.stderr, flush=True)
        recs = [r for r in recs if not (r["transport"] == "ddp" and r["config"] == name[4:])]
        rec = run_ddp(name[4:], model=args.model, steps=args.steps, batch_size=args.batch_size,
                      max_len=args.max_len, train_subset=args.train_subset, lr=args.lr, workers=args.workers)
        recs.append(dict(rec, name=f"ddp {name[4:]}", dev_acc=rec["accuracy"],
                         command="python benchmarks/train_sst2.py " + " ".join(argv or sys.argv[1:])))
        write_json(args.json, recs, {"command": "python benchmarks/train_sst2.py " + " ".join(argv or sys.argv[1:]),
                                     "partial": True})
    base = {r["transport"]: r["accuracy"] for r in recs if r["config"] == "fp32"}
    base.setdefault("ps", base.get("ring"))
    base.setdefault("ddp", base.get("ring"))
    for r in recs:
        r["acc_drop_vs_fp32"] = (base[r["transport"]] - r["accuracy"]) if base.get(r["transport"]) is not None else None
    print_table(recs, ["transport", "config", "accuracy", "acc_drop_vs_fp32", "bytes_total", "compression", "wall_s"],
                {"accuracy": "{:.4f}", "acc_drop_vs_fp32": "{:+.4f}", "bytes_total": "{:,}",
                 "compression": "{:.1f}x", "wall_s": "{:.0f}"})
    write_json(args.json, recs, {"command": "python benchmarks/train_sst2.py " + " ".join(argv or sys.argv[1:])})
    plot(recs, Path(args.json).with_suffix(".png"))
    return 0


def plot(recs, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for t, marker in (("ring", "o"), ("ps", "s"), ("ddp", "^")):
        rs = [r for r in recs if r["transport"] == t]
        for r in rs:
            ax.scatter(r["bytes_total"] / 1e9, r["accuracy"], marker=marker, s=50)
            ax.annotate(f"{t} {r['config']}", (r["bytes_total"] / 1e9, r["accuracy"]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes moved in training (GB, all ranks)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title("MiniLM on SST-2: accuracy vs bytes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
