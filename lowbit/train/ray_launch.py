"""Training with the Ray transport: S server actors (each a :class:`ShardServer` over its part of the
keys) and W worker actors (each a :class:`Worker` with its own data shard), wired by
:class:`lowbit.comm.ray.RayPS`; the driver (this process) runs the steps and reports them through the
same :class:`~lowbit.train.metrics.RunLog` and checkpoints as the SPMD loop (:mod:`lowbit.train.loop`).

The trajectory is the one the SPMD loop computes: the same model seed, the same data shards and
batches (:func:`batch_indices` with seed ``seed + worker``), worker ``w`` drawing its stochastic
rounding from ``step_generator(seed, w, step)`` like ring rank ``w``, and servers averaging over the
workers in worker order. With 32-bit codecs on both links it reproduces the ring run.

Cluster: ``transport.ray_address`` (or ``$LOWBIT_RAY_ADDRESS``) connects to a running cluster
("auto" for the one on this node); otherwise a local one is started (loopback, no dashboard) and shut
down at the end. An already initialized Ray is used as it is.

Faults: ``run.fault = "kill-worker:R@S"`` kills the worker of rank R (ranks as in the parameter
server: worker w is rank S + w) after step S; Ray replaces it, it re-fetches the weights and the run
goes on.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from lowbit.errors import ConfigError
from lowbit.train.checkpoint import Checkpointer, ResumePoint, fingerprint
from lowbit.train.config import Config, parse_fault
from lowbit.train.control import StopSignals
from lowbit.train.distill import make_distiller
from lowbit.train.loop import (batch_indices, batches, build_model, has_worker_state, load_data, load_worker_state,
                               save_worker_state)
from lowbit.train.metrics import RunLog, WholeFrames, step_record
from lowbit.train.plan import make_plan, piece_tensors, plan_bytes


def _threads(cfg: Config) -> int:
    t = cfg.transport
    return cfg.run.threads_per_rank or max(1, (os.cpu_count() or 1) // (t.workers + t.servers))


class ShardFactory:
    """Picklable: builds server ``index``'s :class:`ShardServer` (from a checkpoint when given)."""

    def __init__(self, cfg: Config, keys: list[int], resume_paths: list[str] | None = None):
        self.cfg, self.keys, self.resume_paths = cfg, list(keys), resume_paths

    def __call__(self):
        from lowbit.train.server import ShardServer

        model, _ = build_model(self.cfg)
        plan = make_plan(model, self.cfg.codec)
        params = piece_tensors(model, plan)
        owner = ShardServer([plan[k] for k in self.keys], {k: params[k] for k in self.keys}, self.cfg.optim,
                            total_steps=self.cfg.run.steps)
        if self.resume_paths:
            owner.load(self.resume_paths)
        return owner


class TrainWorker:
    """What a worker actor computes with: a :class:`Worker`, its data shard, its batches."""

    def __init__(self, cfg: Config, index: int, resume_path: str | None = None):
        from lowbit.train.worker import Worker

        self.cfg, self.index = cfg, index
        model, tok = build_model(cfg)
        plan = make_plan(model, cfg.codec)
        self.worker = Worker(model, plan, index, seed=cfg.run.seed, error_feedback=cfg.codec.error_feedback,
                             nonfinite=cfg.codec.nonfinite, distiller=make_distiller(cfg, model))
        self.train, self.dev = load_data(cfg, tok, index, cfg.transport.workers, leader=True)
        self.n_train = self.train["labels"].shape[0]
        if resume_path and not _reconstructed():
            load_worker_state(self.worker, Path(resume_path))  # a replaced actor starts its residuals at zero

    def load_weights(self, weights):
        self.worker.load_weights(weights)

    def compute(self, step: int):
        r = self.cfg.run
        idx = batch_indices(self.n_train, r.batch_size, step, r.seed + self.index)
        loss = self.worker.forward_backward({k: v[idx] for k, v in self.train.items()}, step,
                                            positions=self.index + self.cfg.transport.workers * idx)
        frames = self.worker.encode_gradients(step)
        return frames, {"loss": loss, "skipped": self.worker.skipped, "up_whole": self.worker.up_whole}

    def evaluate(self):
        return self.worker.evaluate(batches(self.dev, 64))

    def save(self, path: str) -> dict | None:
        return save_worker_state(self.worker, Path(path)) if has_worker_state(self.worker) else None


def _reconstructed() -> bool:
    try:
        import ray
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:
        return False


class WorkerFactory:
    def __init__(self, cfg: Config, index: int, resume_path: str | None = None):
        self.cfg, self.index, self.resume_path = cfg, index, resume_path

    def __call__(self):
        return TrainWorker(self.cfg, self.index, self.resume_path)


class _Stop(Exception):
    """Raised out of a step's callback when the driver was asked to stop."""


