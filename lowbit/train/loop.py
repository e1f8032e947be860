"""The training loop every rank runs (SPMD). One step, in order::

    worker.forward_backward(batch)          gradients at the low-bit weights ŵ
    worker.encode_gradients(step)           clip, quantize, pack: a LazyFrames (the PS encodes group
                                            i + 1 while group i is on the wire)
    transport.step(step, frames, owner)     frames up to the owners, which average in fp32, take the
                                            optimizer step and LAQ-quantize (ShardServer.apply_keys);
                                            weight frames down, decoded into the model's parameters
    log (leader), checkpoint

Ranks are told apart by the transport: in ``ps`` and ``ray`` mode ranks [0, S) are servers and the
rest workers; in ``ring``/``tree`` mode every rank is both. The first live worker rank (the *leader*)
logs metrics, shows the progress bar, evaluates and writes the summary. :mod:`lowbit.train.launch`
starts the ranks as processes, :mod:`lowbit.train.ray_launch` as Ray actors.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from lowbit.errors import ConfigError, LowbitError, TransportError
from lowbit.codec.delta import DeltaEncoder
from lowbit.train.checkpoint import Checkpointer, ResumePoint, fingerprint, load_tensors, save_tensors
from lowbit.train.config import Config, parse_fault
from lowbit.train.control import Control
from lowbit.train.data import batch_indices, batches, load_data, load_dev
from lowbit.train.distill import make_distiller
from lowbit.train.model import build_model
from lowbit.train.metrics import RunLog, WholeFrames, step_record
from lowbit.train.plan import make_plan, piece_tensors, plan_bytes
from lowbit.train.server import ShardServer
from lowbit.train.worker import Worker


class CheckpointError(LowbitError, RuntimeError):
    """A rank could not write its part of a checkpoint (a full disk, say); the previous one stands."""


def build_transport(cfg: Config, shapes: dict[int, tuple[int, ...]], device: torch.device):
    """The one place a transport is built from config (``ray``: inside a rank of a RayGroup)."""
    t = cfg.transport
    kw = {"timeout": t.timeout_s, "device": device}
    if t.kind == "ps":
        from lowbit.comm.ps import ParameterServerTransport
        return ParameterServerTransport(shapes=shapes, n_servers=t.servers, on_worker_failure=t.on_worker_failure,
                                        chunks=t.chunks, weights_channel=t.weights_channel,
                                        recv_window=t.recv_window, **kw)
    if t.kind == "ring":
        from lowbit.comm.collective import RingTransport
        return RingTransport(shapes=shapes, **kw)
    if t.kind == "tree":
        from lowbit.comm.collective import TreeTransport
        return TreeTransport(shapes=shapes, **kw)
    if t.kind == "ray":
        from lowbit.comm.ray import RayTransport
        return RayTransport(shapes=shapes, n_servers=t.servers, **kw)
    raise ConfigError(f"unknown transport {t.kind!r}")


_BUFFER = "buffer:"  # worker-state entries that are model buffers (the rest: error-feedback residuals)


def scheme_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state a scheme's activation quantizers keep in the worker's model (Q8BERT's EMA ranges)."""
    return {n: b for n, b in model.named_buffers() if ".act_quant." in n or ".lowbit_matmul_quant." in n}


def has_worker_state(worker: Worker) -> bool:
    return worker.ef is not None or bool(scheme_buffers(worker.model))


def save_worker_state(worker: Worker, path: Path) -> dict:
    """A worker's own state (its error-feedback residuals and its scheme's activation ranges)."""
    tensors = dict(worker.ef.residuals) if worker.ef else {}
    tensors.update({_BUFFER + n: b.detach().cpu().contiguous() for n, b in scheme_buffers(worker.model).items()})
    return save_tensors(path, tensors)


def load_worker_state(worker: Worker, path: Path) -> None:
    if not path.exists():
        return
    tensors = load_tensors(path)
    if worker.ef is not None:
        worker.ef.residuals = {k: v for k, v in tensors.items() if not k.startswith(_BUFFER)}
    buffers = scheme_buffers(worker.model)
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith(_BUFFER) and k[len(_BUFFER):] in buffers:
                buffers[k[len(_BUFFER):]].copy_(v)


def load_scheme_buffers(path: Path) -> dict[str, torch.Tensor]:
    """The activation-quantizer state saved in a worker-state file (name -> tensor)."""
    return {k[len(_BUFFER):]: v for k, v in load_tensors(path).items() if k.startswith(_BUFFER)}


