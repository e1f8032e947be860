"""Federated-style simulation with quantized links (FedAvg, McMahan et al. AISTATS 2017; FedAdam,
Reddi et al. ICLR 2021 "Adaptive federated optimization").

One round, as data::

    server (fp32 global w)                                  client i (of the sampled m = ⌈fraction·K⌉)
      ŵ frames = downlink codec(w)  ==== bytes ====>  start = decode(ŵ frames)
                                                       E local steps (SGD or Adam) on its examples -> w_i
                                                       Δ_i = w_i − start   (+ e_i, error feedback)
      Δ_i = decode(frames)          <=== bytes =====  frames = uplink codec(Δ_i + e_i),  e_i ← Δ_i + e_i − decode
      FedAvg:  w ← w + η·Σ n_i Δ_i / Σ n_i                        (n_i = client i's examples, η = 1)
      FedAdam: Δ = Σ n_i Δ_i / Σ n_i,  m ← β₁m + (1−β₁)Δ,  v ← β₂v + (1−β₂)Δ²,  w ← w + η·m/(√v + τ)

Downlink: LAQ weights (``WeightCodec("laq-linear", down_bits)``) for matrices, fp32 for 1-D tensors
(LayerNorm, biases); ``down_bits=32`` sends fp32 everywhere. Uplink: clipped stochastic m-bit
(``StochasticGradCodec(up_bits, clip)``) of the model delta for matrices, fp32 for 1-D tensors;
``up_bits=32`` sends fp32. Bytes are the lengths of the real frames.

Determinism: everything a client does is a pure function of (global frame bytes, client id, round,
seed) and its own error-feedback residual, which lives with the client (on the actor that always
serves it), so the sequential and the Ray execution give identical results.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lowbit.errors import ConfigError
from lowbit.sim.backend import RayPool, SequentialPool
from lowbit.sim.client import ClientResult, ClientRunner, local_batch_indices, make_local_optimizer
from lowbit.sim.config import AGGREGATORS, LINK_BITS, LOCAL_OPTIMIZERS, WEIGHTS, FedConfig, mix_seed
from lowbit.sim.links import LinkSpec, decode_tensors, encode_tensors, link_nbytes, link_spec, make_link_plan
from lowbit.sim.model import build_model, evaluate, load_task_data, trainable
from lowbit.sim.partition import (client_drops, dirichlet_split, iid_split, label_skew, make_splits,
                                  sample_clients)
from lowbit.sim.strategy import FedAdam, FedAvg, FedServer

__all__ = [
    "FedConfig", "iid_split", "dirichlet_split", "label_skew", "sample_clients", "client_drops",
    "local_batch_indices", "LinkSpec", "link_spec", "make_link_plan", "encode_tensors", "decode_tensors",
    "link_nbytes", "build_model", "ClientResult", "ClientRunner", "FedServer", "FedAvg", "FedAdam",
    "SequentialPool", "RayPool", "simulate", "plot_accuracy_vs_bytes", "main", "load_task_data",
    "rounds_to_target", "evaluate", "make_splits", "mix_seed", "make_local_optimizer", "trainable",
    "LINK_BITS", "AGGREGATORS", "WEIGHTS", "LOCAL_OPTIMIZERS",
]


# --------------------------------------------------------------------------- driver


def simulate(cfg: FedConfig, train: dict[str, torch.Tensor] | None = None,
             eval_data: dict[str, torch.Tensor] | None = None, *, return_state: bool = False) -> dict:
    """Run ``cfg.rounds`` rounds. ``train``/``eval_data`` (dicts of tensors with ``labels``) default
    to the task's tokenized train/dev subsets. Returns the summary (with ``records``, one per round;
    ``weights`` the final fp32 global weights when ``return_state``) and writes
    ``<out>/rounds.jsonl``, ``<out>/summary.json`` and ``<out>/accuracy_vs_bytes.png`` when
    ``cfg.out`` is set."""
    cfg.validate()
    if cfg.address:
        cfg = dataclasses.replace(cfg, ray=True)
    if train is None or eval_data is None:
        t, e = load_task_data(cfg)
        train = t if train is None else train
        eval_data = e if eval_data is None else eval_data
    labels = train["labels"]
    splits = make_splits(cfg, labels)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    server = FedServer(cfg, build_model(cfg))
    sizes = link_nbytes(server.plan)
    out = Path(cfg.out) if cfg.out else None
    jsonl = None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        jsonl = (out / "rounds.jsonl").open("w")
    pool = (RayPool if cfg.ray else SequentialPool)(cfg, train, splits)
    records: list[dict] = []
    cum = cum32 = 0
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.rounds, desc=f"fed up{cfg.up_bits}/down{cfg.down_bits}", unit="round",
                   file=sys.stderr, dynamic_ncols=True)
    t0 = time.time()
    try:
        if cfg.eval_every:
            rec = {"round": 0, **server.evaluate(eval_data), "cum_bytes": 0, "cum_fp32_bytes": 0}
            records.append(rec)
            if jsonl:
                jsonl.write(json.dumps(rec) + "\n")
        for rnd in range(1, cfg.rounds + 1):
            tr = time.time()
            clients = sample_clients(cfg, rnd)
            gbytes = server.broadcast(rnd)
            results = pool.run_round(gbytes, clients, rnd)
            reported = server.aggregate(results)
            ups = [len(r.up) for r in results if not r.dropped]
            down = len(gbytes) * len(clients)
            up = sum(ups)
            fp32 = sizes["fp32"] * (len(clients) + reported)
            cum += up + down
            cum32 += fp32
            losses = [r.loss for r in results if not r.dropped]
            rec = {"round": rnd, "clients": clients, "reported": reported, "dropped": len(clients) - reported,
                   "down_bytes_per_client": len(gbytes), "up_bytes_per_client": (up // reported) if reported else 0,
                   "down_bytes": down, "up_bytes": up, "bytes": up + down,
                   "fp32_bytes": fp32, "cum_bytes": cum, "cum_fp32_bytes": cum32,
                   "train_loss": float(np.mean(losses)) if losses else None}
            if (cfg.eval_every and rnd % cfg.eval_every == 0) or rnd == cfg.rounds:
                rec.update(server.evaluate(eval_data))
            rec["time_s"] = round(time.time() - tr, 3)
            records.append(rec)
            if jsonl:
                jsonl.write(json.dumps(rec) + "\n")
                jsonl.flush()
            if bar is not None:
                post = {"MB": f"{cum / 1e6:.1f}"}
                if "accuracy" in rec:
                    post["acc"] = f"{rec['accuracy']:.3f}"
                bar.set_postfix(post)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if jsonl:
            jsonl.close()
        pool.close()
        torch.set_num_threads(threads)
    evals = [r for r in records if "accuracy" in r]
    summary = {"config": cfg.to_dict(), "link_nbytes": sizes,
               "label_skew": label_skew(splits, labels), "client_sizes": [len(s) for s in splits],
               "final_accuracy": evals[-1]["accuracy"] if evals else None,
               "best_accuracy": max(r["accuracy"] for r in evals) if evals else None,
               "total_bytes": cum, "total_fp32_bytes": cum32, "wall_s": round(time.time() - t0, 2)}
    if out:
        (out / "summary.json").write_text(json.dumps({**summary, "records": records}, indent=1))
        plot_accuracy_vs_bytes({f"up {cfg.up_bits}b / down {cfg.down_bits}b": records},
                               out / "accuracy_vs_bytes.png")
    summary["records"] = records
    if return_state:
        summary["weights"] = [w.clone() for w in server.weights]
    return summary


def rounds_to_target(records: Sequence[dict], target: float) -> dict | None:
    """The first evaluated round whose accuracy reaches ``target`` (its round and cumulative bytes)."""
    for r in records:
        if r.get("accuracy") is not None and r["accuracy"] >= target:
            return {"round": r["round"], "cum_bytes": r["cum_bytes"], "cum_fp32_bytes": r["cum_fp32_bytes"]}
    return None


def plot_accuracy_vs_bytes(runs: dict[str, Sequence[dict]], path: str | Path, target: float | None = None,
                           title: str = "accuracy vs cumulative bytes (up + down)") -> Path:
    """One line per run: held-out accuracy against cumulative link bytes (MB, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, recs in runs.items():
        pts = [(max(r["cum_bytes"], 1) / 1e6, r["accuracy"]) for r in recs if r.get("accuracy") is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, label=label)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes on the links (MB)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI


def _alpha(s: str) -> float | None:
    return None if s.lower() in ("iid", "none") else float(s)


def build_parser() -> argparse.ArgumentParser:
    d = FedConfig()
    p = argparse.ArgumentParser(prog="lowbit simulate",
                                description="Federated simulation with quantized links (FedAvg / FedAdam).")
    a = p.add_argument
    a("--clients", type=int, default=d.clients, help="K clients")
    a("--fraction", type=float, default=d.fraction, help="fraction of clients sampled per round")
    a("--rounds", type=int, default=d.rounds)
    a("--local-steps", type=int, default=d.local_steps, help="E local optimizer steps")
    a("--local-epochs", type=int, default=d.local_epochs, help="> 0: local epochs instead of steps")
    a("--local-batch", type=int, default=d.local_batch)
    a("--local-lr", type=float, default=d.local_lr)
    a("--local-momentum", type=float, default=d.local_momentum)
    a("--local-optimizer", choices=LOCAL_OPTIMIZERS, default=d.local_optimizer,
      help="client optimizer (state reset every round)")
    a("--alpha", type=_alpha, default=d.alpha, help="Dirichlet alpha over labels, or 'iid'")
    a("--up-bits", type=int, default=d.up_bits, help="uplink bits: 2..8 or 32")
    a("--down-bits", type=int, default=d.down_bits, help="downlink bits: 2..8 or 32")
    a("--per-row", action="store_true", help="downlink: one scale per row")
    a("--clip", type=float, default=d.clip, help="uplink clip factor c (0 = no clipping)")
    a("--error-feedback", action="store_true", help="per-client uplink error feedback")
    a("--aggregator", choices=AGGREGATORS, default=d.aggregator)
    a("--weight", choices=WEIGHTS, default=d.weight,
      help="a client's weight in the average: its examples, or the examples it trained on this round")
    a("--server-lr", type=float, default=None)
    a("--server-betas", type=float, nargs=2, default=list(d.server_betas))
    a("--server-tau", type=float, default=d.server_tau)
    a("--dropout-prob", type=float, default=d.dropout_prob, help="client drop-out probability per round")
    a("--seed", type=int, default=d.seed)
    a("--model", default=d.model, help="model preset")
    a("--model-config", type=json.loads, default=None,
      help="JSON BertConfig kwargs for a random-init BERT instead of the preset")
    a("--freeze", nargs="+", default=list(d.freeze), metavar="PREFIX",
      help="parameter-name prefixes kept at their initial values (not trained, not sent)")
    a("--task", default=d.task)
    a("--max-len", type=int, default=d.max_len)
    a("--train-subset", type=int, default=d.train_subset)
    a("--eval-subset", type=int, default=d.eval_subset)
    a("--eval-every", type=int, default=d.eval_every)
    a("--threads", type=int, default=d.threads, help="torch threads for client compute (0 = torch default)")
    a("--ray", action="store_true", help="run clients on Ray actors (a local cluster)")
    a("--address", default=None, help="an existing Ray cluster (implies --ray)")
    a("--ray-cpus", type=int, default=d.ray_cpus)
    a("--ray-actors", type=int, default=d.ray_actors)
    a("--out", default=d.out)
    a("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(args: argparse.Namespace) -> FedConfig:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(FedConfig) if hasattr(args, f.name)}
    kw["server_betas"] = tuple(kw["server_betas"])
    kw["freeze"] = tuple(kw["freeze"])
    if kw["clip"] is not None and kw["clip"] == 0:
        kw["clip"] = None
    return FedConfig(**kw).validate()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        summary = simulate(cfg)
    except ConfigError as e:
        print(f"lowbit simulate: {e}", file=sys.stderr)
        return 2
    brief = {k: v for k, v in summary.items() if k not in ("records", "client_sizes", "config")}
    print(json.dumps(brief, indent=1))
    if cfg.out:
        print(f"wrote {cfg.out}/rounds.jsonl, summary.json, accuracy_vs_bytes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
