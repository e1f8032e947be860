"""Spawn real gloo groups on 127.0.0.1 for the transport tests (children report via a queue)."""
from __future__ import annotations

import os
import queue as _queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, q) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        q.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as e:  # report, never hang the parent
        q.put((rank, "err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    # Flush the queue's feeder thread, then leave without destroy_process_group: a peer may have
    # left on purpose (bad-peer tests) and a teardown could wait on it.
    q.close()
    q.join_thread()
    os._exit(0)


def run_ranks(fn, world: int, *args, timeout: float = 90.0, may_fail: frozenset = frozenset()) -> dict[int, object]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return rank -> result. A child that
    raised makes this raise AssertionError with its traceback. Results must be plain picklable data.
    Ranks in ``may_fail`` may raise or exit without reporting (fault-injection tests): their result
    is ``{"failed": <first line of the error or the exit code>}``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            for r in may_fail:
                if r not in results and r not in errors and procs[r].exitcode not in (None, 0):
                    try:  # it may still have reported just before exiting
                        rank, status, val = q.get(timeout=0.2)
                        (results if status == "ok" else errors)[rank] = val
                    except _queue.Empty:
                        results[r] = {"failed": f"exit code {procs[r].exitcode}"}
            if len(results) + len(errors) >= world:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"ranks {sorted(set(range(world)) - set(results) - set(errors))} "
                                     f"did not report within {timeout}s")
            try:
                rank, status, val = q.get(timeout=min(left, 1.0))
            except _queue.Empty:
                continue
            (results if status == "ok" else errors)[rank] = val
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    for r in may_fail:
        if r in errors:
            results[r] = {"failed": errors.pop(r).splitlines()[0]}
    if errors:
        raise AssertionError("\n".join(f"rank {r}: {e}" for r, e in sorted(errors.items())))
    return results