def train(rank: int, world_size: int, cfg: Config, store, device: torch.device,
          resume: ResumePoint | None = None, console=None, join: int | None = None) -> dict | None:
    """Everything one rank does once its process group is up: returns the summary on the rank that
    wrote it, None elsewhere. ``resume``: the checkpoint to continue from (verified by the caller;
    None starts at step 0). ``console``: where the leader draws the progress bar. ``join``: this
    worker replaces one that died (Ray restarted it) and joins at that step, with the owners'
    current weights and fresh state of its own."""
    r, t = cfg.run, cfg.transport
    out = Path(r.out)
    model, tokenizer = build_model(cfg)
    plan = make_plan(model, cfg.codec)
    transport = build_transport(cfg, {s.key: s.shape for s in plan}, device)
    n_servers = t.n_servers
    is_worker = rank >= n_servers
    worker_index, n_workers = rank - n_servers, world_size - n_servers
    owned = transport.owned_keys() if (not is_worker or t.kind != "ps") else []
    params = piece_tensors(model, plan)
    owner = None
    if owned:
        delta = DeltaEncoder(cfg.codec.keyframe_every) if cfg.codec.delta_weights else None
        owner = ShardServer([plan[k] for k in owned], {k: params[k] for k in owned}, cfg.optim,
                            total_steps=r.steps, device=device, delta=delta)
    ck = Checkpointer(out)
    start = ResumePoint.start_of(resume)
    first = start if join is None else join  # the first step this rank trains
    if start and owner is not None:
        owner.load(ck.shard_files(start))
    worker = dev = None
    if is_worker:
        # Ray's worker w draws its rounding and dropout as ring rank w does: the Ray run reproduces the ring run
        draws = worker_index if t.kind == "ray" else rank
        worker = Worker(model, plan, draws, seed=r.seed, error_feedback=cfg.codec.error_feedback,
                        nonfinite=cfg.codec.nonfinite, device=device, distiller=make_distiller(cfg, model))
        if start and join is None:
            load_worker_state(worker, ck.worker_path(start, worker_index))
        train_set, dev = load_data(cfg, tokenizer, worker_index, n_workers, leader=rank == n_servers)
        n_train = train_set["labels"].shape[0]
    else:
        del model
    dest = worker.weight_buffers() if worker is not None else None  # weights are decoded in place
    weights = transport.fetch_weights(first, owner, out=dest)
    if worker is not None:
        worker.load_weights(weights)

    pb = plan_bytes(plan)
    ctl = Control(store, rank, world_size, t.timeout_s)
    fault = parse_fault(r.fault)
    log: RunLog | None = None
    base = transport.counter.snapshot()
    cum = [0.0, 0.0]  # bytes up / down since this launch's first step (as the leader last saw them)
    joins = 0  # the leader's count of workers that joined as replacements
    whole = WholeFrames()  # the leader's: what those bytes stand for as whole frames
    # this owner's weight frames: whole, sent (Ray's servers count what they served: a joining
    # worker gets key frames where the others get deltas)
    down_nbytes = getattr(transport, "down_nbytes", None) or (owner.down_nbytes if owner is not None else None)
    encoded = down_nbytes() if owner is not None else (0, 0)
    steps_done, stopped = first, False
    ckpt = _Checkpoints(ck, ctl, cfg, rank, worker_index, owner, worker, protect={start} if start else set())
    for step in range(first, r.steps):
        stop_at = ctl.begin_step(step)
        if stop_at is not None and step >= stop_at:
            stopped = True
            break
        t0 = time.perf_counter()
        before = transport.counter.snapshot()
        frames = None
        if worker is not None:
            idx = batch_indices(n_train, r.batch_size, step, r.seed + worker_index)
            loss = worker.forward_backward({k: v[idx] for k, v in train_set.items()}, step,
                                           positions=worker_index + n_workers * idx)
            frames = worker.encode_gradients(step, lazy=True)  # encoded as the transport reads them
        if fault is not None and fault.rank == rank and fault.step == step + 1 and join is None:
            os._exit(17)  # mid-step: gradients computed, nothing sent yet
        weights = transport.step(step, frames, owner, out=dest)
        if worker is not None:
            worker.load_weights(weights)
            ctl.publish("worker_step", step, [loss, float(worker.skipped), worker.up_whole,  # frames all encoded
                                              int(step == join)])
        dt = time.perf_counter() - t0
        if owner is not None:
            d, c = transport.counter.delta(before), transport.counter.delta(base)
            now = down_nbytes()
            ctl.publish("owner_bytes", step, [d["up_recv"], d["down_sent"], c["up_recv"], c["down_sent"],
                                              now[0] - encoded[0], now[1] - encoded[1], owner.lr()])
            encoded = now
        live = transport.live_workers
        leading = worker is not None and rank == min(live)
        if leading:
            if log is None:  # first step, or the previous leader is gone
                dev = dev if dev is not None else load_dev(cfg, tokenizer)
                log = RunLog(cfg, start, step, lambda: worker.evaluate(batches(dev, 64)), console=console)
            ws = ctl.gather("worker_step", step, live)
            os_ = ctl.gather("owner_bytes", step, transport.owners)
            up, down, enc_whole, enc_sent = (sum(v[i] for v in os_.values()) for i in (0, 1, 4, 5))
            cum = [sum(v[i] for v in os_.values()) for i in (2, 3)]
            joins += sum(v[3] for v in ws.values())
            up_whole, down_whole = whole.step(up, down, sum(v[2] for v in ws.values()) / max(1, len(ws)),
                                              enc_whole / enc_sent if enc_sent else 1.0)
            rec = step_record(step + 1, [v[0] for v in ws.values()], int(sum(v[1] for v in ws.values())), up, down,
                              pb, dt, os_[min(os_)][6], len(live), down_full=down_whole,
                              up_full=up_whole)
            log.step(rec, last=step + 1 == r.steps)
        steps_done = step + 1
        if (r.checkpoint_every and steps_done % r.checkpoint_every == 0) or steps_done == r.steps:
            ckpt.write(steps_done, leading, sorted(set(transport.owners) | set(live)))
    if stopped and ckpt.last != steps_done:  # a stop writes the last completed step, if not done already
        ckpt.write(steps_done, worker is not None and rank == min(transport.live_workers),
                   sorted(set(transport.owners) | set(transport.live_workers)))
    summary = None
    if log is not None:
        ev = log.close(evaluate=not stopped)
        lost = sorted(set(range(n_servers, world_size)) - set(transport.live_workers))
        up_whole, down_whole = whole.scaled(cum[0], cum[1])
        summary = log.summary(ev, start=start, steps_done=steps_done, up=cum[0], down=cum[1], plan_bytes=pb,
                              up_full=up_whole, down_full=down_whole, workers_lost=lost,
                              workers_alive=len(transport.live_workers), weight_refetches=joins, stopped=stopped)
    # Under torchrun the store may live in rank 0's process: it leaves only after everyone is done with it.
    ctl.publish("end", None)
    if rank == 0:
        try:
            ctl.gather("end", None, [q for q in sorted(set(transport.owners) | set(transport.live_workers)) if q != 0],
                       delete=False)
        except TransportError as e:
            print(f"lowbit: {e}", file=sys.stderr, flush=True)
    transport.close()
    return summary