def run_ray(cfg: Config, resume: ResumePoint | None = None, stop: threading.Event | None = None,
            on_signal=None) -> dict:
    """Train with Ray actors; returns the summary (the keys of the SPMD loop's) and writes
    ``OUT/metrics.jsonl``, ``OUT/summary.json`` and checkpoints under ``OUT/ckpt``. ``resume``: the
    checkpoint to continue from (verified by :func:`lowbit.train.preflight.preflight`). ``stop``:
    once set, the run checkpoints the step it just finished and ends (``summary["stopped"]``).
    ``on_signal``: called on SIGTERM / SIGINT while the actors run (``ray.init`` installs handlers of
    its own that abort the driver; they are replaced for the run and put back after)."""
    cfg.validate()
    from lowbit.comm.ray import key_partition, ray_session

    r, t = cfg.run, cfg.transport
    W, S = t.workers, t.servers
    Path(r.out).mkdir(parents=True, exist_ok=True)
    model, _ = build_model(cfg)
    plan = make_plan(model, cfg.codec)
    del model
    shapes = {s.key: s.shape for s in plan}
    key_server = key_partition(shapes, S)
    keys_of = {j: sorted(k for k, o in key_server.items() if o == j) for j in range(S)}
    if any(not keys_of[j] for j in range(S)):
        raise ConfigError(f"{S} servers for {len(shapes)} parameter tensors leaves a server without keys")
    ck = Checkpointer(r.out)
    start = ResumePoint.start_of(resume)
    shards = [str(p) for p in ck.shard_files(start)] if start else None
    owners = [ShardFactory(cfg, keys_of[j], shards) for j in range(S)]
    workers = [WorkerFactory(cfg, w, str(ck.worker_path(start, w)) if start else None) for w in range(W)]
    with ray_session(num_cpus=max(2, W + S), temp_dir=t.ray_temp_dir or None,
                     address=t.ray_address or os.environ.get("LOWBIT_RAY_ADDRESS", "")):
        with StopSignals(on_signal) if on_signal is not None else contextlib.nullcontext():
            return _run(cfg, plan, shapes, key_server, ck, start, owners, workers, stop or threading.Event())


def _run(cfg: Config, plan, shapes, key_server, ck: Checkpointer, start: int, owners, workers,
         stop: threading.Event) -> dict:
    import ray

    from lowbit.comm.ray import RayPS

    r, t = cfg.run, cfg.transport
    fault = parse_fault(r.fault)
    ps = None
    try:
        ps = RayPS(owners, workers, shapes, start_step=start, timeout_s=t.timeout_s, threads=_threads(cfg),
                   key_server=key_server)
        pb = plan_bytes(plan)
        log = RunLog(cfg, start, start, lambda: ray.get(ps.workers[ps.alive[0]].evaluate.remote()))
        totals = [0.0, 0.0]
        whole = WholeFrames()  # weights go whole (no delta coding over Ray); gradients may be row-sparse
        clock = [time.perf_counter()]
        refetches = [0]
        done = [start]
        fp = fingerprint(cfg)

        def on_step(step: int, results: list[dict]) -> None:
            up = float(sum(x["up_sent"] for x in results))
            down = float(sum(x["down_recv"] for x in results))
            refetches[0] += sum(bool(x["fetched"]) for x in results)
            totals[0] += up
            totals[1] += down
            lr = ray.get(ps.servers[0].stats.remote())["lr"]
            up_whole, _ = whole.step(up, down, sum(x.get("up_whole", 1.0) for x in results) / len(results), 1.0)
            rec = step_record(step + 1, [x["loss"] for x in results], sum(x.get("skipped", 0) for x in results),
                              up, down, pb, time.perf_counter() - clock[0], lr, len(results), up_full=up_whole)
            log.step(rec, last=step + 1 == r.steps)
            done[0] = step + 1
            if (r.checkpoint_every and (step + 1) % r.checkpoint_every == 0) or step + 1 == r.steps or stop.is_set():
                _checkpoint(ps, ck, step + 1, fp, cfg.run.keep_checkpoints, {start} if start else set())
            if stop.is_set():
                raise _Stop
            if fault is not None and fault.step == step + 1:
                ps.kill_worker(fault.rank - t.servers, restart=True)
            clock[0] = time.perf_counter()

        stopped = False
        try:
            ps.run_steps(range(start, r.steps), on_step=on_step)
        except _Stop:
            stopped = True
        finally:
            ev = log.close(evaluate=not stop.is_set())
        return log.summary(ev, start=start, steps_done=done[0], up=totals[0], down=totals[1], plan_bytes=pb,
                           up_full=whole.scaled(totals[0], totals[1])[0], workers_alive=len(ps.alive),
                           weight_refetches=refetches[0], stopped=stopped)
    finally:
        if ps is not None:
            ps.shutdown()


def _checkpoint(ps, ck: Checkpointer, step: int, fp: dict, keep: int, protect: set[int]) -> None:
    """Every server saves its shard (and workers their error-feedback residuals), then the driver
    commits the manifest and ``latest.json``: they only ever name complete files."""
    import ray

    names = [f"shard_{j}.safetensors" for j in range(len(ps.servers))]
    refs = [srv.owner_call.remote("save", ck.shard_path(step, j)) for j, srv in enumerate(ps.servers)]
    names += [ck.worker_path(step, w).name for w in ps.alive]
    refs += [ps.workers[w].call.remote("save", str(ck.worker_path(step, w))) for w in ps.alive]
    files = {n: rec for n, rec in zip(names, ray.get(refs)) if rec is not None}
    ck.commit(step, files, fp)
    ck.prune(keep, protect)
