"""Flower + lowbit on SST-2: plain Flower FedAvg against the same app with lowbit's links (3-bit
up with error feedback, 2-bit LAQ down), both in Flower's simulation engine (Ray backend), and
lowbit's own simulator on the same split as a cross-check. Writes
benchmarks/results/flower_sst2.json and flower_sst2.png.

    lowbit bench flower                      # 100 clients, 10 per round, alpha 0.1 and 1.0
    lowbit bench flower --rounds 4 --clients 20 --train-subset 2000 --alphas 1.0   # a quick look

The client is one function for every run: it trains with lowbit.sim.federated's ClientRunner
(the same local steps, batches and seeds as ``lowbit simulate``), so the runs differ only in the
links and in who samples the clients (Flower draws them with Python's ``random``, seeded here;
lowbit's simulator with its own seeded generator).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time

import numpy as np
import torch

from lowbit.benchmarks._common import RESULTS, print_table, write_json
from lowbit.sim.federated import (ClientRunner, FedConfig, build_model, evaluate, load_task_data, make_splits,
                                  simulate, trainable)

_RUNNER: dict[str, ClientRunner] = {}  # per process (one per Ray actor): the runner of the current config


def _runner(cfg_json: str) -> ClientRunner:
    if cfg_json not in _RUNNER:
        d = json.loads(cfg_json)
        cfg = FedConfig(**{**d, "freeze": tuple(d["freeze"]), "server_betas": tuple(d["server_betas"])})
        train, _ = load_task_data(cfg)
        _RUNNER.clear()
        _RUNNER[cfg_json] = ClientRunner(cfg, train, make_splits(cfg, train["labels"]))
    return _RUNNER[cfg_json]


def client_train(msg, ctxt):
    """An ordinary Flower ClientApp train function: the arrays in, E local steps, the arrays out."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    config = msg.content["config"]
    runner = _runner(str(config["fedcfg"]))
    cid, rnd = int(ctxt.node_config["partition-id"]), int(config["server-round"])
    arrays = msg.content["arrays"]
    names = [n for n, _ in trainable(runner.model)]
    start = [torch.from_numpy(np.array(arrays[n].numpy(), dtype=np.float32)) for n in names]
    delta, loss = runner.local_update(start, cid, rnd)
    out = ArrayRecord({n: s + d for n, s, d in zip(names, start, delta)})
    metrics = MetricRecord({"num-examples": runner.weight(cid), "train_loss": loss})
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)


def client_app(lowbit: bool):
    from flwr.clientapp import ClientApp

    from lowbit.integrations.flower import lowbit_mod

    app = ClientApp(mods=[lowbit_mod] if lowbit else [])
    app.train()(client_train)
    return app


def run_flower(cfg: FedConfig, lowbit: bool, dev: dict) -> dict:
    """One Flower simulation; returns per-round records (accuracy, bytes) and the totals."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from lowbit.benchmarks.flower_sst2 import client_app  # by its installed name: Ray's workers import it
    from lowbit.comm.ray import ray_session
    from lowbit.integrations.flower import CountBytes, LowbitStrategy

    k = cfg.clients_per_round
    fedavg = FedAvg(fraction_train=k / cfg.clients, fraction_evaluate=0.0, min_train_nodes=k,
                    min_available_nodes=cfg.clients)
    strategy = LowbitStrategy(fedavg, up_bits=cfg.up_bits, down_bits=cfg.down_bits, clip=cfg.clip,
                              error_feedback=cfg.error_feedback) if lowbit else CountBytes(fedavg)
    model = build_model(cfg)
    names = [n for n, _ in trainable(model)]
    acc: dict[int, dict] = {}
    server = ServerApp()

    @server.main()
    def main(grid, ctxt) -> None:
        def central(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            with torch.no_grad():
                for n, p in trainable(model):
                    p.copy_(torch.from_numpy(np.array(arrays[n].numpy())).reshape(p.shape))
            acc[rnd] = evaluate(model, dev, cfg.eval_batch)
            return MetricRecord({"accuracy": acc[rnd]["accuracy"]})

        init = ArrayRecord({n: p.detach().clone() for n, p in trainable(model)})
        train_config = ConfigRecord({"fedcfg": json.dumps(cfg.to_dict())})
        strategy.start(grid=grid, initial_arrays=init, num_rounds=cfg.rounds, train_config=train_config,
                       evaluate_fn=central)

    random.seed(cfg.seed)  # Flower samples the round's nodes with Python's random
    t0 = time.time()
    with ray_session(2, env_vars={"PYTHONPATH": os.pathsep.join(sys.path)}):
        run_simulation(server, client_app(lowbit), num_supernodes=cfg.clients,
                       backend_config={"client_resources": {"num_cpus": 1}})
    wall = time.time() - t0
    curve, cum = [{"round": 0, "cum_bytes": 0, **acc[0]}], 0
    for rnd in range(1, cfg.rounds + 1):
        r = strategy.rounds.get(rnd)
        up, down = (r.up, r.down) if r else (0, 0)
        cum += up + down
        curve.append({"round": rnd, "up_bytes": up, "down_bytes": down, "cum_bytes": cum,
                      "dropped": r.dropped if r else 0, **acc.get(rnd, {})})
    return {"curve": curve, "wall_s": round(wall, 1), "names": len(names)}


def summarize(name: str, runner: str, cfg: FedConfig, curve: list[dict], wall: float, command: str) -> dict:
    evals = [c["accuracy"] for c in curve if "accuracy" in c]
    rounds = [c for c in curve if c["round"] > 0]
    total = curve[-1]["cum_bytes"]
    return {"name": name, "runner": runner, "alpha": cfg.alpha, "up_bits": cfg.up_bits, "down_bits": cfg.down_bits,
            "error_feedback": cfg.error_feedback, "rounds": cfg.rounds, "final_acc": evals[-1],
            "last5_acc": float(np.mean(evals[-5:])), "best_acc": max(evals),
            "MB_per_round": round(total / max(1, len(rounds)) / 1e6, 3),
            "up_MB_per_round": round(sum(c.get("up_bytes", 0) for c in rounds) / max(1, len(rounds)) / 1e6, 3),
            "down_MB_per_round": round(sum(c.get("down_bytes", 0) for c in rounds) / max(1, len(rounds)) / 1e6, 3),
            "bytes_total": total, "wall_s": wall, "command": command, "curve": curve}


def plot(records: list[dict], path: str) -> str:
    """Accuracy per round (left) and against cumulative bytes on the links (right), per alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"flower": "-", "lowbit": ":"}
    for r in records:
        pts = [c for c in r["curve"] if "accuracy" in c]
        label = f"alpha {r['alpha']}: {r['name']}"
        ls = "--" if r["runner"] == "flower" and r["up_bits"] == 32 else styles[r["runner"]]
        ax_r.plot([c["round"] for c in pts], [c["accuracy"] for c in pts], ls, marker="o", ms=2, label=label)
        later = [c for c in pts if c["round"] > 0]
        ax_b.plot([c["cum_bytes"] / 1e6 for c in later], [c["accuracy"] for c in later], ls, marker="o", ms=2,
                  label=label)
    ax_r.set_xlabel("round")
    ax_b.set_xlabel("cumulative MB on the links (up + down)")
    ax_b.set_xscale("log")
    for ax in (ax_r, ax_b):
        ax.set_ylabel("SST-2 dev accuracy")
        ax.grid(alpha=0.3)
    ax_r.legend(fontsize=7)
    fig.suptitle("Flower FedAvg with and without lowbit's links: 100 clients, 10 per round, Dirichlet over labels")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


