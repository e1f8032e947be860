"""The peer users would pick instead: plain DDP training with PyTorch's own PowerSGD (rank 4) or
fp16-compress comm hook, on the same model, data shards, batches, optimizer and schedule as the
lowbit runs of :mod:`train_sst2` (fp32 weights on every rank, Adam, linear warmup and decay).

Bytes: what each rank sends per step in the ring all-reduce of the hook's payload
(:func:`_comm_common.baseline_payload_bytes`: PowerSGD's P and Q plus the uncompressed 1-D
tensors), times ranks and steps; PowerSGD's first ``start_powerSGD_iter`` = 2 steps all-reduce
plain fp32 and are counted as such.
"""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.distributed as dist

from lowbit.testing import run_ranks

START_POWERSGD = 2


def _hook(kind: str):
    from lowbit.comm.hooks import PowerSGDState, fp16_hook, powerSGD_hook

    if kind == "fp16":
        return None, fp16_hook
    state = PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=START_POWERSGD,
                          use_error_feedback=True, warm_start=True)

    def waited(st, bucket):
        # PowerSGD chains its all_reduces (P, then Q) in future callbacks on gloo's threads; with
        # several buckets in flight those interleave differently on different ranks (a collective
        # mismatch). Waiting serializes the buckets (as in benchmarks/_comm_common.py).
        fut = powerSGD_hook(st, bucket)
        fut.wait()
        return fut

    return state, waited


def _rank(rank: int, world: int, spec: dict) -> dict | None:
    """One DDP rank (lowbit.testing.run_ranks has set up the gloo group); rank 0 returns the result."""
    from lowbit.models.presets import load_preset
    from lowbit.train.config import Config
    from lowbit.train.loop import batch_indices, batches, load_data
    from lowbit.train.server import lr_lambda

    cfg = Config()
    cfg.override("run", {"model": spec["model"], "steps": spec["steps"], "batch_size": spec["batch_size"],
                         "max_len": spec["max_len"], "train_subset": spec["train_subset"]})
    r = cfg.run
    torch.manual_seed(r.seed)  # identical initialisation on every rank
    model, tok = load_preset(r.model, num_labels=2)
    train, dev = load_data(cfg, tok, rank, world, rank == 0)
    n_train = train["labels"].shape[0]
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state, hook = _hook(spec["hook"])
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.Adam(ddp.parameters(), lr=spec["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec["steps"] // 10, spec["steps"]))
    t0 = time.time()
    for step in range(r.steps):
        ddp.train()
        torch.manual_seed((r.seed * 31 + rank * 1_000_033 + step) % (2**63 - 1))  # dropout
        idx = batch_indices(n_train, r.batch_size, step, r.seed + rank)
        loss = ddp(**{k: v[idx] for k, v in train.items()}).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"  ddp {spec['hook']} step {step + 1}/{r.steps} loss {float(loss):.4f}", file=sys.stderr,
                  flush=True)
    wall = time.time() - t0
    res = None
    if rank == 0:
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for b in batches(dev, 64):
                correct += int((model(**b).logits.argmax(-1) == b["labels"]).sum())
                total += b["labels"].numel()
        res = {"accuracy": correct / total, "wall_s": wall, "eval_n": total,
               "shapes": [tuple(p.shape) for p in model.parameters()]}
    dist.barrier()
    dist.destroy_process_group()
    return res


def run_ddp(hook: str, *, model: str, steps: int, batch_size: int, max_len: int, train_subset: int,
            lr: float, workers: int) -> dict:
    """One DDP training run with PyTorch's ``hook`` ("powersgd4" or "fp16"); returns a record in the
    format of :mod:`train_sst2`."""
    from lowbit.benchmarks._comm_common import baseline_payload_bytes

    spec = {"hook": {"powersgd4": "powersgd", "fp16": "fp16"}[hook], "model": model, "steps": steps,
            "batch_size": batch_size, "max_len": max_len, "train_subset": train_subset, "lr": lr}
    try:
        res = run_ranks(_rank, workers, spec, timeout=3600, pg_timeout=1800)[0]
    except AssertionError as e:
        raise RuntimeError(f"ddp run failed: {e}") from None
    shapes = [tuple(s) for s in res["shapes"]]
    n = sum(math.prod(s) for s in shapes)
    fp32_step = 2 * (workers - 1) / workers * n * 4  # one rank's sends in a ring all_reduce of fp32
    if hook == "powersgd4":
        step_bytes = baseline_payload_bytes("ddp_powersgd4", shapes, workers)
        sent = START_POWERSGD * fp32_step + (steps - START_POWERSGD) * step_bytes
    else:
        sent = steps * fp32_step / 2
    total = int(sent * workers)
    return {"transport": "ddp", "config": hook, "w_bits": 32, "g_bits": None, "accuracy": res["accuracy"],
            "bytes_up": total, "bytes_down": 0, "bytes_total": total, "fp32_bytes_total": int(steps * fp32_step * workers),
            "compression": steps * fp32_step * workers / max(1, total), "wall_s": res["wall_s"], "steps": steps,
            "model": model, "batch_per_worker": batch_size, "max_len": max_len, "train_subset": train_subset,
            "bytes_note": "all ranks' sends in the ring all-reduce of the hook's payload (formula, not counted)"}

