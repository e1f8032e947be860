"""Sender CPU of posting one PS worker's gradient upload, 2 gloo ranks on loopback.

    python benchmarks/p2p_send.py --json benchmarks/results/p2p_send.json

Rank 0 posts ``--groups`` chunk messages (``P2P.send_chunk``, one per key group) whose frames add up
to ``--mb`` MB (default: one MiniLM worker's 3-bit gradients, 8.5 MB, in 8 groups of one large
frame and 5 small ones each), rank 1 receives them as the server does; per step the thread CPU time
(``time.thread_time``) of rank 0's posting: laying out the messages plus the part of the sends the
calling thread does. Median of ``--reps`` steps. ``PYTHONPATH=<worktree>`` runs another version's
code (one whose ``send_chunk`` takes only joined bundles is given them joined).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, print_table, write_json  # noqa: E402


def _rank(rank: int, port: int, args, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from lowbit.comm.p2p import P2P, Pending, join
    big = int(args.mb * 1e6 / args.groups) - 5 * 3000
    groups = [[os.urandom(big)] + [os.urandom(3000) for _ in range(5)] for _ in range(args.groups)]
    bounds = [sum(map(len, g)) for g in groups]
    p2p = P2P(timeout=60.0)
    lists, cpu = True, []
    for step in range(args.reps + 2):
        dist.barrier()
        if rank == 0:
            pending = Pending("up")
            c0 = time.thread_time()
            for i, g in enumerate(groups):
                if lists:
                    try:
                        p2p.send_chunk(1, i, g, "up", pending, bound=bounds[i], reuse=i)
                        continue
                    except TypeError:  # a version whose send_chunk takes joined bundles only
                        lists = False
                p2p.send_chunk(1, i, join(g), "up", pending, bound=bounds[i], reuse=i)
            if step >= 2:  # two warm-up steps: pooled buffers allocated
                cpu.append(time.thread_time() - c0)
            p2p.finish(pending, step)
        else:
            for i, posted in enumerate(p2p.post_chunks(0, bounds, "up")):
                p2p.wait_chunk(0, i, step, posted)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        q.put({"mb": sum(bounds) / 1e6, "groups": args.groups, "frames_as_list": lists,
               "sender_cpu_ms": 1e3 * statistics.median(cpu), "reps": len(cpu)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.52)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=str(RESULTS / "p2p_send.json"))
    args = ap.parse_args(argv)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    row = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    print_table([row], ["mb", "groups", "frames_as_list", "sender_cpu_ms", "reps"],
                {"mb": "{:.2f}", "sender_cpu_ms": "{:.2f}"})
    write_json(args.json, [row], {"command": "python " + " ".join([sys.argv[0]] + sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
