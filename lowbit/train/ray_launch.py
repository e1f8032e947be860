"""Training with the Ray transport: S server actors (each a :class:`ShardServer` over its part of the
keys) and W worker actors (each a :class:`Worker` with its own data shard), wired by
:class:`lowbit.comm.ray.RayPS`; the driver (this process) runs the steps, logs, evaluates and
checkpoints.

The trajectory is the one :func:`lowbit.train.loop._train` computes: the same model seed, the same
data shards and batches (:func:`batch_indices` with seed ``seed + worker``), worker ``w`` drawing its
stochastic rounding from ``step_generator(seed, w, step)`` like ring rank ``w``, and servers
averaging over the workers in worker order. With 32-bit codecs on both links it reproduces the
ring run.

Cluster: ``transport.ray_address`` (or ``$LOWBIT_RAY_ADDRESS``) connects to a running cluster
("auto" for the one on this node); otherwise a local one is started (loopback, no dashboard,
``<repo>/.ray_tmp``) and shut down at the end. An already initialized Ray is used as it is.

Faults: ``run.fault = "kill-worker:W@S"`` kills worker actor W after step S (Ray replaces it; it
re-fetches the weights and the run goes on).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from lowbit.errors import ConfigError
from lowbit.progress import progress
from lowbit.train.config import Config
from lowbit.train.loop import Checkpointer, _batches, _load_worker, _save_worker, batch_indices, load_data
from lowbit.train.plan import make_plan, piece_tensors, plan_bytes

def _threads(cfg: Config) -> int:
    t = cfg.transport
    return cfg.run.threads_per_rank or max(1, (os.cpu_count() or 1) // (t.workers + t.servers))


def build_model(cfg: Config):
    """The model every role starts from (the same seed and dropout override as the SPMD loop)."""
    from lowbit.models.presets import load_preset

    torch.manual_seed(cfg.run.seed)
    model, tok = load_preset(cfg.run.model, num_labels=2)
    if cfg.run.dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.run.dropout
    return model, tok


class ShardFactory:
    """Picklable: builds server ``index``'s :class:`ShardServer` (from a checkpoint when given)."""

    def __init__(self, cfg: Config, keys: list[int], resume_path: str | None = None):
        self.cfg, self.keys, self.resume_path = cfg, list(keys), resume_path

    def __call__(self):
        from lowbit.train.server import ShardServer

        model, _ = build_model(self.cfg)
        plan = make_plan(model, self.cfg.codec)
        params = piece_tensors(model, plan)
        owner = ShardServer([plan[k] for k in self.keys], {k: params[k] for k in self.keys}, self.cfg.optim,
                            total_steps=self.cfg.run.steps)
        if self.resume_path:
            owner.load(Path(self.resume_path))
        return owner


class TrainWorker:
    """What a worker actor computes with: a :class:`Worker`, its data shard, its batches."""

    def __init__(self, cfg: Config, index: int, resume_path: str | None = None):
        from lowbit.train.worker import Worker

        self.cfg, self.index = cfg, index
        model, tok = build_model(cfg)
        plan = make_plan(model, cfg.codec)
        self.worker = Worker(model, plan, index, seed=cfg.run.seed, error_feedback=cfg.codec.error_feedback,
                             nonfinite=cfg.codec.nonfinite)
        self.train, self.dev = load_data(cfg, tok, index, cfg.transport.workers, leader=True)
        self.n_train = self.train["labels"].shape[0]
        if resume_path and not _reconstructed():
            _load_worker(self.worker, Path(resume_path))  # a replaced actor starts its residuals at zero

    def load_weights(self, weights):
        self.worker.load_weights(weights)

    def compute(self, step: int):
        r = self.cfg.run
        idx = batch_indices(self.n_train, r.batch_size, step, r.seed + self.index)
        loss = self.worker.forward_backward({k: v[idx] for k, v in self.train.items()}, step)
        frames = self.worker.encode_gradients(step)
        return frames, {"loss": loss, "skipped": self.worker.skipped}

    def evaluate(self):
        return self.worker.evaluate(_batches(self.dev, 64))

    def save(self, path: str) -> None:
        if self.worker.ef is not None:
            _save_worker(self.worker, Path(path))


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


def _parse_fault(spec: str) -> tuple[int, int] | None:
    if not spec:
        return None
    kind, _, where = spec.partition(":")
    who, _, at = where.partition("@")
    if kind not in ("kill-worker", "kill-rank") or not who.isdigit() or not at.isdigit():
        raise ConfigError(f"fault {spec!r}: the ray transport understands 'kill-worker:W@S'")
    return int(who), int(at)