class _Checkpoints:
    """Writes this rank's part of a checkpoint and commits it once every rank has written its part."""

    def __init__(self, ck: Checkpointer, ctl: Control, cfg: Config, rank: int, worker_index: int, owner, worker,
                 protect: set[int]):
        self.ck, self.ctl, self.cfg, self.rank, self.worker_index = ck, ctl, cfg, rank, worker_index
        self.owner, self.worker, self.protect = owner, worker, protect
        self.fingerprint = fingerprint(cfg)
        self.last: int | None = None

    def write(self, step: int, leading: bool, ranks: list[int]) -> None:
        """Every rank writes its files and reports their records; once every one of ``ranks`` (owners
        and live workers) has, every rank that saw them all commits (the same manifest and
        ``latest.json``: the store's host may leave right after the barrier, so the commit does not
        depend on one rank), and the leader prunes old checkpoints. Commits stay in step order: a
        rank reports the next checkpoint only after its own commit. A rank that dies while saving
        leaves the step uncommitted (the previous checkpoint stays the latest); a rank that cannot
        write (a full disk) fails every rank with a :class:`CheckpointError` naming it."""
        ck, files, error = self.ck, {}, None
        try:
            if self.owner is not None:
                files[f"shard_{self.rank}.safetensors"] = self.owner.save(ck.shard_path(step, self.rank))
            if self.worker is not None and has_worker_state(self.worker):
                path = ck.worker_path(step, self.worker_index)
                files[path.name] = save_worker_state(self.worker, path)
        except (OSError, SafetensorError) as e:  # safetensors reports a write error as its own type
            error = f"rank {self.rank}: {e}"
        self.ctl.publish("checkpoint", step, {"files": files, "error": error})
        try:
            marks = self.ctl.gather("checkpoint", step, ranks, delete=False)
        except TransportError as e:
            if leading:
                print(f"lowbit: checkpoint of step {step} not committed: {e}", file=sys.stderr, flush=True)
            return
        errors = [m["error"] for m in marks.values() if m.get("error")]
        if errors:  # the launcher's summary names the last complete checkpoint
            raise CheckpointError(f"checkpoint of step {step} could not be written: {'; '.join(errors)}")
        ck.commit(step, {n: rec for m in marks.values() for n, rec in m["files"].items()}, self.fingerprint)
        self.last = step
        if leading:
            ck.prune(self.cfg.run.keep_checkpoints, self.protect)
