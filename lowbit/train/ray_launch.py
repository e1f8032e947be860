"""``lowbit train --transport ray``: every rank is a Ray actor running :func:`lowbit.train.loop.train`,
the loop every torch.distributed rank runs, over :class:`lowbit.comm.ray.RayTransport` (ranks [0, S)
are servers, the rest workers, as in the parameter server) and the store actor (the control plane).
The driver (this process) only starts the actors, waits for them and returns the leader's summary.

Cluster: ``transport.ray_address`` (or ``$LOWBIT_RAY_ADDRESS``) connects to a running cluster ("auto"
for the one on this node); otherwise a local one is started (loopback, no dashboard) and shut down at
the end. An already initialized Ray is used as it is.

Faults: a worker actor that dies (``run.fault = "kill-worker:R@S"``, ranks numbered as in the parameter
server) is restarted by Ray and joins at the step the servers are at, with fresh error-feedback
residuals; a worker that cannot come back is retired and the others go on. A server that dies ends
the run (:class:`lowbit.comm.ray_group.RankFailed`). Each rank's output goes to ``OUT/logs/rank_R.log``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch

from lowbit.errors import TransportError
from lowbit.train.checkpoint import ResumePoint
from lowbit.train.config import Config
from lowbit.train.control import STOP_GRACE_S, StopSignals, rank_step, request_stop


_CONSOLE = "lowbit/console"  # the store key the leader's progress bar goes through to the driver


class _Console:
    """The leader's progress bar, passed through the store to the driver's terminal."""

    def __init__(self, store, tty: bool):
        self.store, self.tty = store, tty

    def write(self, text: str) -> int:
        self.store.append(_CONSOLE, text.encode())  # waited for: the bar's pieces stay in order
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


def _rank(rank: int, cfg: Config, resume: ResumePoint | None, log_path: str, tty: bool) -> dict | None:
    """One rank, inside its actor: output to its log file, then the training loop (a replaced worker
    joins at the servers' step)."""
    from lowbit.comm.ray_group import group
    from lowbit.train.loop import train

    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    g = group()
    join = g.join_step() if g.replaced else None
    return train(rank, g.world_size, cfg, g.store, torch.device("cpu"), resume=resume,
                 console=_Console(g.store, tty), join=join)


def run_ray(cfg: Config, resume: ResumePoint | None = None, signals: StopSignals | None = None) -> dict:
    """Train with Ray actors; returns the summary (``OUT/metrics.jsonl``, ``OUT/summary.json`` and the
    checkpoints are written by the ranks, as in every launch). ``resume``: the checkpoint to continue
    from (verified by :func:`lowbit.train.preflight.preflight`). ``signals``: the launcher's
    SIGTERM/SIGINT counter; the first signal stops every rank at a step boundary with a checkpoint
    (``summary["stopped"]``), a second one (or the ranks not stopping in time) ends the run with
    :class:`lowbit.comm.ray_group.RankFailed` for rank -1. A failed rank raises RankFailed with its step."""
    cfg.validate()
    from lowbit.comm.ray_group import RankFailed, RayGroup, ray_session

    r, t = cfg.run, cfg.transport
    world = t.world_size
    logs = Path(r.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = r.threads_per_rank or max(1, (os.cpu_count() or 1) // world)
    address = t.ray_address or os.environ.get("LOWBIT_RAY_ADDRESS", "")
    with ray_session(num_cpus=max(2, world), temp_dir=t.ray_temp_dir or None, address=address):
        # ray.init put in handlers of its own that abort the driver: the launcher's go back in for the run
        with signals.again() if signals is not None else contextlib.nullcontext():
            group = RayGroup(world, t.servers, timeout_s=t.timeout_s, threads=threads)
            stop_at = []

            def poll() -> None:
                text = group.store.take(_CONSOLE)
                if text:
                    sys.stderr.write(text.decode(errors="replace"))
                    sys.stderr.flush()
                if signals is None or not signals.count:
                    return
                if not stop_at:
                    stop_at.append(request_stop(group.store, list(range(world))))
                    print(f"lowbit: stopping: every rank stops before step {stop_at[0] + 1} and checkpoints",
                          file=sys.stderr, flush=True)
                if signals.count > 1 or time.time() > signals.when + STOP_GRACE_S:
                    raise RankFailed(-1, "the ranks did not stop in time")

            try:
                tty = sys.stderr.isatty()
                results = group.run(_rank, [(q, cfg, resume, str(logs / f"rank_{q}.log"), tty) for q in range(world)],
                                    poll=poll)
                poll()  # the bar's last piece
            except RankFailed as e:
                with contextlib.suppress(Exception):
                    e.step = rank_step(group.store, e.rank) if e.rank >= 0 else None
                raise
            finally:
                group.shutdown()
    summary = next((s for s in results.values() if s is not None), None)
    if summary is None:
        raise TransportError("training finished but no rank wrote a summary")
    return summary