def run_ray(cfg: Config) -> dict:
    """Train with Ray actors; returns the summary (the keys of the SPMD loop's) and writes
    ``OUT/metrics.jsonl``, ``OUT/summary.json`` and checkpoints under ``OUT/ckpt``."""
    cfg.validate()
    from lowbit.comm.ray import key_partition, ray_session

    r, t = cfg.run, cfg.transport
    W, S = t.workers, t.servers
    fault = _parse_fault(r.fault)
    if fault and fault[0] >= W:
        raise ConfigError(f"fault {r.fault!r} names worker {fault[0]}, there are {W}")
    out = Path(r.out)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = build_model(cfg)
    plan = make_plan(model, cfg.codec)
    del model
    shapes = {s.key: s.shape for s in plan}
    key_server = key_partition(shapes, S)
    keys_of = {j: sorted(k for k, o in key_server.items() if o == j) for j in range(S)}
    if any(not keys_of[j] for j in range(S)):
        raise ConfigError(f"{S} servers for {len(shapes)} parameter tensors leaves a server without keys")
    ck = Checkpointer(out)
    start = (ck.latest_step() or 0) if r.resume else 0
    owners = [ShardFactory(cfg, keys_of[j], str(ck.shard_path(start, j)) if start else None) for j in range(S)]
    workers = [WorkerFactory(cfg, w, str(ck.worker_path(start, w)) if start else None) for w in range(W)]

    with ray_session(num_cpus=max(2, W + S), temp_dir=t.ray_temp_dir or None,
                     address=t.ray_address or os.environ.get("LOWBIT_RAY_ADDRESS", "")):
        return _run(cfg, plan, shapes, key_server, ck, start, owners, workers, fault)


def _run(cfg, plan, shapes, key_server, ck, start, owners, workers, fault) -> dict:
    import ray

    from lowbit.comm.ray import RayPS

    r, t = cfg.run, cfg.transport
    W, S = t.workers, t.servers
    out = Path(r.out)
    ps = None
    try:
        ps = RayPS(owners, workers, shapes, start_step=start, timeout_s=t.timeout_s, threads=_threads(cfg),
                   key_server=key_server)
        pb = plan_bytes(plan)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
        metrics_fh = open(out / "metrics.jsonl", "a" if r.resume else "w")
        bar = progress(r.steps, initial=start, desc=f"ray w{cfg.codec.w_bits}/g{cfg.codec.g_bits}",
                       enabled=r.progress)
        totals = [0.0, 0.0, 0.0, 0.0]
        t_start = time.time()
        clock = [time.perf_counter()]
        refetches = [0]

        def on_step(step: int, results: list[dict]) -> None:
            dt = time.perf_counter() - clock[0]
            up = float(sum(x["up_sent"] for x in results))
            down = float(sum(x["down_recv"] for x in results))
            refetches[0] += sum(bool(x["fetched"]) for x in results)
            fp32_up = up * pb["fp32_frames"] / pb["grad_frames"]
            fp32_down = down * pb["fp32_frames"] / pb["weight_frames"]
            for i, v in enumerate((up, down, fp32_up, fp32_down)):
                totals[i] += v
            lr = ray.get(ps.servers[0].stats.remote())["lr"]
            rec = {"step": step + 1, "loss": sum(x["loss"] for x in results) / len(results), "lr": lr,
                   "bytes_up": int(up), "bytes_down": int(down), "fp32_bytes_up": int(fp32_up),
                   "fp32_bytes_down": int(fp32_down), "step_s": dt,
                   "skipped_grads": int(sum(x.get("skipped", 0) for x in results)), "workers": len(results)}
            if r.eval_every and (step + 1) % r.eval_every == 0 and step + 1 < r.steps:
                ev = ray.get(ps.workers[ps.alive[0]].evaluate.remote())
                rec.update({f"eval_{k}": v for k, v in ev.items()})
            if (step + 1) % max(1, r.log_every) == 0 or step + 1 == r.steps:
                metrics_fh.write(json.dumps(rec) + "\n")
                metrics_fh.flush()
            if (r.checkpoint_every and (step + 1) % r.checkpoint_every == 0) or step + 1 == r.steps:
                _checkpoint(ps, ck, step + 1)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", MB=f"{(up + down) / 1e6:.2f}", refresh=False)
                bar.update(1)
            if fault and fault[1] == step + 1:
                ps.kill_worker(fault[0], restart=True)
            clock[0] = time.perf_counter()

        try:
            ps.run_steps(range(start, r.steps), on_step=on_step)
        finally:
            metrics_fh.close()
            if bar is not None:
                bar.close()
        ev = ray.get(ps.workers[ps.alive[0]].evaluate.remote())
        summary = {
            "accuracy": ev["accuracy"], "eval_loss": ev["eval_loss"], "eval_n": ev["n"],
            "steps": r.steps, "start_step": start, "transport": "ray", "workers": W, "servers": S,
            "w_bits": cfg.codec.w_bits, "g_bits": cfg.codec.g_bits,
            "bytes_up": int(totals[0]), "bytes_down": int(totals[1]),
            "fp32_bytes_up": int(totals[2]), "fp32_bytes_down": int(totals[3]),
            "compression": float((totals[2] + totals[3]) / max(1.0, totals[0] + totals[1])),
            "wall_s": time.time() - t_start, "model": r.model, "task": r.task,
            "numel": pb["numel"], "grad_frame_bytes": pb["grad_frames"], "weight_frame_bytes": pb["weight_frames"],
            "fp32_frame_bytes": pb["fp32_frames"],
            "workers_alive": len(ps.alive), "weight_refetches": refetches[0],
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    finally:
        if ps is not None:
            ps.shutdown()


def _checkpoint(ps, ck: Checkpointer, step: int) -> None:
    """Every server saves its shard (and workers their error-feedback residuals), then the driver
    commits ``latest.json``: it only ever names a complete checkpoint."""
    import ray

    refs = [srv.owner_call.remote("save", ck.shard_path(step, j)) for j, srv in enumerate(ps.servers)]
    refs += [ps.workers[w].call.remote("save", str(ck.worker_path(step, w))) for w in ps.alive]
    ray.get(refs)
    ck.commit(step)
