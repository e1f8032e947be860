"""Per-step exchange time and bytes per rank of the lowbit transports on loopback gloo.

For a BERT-base-sized (109.5M) and a MiniLM-sized (22.7M) gradient (the real list of parameter
shapes, built from the transformers configs on ``torch.device("meta")``, no weights loaded), 4 ranks
on 127.0.0.1 run one training step's exchange with:

* ``allreduce``: fp32 ``dist.all_reduce`` of the flat gradient (the DDP baseline; bytes per rank
  are the ring all-reduce formula 2(p−1)/p·4N, not measured);
* ``ps``: :class:`ParameterServerTransport`, rank 0 is the only server, ranks 1..3 are workers
  (so 3 gradients are averaged);
* ``ring`` / ``tree``: :class:`RingTransport` / :class:`TreeTransport`, every rank owns a shard.

at 2/3/8 bits (clipped stochastic gradient frames up, m-bit sym-grid weight frames down, the
size of per-tensor LAQ-linear frames) and 32 bits (fp32 passthrough both ways). Frames are encoded
before the clock starts and the owners' ``apply`` is a no-op, so ``step_s`` is the exchange alone:
point-to-point transfers plus validating, decoding and summing the frames in fp32 (median over
``--reps`` steps of the slowest rank; on a host with few cores the fp32 decode and sum
dominate). ``bytes_per_rank`` is the largest number of bytes any rank sent in one step (the server for PS), frames plus 8-byte length prefixes; ``recv_max`` likewise.

    .venv/bin/python benchmarks/comm_loopback.py --models minilm bert-base --bits 2 3 8 32 --reps 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lowbit.benchmarks._common import RESULTS
from lowbit.codec.codecs import RawCodec, frame_from_qtensor
from lowbit.comm.collective import RingTransport, TreeTransport
from lowbit.comm.ps import ParameterServerTransport
from lowbit.quant.qtensor import QTensor, grid_k
from lowbit.testing import FrameOwner, run_ranks

RANKS = 4
METHODS = ("allreduce", "ps", "ring", "tree")


def model_shapes(name: str) -> dict[int, tuple]:
    """key -> shape of every parameter of BERT-base or MiniLM-L6 (built on the meta device)."""
    from transformers import BertConfig, BertModel
    if name == "bert-base":
        cfg = BertConfig()
    elif name == "minilm":
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=1536, num_attention_heads=12)
    else:
        raise SystemExit(f"unknown model {name!r} (bert-base | minilm)")
    with torch.device("meta"):
        m = BertModel(cfg)
    return {i: tuple(p.shape) for i, p in enumerate(m.parameters())}


def _frame(shape, bits: int, kind: str, key: int, step: int, gen: torch.Generator) -> bytes:
    """A frame of the right size and content type: fp32 raw at 32 bits, random m-bit sym codes otherwise."""
    if bits == 32:
        return RawCodec(torch.float32, kind).encode(torch.randn(shape, generator=gen), key=key, step=step).to_bytes()
    k = grid_k(bits)
    codes = torch.randint(0, 2 * k + 1, shape, generator=gen, dtype=torch.uint8)
    q = QTensor(codes=codes, scale=torch.tensor(0.01), bits=bits, grid="sym")
    return frame_from_qtensor(q, kind=kind, key=key, step=step).to_bytes()


def _grad_frames(shapes, bits, step, gen):
    return {k: _frame(s, bits, "grad", k, step, gen) for k, s in shapes.items()}


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def _bench_rank(rank, world, model, shapes, bits_list, reps):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(rank)
    n = sum(math.prod(s) for s in shapes.values())
    recs = []
    # fp32 all_reduce baseline (bits 32 only: it has no low-bit form)
    flat = torch.randn(n, generator=gen)
    times = [_timed(lambda: (dist.all_reduce(flat), flat.div_(world))) for _ in range(reps)]
    ab = 2 * (world - 1) * 4 * n // world
    recs.append(dict(method="allreduce", bits=32, model=model, ranks=world, step_s=statistics.median(times),
                     bytes_per_rank=ab, recv_max=ab, note="ring all-reduce formula 2(p-1)/p*4N"))
    del flat
    for bits in bits_list:
        # Encoded once per bit width and reused by every method and rep (all reps use step 1).
        grads = _grad_frames(shapes, bits, 1, gen)
        wframes = {k: _frame(s, bits, "weight", k, 1, gen) for k, s in shapes.items()}
        for method in ("ps", "ring", "tree"):
            if method == "ps":
                t = ParameterServerTransport(shapes, 1, timeout=900)
                is_worker = not t.is_server
            else:
                t = (RingTransport if method == "ring" else TreeTransport)(shapes, timeout=900)
                is_worker = True
            keys = t.owned_keys()
            owner = FrameOwner({k: wframes[k] for k in keys}, pipelined=False) if keys else None
            times, sent, recv = [], [], []
            for _ in range(reps):
                before = t.counter.snapshot()
                times.append(_timed(lambda: t.step(1, grads if is_worker else None, owner)))
                d = t.counter.delta(before)
                sent.append(d["sent"])
                recv.append(d["recv"])
            s_max = torch.tensor([max(sent), max(recv)], dtype=torch.int64)
            dist.all_reduce(s_max, op=dist.ReduceOp.MAX)
            recs.append(dict(method=method, bits=bits, model=model, ranks=world, step_s=statistics.median(times),
                             bytes_per_rank=int(s_max[0]), recv_max=int(s_max[1]),
                             note="1 server + 3 workers" if method == "ps" else "every rank owns a shard"))
            del owner, t
        del grads, wframes
    return recs


def run_model(model: str, bits_list, reps: int, world: int = RANKS) -> list[dict]:
    try:
        out = run_ranks(_bench_rank, world, model, model_shapes(model), bits_list, reps, timeout=3600, pg_timeout=900)
    except AssertionError as e:
        raise SystemExit(f"the benchmark's ranks failed: {e}") from None
    return out[0]


def table(recs: list[dict]) -> str:
    head = f"{'model':<10} {'method':<10} {'bits':>4} {'step_s':>8} {'MB sent/rank':>13} {'MB recv/rank':>13}"
    lines = [head, "-" * len(head)]
    for r in recs:
        lines.append(f"{r['model']:<10} {r['method']:<10} {r['bits']:>4} {r['step_s']:>8.3f} "
                     f"{r['bytes_per_rank'] / 1e6:>13.2f} {r['recv_max'] / 1e6:>13.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "bert-base"])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 8, 32])
    ap.add_argument("--reps", type=int, default=2, help="timed steps per configuration (median reported)")
    ap.add_argument("--json", default=str(RESULTS / "comm_loopback.json"))
    a = ap.parse_args(argv)
    for b in a.bits:
        if b not in (2, 3, 4, 5, 6, 7, 8, 32):
            raise SystemExit(f"--bits: {b} not in 2..8 or 32")
    recs = []
    t0 = time.time()
    for m in a.models:
        recs += [dict(r, reps=a.reps) for r in run_model(m, a.bits, a.reps)]
        print(table([r for r in recs if r["model"] == m]), flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    meta = {"ranks": RANKS, "backend": "gloo", "host": "loopback 127.0.0.1", "reps": a.reps,
            "cpus": os.cpu_count(), "wall_s": round(time.time() - t0, 1), "torch": torch.__version__}
    path = Path(a.json)
    if path.exists():  # keep the records of models not re-run this time
        try:
            old = json.loads(path.read_text())
            recs = [r for r in old.get("records", []) if r["model"] not in a.models] + recs
            meta["runs"] = old.get("meta", {}).get("runs", []) + [{"models": a.models, "reps": a.reps,
                                                                   "wall_s": meta["wall_s"]}]
        except (ValueError, KeyError):
            pass
    path.write_text(json.dumps({"meta": meta, "records": recs}, indent=1))
    print(f"wrote {a.json} ({meta['wall_s']} s)")


if __name__ == "__main__":
    main()