COLS = ["alpha", "name", "up_bits", "down_bits", "final_acc", "last5_acc", "best_acc", "MB_per_round",
        "up_MB_per_round", "down_MB_per_round", "wall_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--alphas", default="0.1,1.0", help="comma list of Dirichlet alphas")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--model", default="minilm-l1")
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--local-lr", type=float, default=1e-3)
    ap.add_argument("--local-optimizer", default="adam", choices=["sgd", "adam"])
    ap.add_argument("--up-bits", type=int, default=3)
    ap.add_argument("--down-bits", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-sim", action="store_true", help="leave out lowbit's own simulator")
    ap.add_argument("--json", default=str(RESULTS / "flower_sst2.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot of --json without running")
    args = ap.parse_args(argv)
    if args.plot_only:
        print(f"wrote {plot(json.loads(open(args.json).read())['records'], os.path.splitext(args.json)[0] + '.png')}")
        return 0
    command = " ".join(["lowbit bench flower"] + (argv if argv is not None else sys.argv[1:]))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    records, verdict = [], {}
    for alpha in [float(a) for a in args.alphas.split(",")]:
        base = FedConfig(clients=args.clients, fraction=args.fraction, alpha=alpha, rounds=args.rounds,
                         model=args.model, freeze=("bert.embeddings",), local_steps=args.local_steps,
                         local_batch=16, local_lr=args.local_lr, local_optimizer=args.local_optimizer,
                         weight="seen", max_len=32, train_subset=args.train_subset, seed=args.seed, threads=1,
                         out=None, progress=False).validate()
        lowbit = dataclasses.replace(base, up_bits=args.up_bits, down_bits=args.down_bits, error_feedback=True)
        _, dev = load_task_data(base)
        rows = []
        for name, cfg, quantized in (("Flower FedAvg", base, False),
                                     (f"Flower FedAvg + lowbit {args.up_bits}b up / {args.down_bits}b down",
                                      lowbit, True)):
            r = run_flower(cfg, quantized, dev)
            rows.append(summarize(name, "flower", cfg, r["curve"], r["wall_s"], command))
            print(f"alpha {alpha}, {name}: final {rows[-1]['final_acc']:.4f}, {rows[-1]['MB_per_round']} MB/round",
                  flush=True)
        if not args.skip_sim:
            t0 = time.time()
            s = simulate(lowbit)
            curve = [{"round": c["round"], "up_bytes": c.get("up_bytes", 0), "down_bytes": c.get("down_bytes", 0),
                      "cum_bytes": c["cum_bytes"], **({"accuracy": c["accuracy"]} if "accuracy" in c else {})}
                     for c in s["records"]]
            rows.append(summarize(f"lowbit simulate {args.up_bits}b up / {args.down_bits}b down", "lowbit",
                                  lowbit, curve, round(time.time() - t0, 1), command))
        plain, low = rows[0], rows[1]
        verdict[str(alpha)] = {"final_gap_points": round(100 * (plain["final_acc"] - low["final_acc"]), 2),
                               "last5_gap_points": round(100 * (plain["last5_acc"] - low["last5_acc"]), 2),
                               "bytes_ratio": round(plain["bytes_total"] / max(1, low["bytes_total"]), 2)}
        records += rows
    table = print_table(records, COLS, {"final_acc": "{:.4f}", "last5_acc": "{:.4f}", "best_acc": "{:.4f}"})
    print(json.dumps(verdict))
    setup = {k: v for k, v in base.to_dict().items() if k not in ("out", "progress", "ray", "address")}
    write_json(args.json, records, {"benchmark": "flower_sst2", "command": command, "setup": setup,
                                    "verdict": verdict, "table": table})
    print(f"wrote {plot(records, os.path.splitext(args.json)[0] + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
