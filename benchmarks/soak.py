"""Soak run: many steps, several injected crashes, each followed by --resume; the final weights
must equal a fault-free run bit for bit (the stop-and-resume policy guarantees it: data order,
stochastic rounding and dropout are pure functions of (seed, rank, step), and checkpoints hold
everything else).

    python benchmarks/soak.py                      # tiny-bert, ring, 4 faults over 40 steps
    python benchmarks/soak.py --transport ps --faults kill-server:0@9,kill-worker:2@23

Writes benchmarks/results/soak.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lowbit.benchmarks._common import RESULTS, print_table, write_json  # noqa: E402

from lowbit.train.config import Config  # noqa: E402
from lowbit.train.checkpoint import Checkpointer  # noqa: E402
from lowbit.train.launch import launch_local  # noqa: E402


def final_weights(out: Path, step: int) -> dict[int, torch.Tensor]:
    return Checkpointer(out).weights(step)


def config(args, out: str) -> Config:
    cfg = Config()
    cfg.override("transport", {"kind": args.transport, "workers": args.workers, "servers": 1, "timeout_s": 60})
    cfg.override("codec", {"w_bits": 2, "g_bits": 3, "error_feedback": True})
    cfg.override("optim", {"lr": 1e-3})
    cfg.override("run", {"model": "tiny-bert", "steps": args.steps, "batch_size": 8, "max_len": 16,
                         "train_subset": 256, "eval_subset": 64, "checkpoint_every": args.checkpoint_every,
                         "threads_per_rank": 1, "progress": False, "out": out})
    return cfg.validate()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", default="ring")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--faults", default="kill-worker:1@7,kill-rank:0@16,kill-worker:1@24,kill-rank:0@33")
    ap.add_argument("--out", default="runs/soak")
    ap.add_argument("--json", default=str(RESULTS / "soak.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    ref = config(args, f"{args.out}/reference")
    launch_local(ref)
    run = config(args, f"{args.out}/faulty")
    rows = []
    for i, fault in enumerate(args.faults.split(",")):
        run.run.fault, run.run.resume = fault, i > 0
        try:
            launch_local(run)
            rows.append({"fault": fault, "fired": False, "message": "finished without firing"})
        except RuntimeError as e:
            rows.append({"fault": fault, "fired": True, "message": str(e)[:160]})
    run.run.fault, run.run.resume = "", True
    summary = launch_local(run)
    wa, wb = final_weights(Path(ref.run.out), args.steps), final_weights(Path(run.run.out), args.steps)
    same = sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    for r in rows:
        r["survived"] = r["fired"]
    print_table(rows, ["fault", "fired", "message"])
    result = {"faults_injected": sum(r["fired"] for r in rows), "final_weights_identical": same,
              "tensors_compared": len(wa), "steps": args.steps, "resumed_from_last": summary["start_step"],
              "wall_s": time.time() - t0}
    print(result)
    write_json(args.json, rows, {"result": result,
                                 "command": "python benchmarks/soak.py " + " ".join(argv or sys.argv[1:])})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
