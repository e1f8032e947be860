"""The training loop every rank runs (SPMD), and the launcher that spawns ranks on one machine.

One step, in order::

    worker: forward/backward at the low-bit weights ŵ -> g (screened for NaN/Inf)
    transport.step: clip, quantize, pack each key group's gradients (frames, LazyFrames: the PS
                    encodes group i + 1 while group i is on the wire) up to owners; owners average
                    in fp32, optimizer step, LAQ-quantize, pack; weight frames down to every worker
    worker: unpack -> ŵ for the next step

Ranks are told apart by the transport: in ``ps`` mode ranks [0, S) are servers and the rest
workers; in ``ring``/``tree`` mode every rank is both. The first worker rank (the *leader*) logs
metrics, shows the progress bar, evaluates and writes the summary.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lowbit.comm.board import Board
from lowbit.errors import ConfigError, TransportError
from lowbit.progress import progress
from lowbit.train.config import Config, parse_fault
from lowbit.train.plan import make_plan, piece_tensors, plan_bytes
from lowbit.train.server import ShardServer
from lowbit.train.worker import Worker


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def pick_backend(cfg: Config) -> str:
    b = cfg.transport.backend
    if b == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if b == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend nccl asked for, but no CUDA device is visible")
    return b


def build_transport(cfg: Config, shapes: dict[int, tuple[int, ...]], device: torch.device):
    """The one place a transport is built from config."""
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
    raise ConfigError(f"transport {t.kind!r} is not a torch.distributed transport")


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Positions step·B .. step·B+B-1 of an endless sequence of seeded epoch permutations of n."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = pos // n
    out = torch.empty_like(pos)
    for e in epochs.unique().tolist():  # at most two epochs per batch
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 9_973 + e))
        m = epochs == e
        out[m] = perm[pos[m] % n]
    return out


class Checkpointer:
    """``OUT/ckpt/step_N/shard_R.safetensors`` per owner and ``worker_R.safetensors`` per worker
    (error-feedback residuals); ``OUT/ckpt/latest.json`` is written (atomically) after a barrier by
    every rank that passed it, so it only ever names a complete checkpoint."""

    def __init__(self, out: Path):
        self.root = Path(out) / "ckpt"

    def latest_step(self) -> int | None:
        p = self.root / "latest.json"
        if not p.exists():
            return None
        return int(json.loads(p.read_text())["step"])

    def shard_path(self, step: int, rank: int) -> Path:
        return self.root / f"step_{step}" / f"shard_{rank}.safetensors"

    def worker_path(self, step: int, rank: int) -> Path:
        return self.root / f"step_{step}" / f"worker_{rank}.safetensors"

    def weights(self, step: int) -> dict[int, torch.Tensor]:
        """The fp32 weights of every piece saved at ``step`` (key -> tensor), gathered from all shards."""
        from safetensors.torch import load_file
        files = sorted((self.root / f"step_{step}").glob("shard_*.safetensors"))
        if not files:
            raise ConfigError(f"no checkpoint shards under {self.root / f'step_{step}'}")
        out: dict[int, torch.Tensor] = {}
        for f in files:
            out.update({int(k[2:]): v for k, v in load_file(str(f)).items() if k.startswith("w.")})
        return out

    def commit(self, step: int) -> None:
        p = self.root / "latest.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"step": step, "time": time.time()}))
        os.replace(tmp, p)


def _save_worker(worker: Worker, path: Path) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    res = worker.ef.residuals if worker.ef else {}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in res.items()} or {"_": torch.zeros(0)}, str(tmp))
    os.replace(tmp, path)


def _load_worker(worker: Worker, path: Path) -> None:
    from safetensors.torch import load_file
    if worker.ef is not None and path.exists():
        worker.ef.residuals = {k: v for k, v in load_file(str(path)).items() if k != "_"}


def load_data(cfg: Config, tokenizer, worker_index: int, n_workers: int, leader: bool):
    from lowbit.train.data import encode, load_glue_tsv

    r = cfg.run
    sents, labels = load_glue_tsv(r.task, "train", r.data_dir or None)
    if r.train_subset:
        g = torch.Generator().manual_seed(r.seed)
        idx = torch.randperm(len(sents), generator=g)[: r.train_subset].tolist()
        sents, labels = [sents[i] for i in idx], [labels[i] for i in idx]
    # each worker reads its own shard
    sents, labels = sents[worker_index::n_workers], labels[worker_index::n_workers]
    train = encode(tokenizer, sents, labels, max_len=r.max_len)
    return train, (load_dev(cfg, tokenizer) if leader else None)


def load_dev(cfg: Config, tokenizer) -> dict[str, torch.Tensor]:
    from lowbit.train.data import encode, load_glue_tsv

    r = cfg.run
    ds, dl = load_glue_tsv(r.task, "dev", r.data_dir or None)
    if r.eval_subset:
        ds, dl = ds[: r.eval_subset], dl[: r.eval_subset]
    return encode(tokenizer, ds, dl, max_len=r.max_len)


def _batches(data: dict[str, torch.Tensor], bs: int):
    n = data["labels"].shape[0]
    for i in range(0, n, bs):
        yield {k: v[i:i + bs] for k, v in data.items()}


def run_rank(rank: int, world_size: int, cfg: Config, init_method: str, local_rank: int = 0) -> dict | None:
    """Everything one rank does, from process-group init to the summary."""
    from lowbit.models.presets import load_preset

    cfg.validate()
    backend = pick_backend(cfg)
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    threads = cfg.run.threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    torch.set_num_threads(threads)
    timeout = timedelta(seconds=cfg.transport.timeout_s)
    if init_method == "env://" and "TORCHELASTIC_RESTART_COUNT" in os.environ:
        # Under torchrun, keys in the agent's store survive a restart of the group; a restarted
        # rank could read a dead peer's address. A prefix per attempt keeps each group apart.
        attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                             is_master=(rank == 0 and not agent), timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"lowbit/attempt_{attempt}", base),
                                rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timeout)
    try:
        return _train(rank, world_size, cfg, device, load_preset)
    finally:
        dist.destroy_process_group()


def _train(rank, world_size, cfg, device, load_preset) -> dict | None:
    r, t = cfg.run, cfg.transport
    out = Path(r.out)
    torch.manual_seed(r.seed)  # identical initialisation on every rank
    model, tokenizer = load_preset(r.model, num_labels=2)
    if r.dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = r.dropout
    plan = make_plan(model, cfg.codec)
    shapes = {s.key: s.shape for s in plan}
    transport = build_transport(cfg, shapes, device)
    n_servers = t.servers if t.kind == "ps" else 0
    is_worker = rank >= n_servers
    worker_index = rank - n_servers
    n_workers = world_size - n_servers
    leader = rank == n_servers
    owned = transport.owned_keys() if (not is_worker or t.kind != "ps") else []
    params = piece_tensors(model, plan)
    owner = None
    if owned:
        owner = ShardServer([plan[k] for k in owned], {k: params[k] for k in owned}, cfg.optim,
                            total_steps=r.steps, device=device)
    ck = Checkpointer(out)
    start = 0
    if r.resume:
        latest = ck.latest_step()
        if latest is not None:
            start = latest
            if owner is not None:
                owner.load(ck.shard_path(latest, rank))
    worker = None
    if is_worker:
        worker = Worker(model, plan, rank, seed=r.seed, error_feedback=cfg.codec.error_feedback,
                        nonfinite=cfg.codec.nonfinite, device=device)
        if r.resume and start:
            _load_worker(worker, ck.worker_path(start, rank))
        train, dev = load_data(cfg, tokenizer, worker_index, n_workers, leader)
        n_train = train["labels"].shape[0]
    else:
        del model
    dest = worker.weight_buffers() if worker is not None else None  # weights are decoded in place
    weights = transport.fetch_weights(start, owner, out=dest)
    if worker is not None:
        worker.load_weights(weights)

    pb = plan_bytes(plan)
    # Control plane (lowbit.comm.board), keys under lowbit/ctl/<kind>/<step>/<rank>:
    #   w   worker: [loss, skipped gradients], set before its gradients go up (counted => reported)
    #   o   owner: [up bytes received, down bytes sent] this step and since the loop started
    #   ck  a rank has written its part of a checkpoint;  end  a rank is done with the store
    ctl = Board(dist.distributed_c10d._get_default_store(), rank, t.timeout_s)
    log: _LeaderLog | None = None
    base = transport.counter.snapshot()
    cum = [0.0, 0.0]  # bytes up / down since this launch's first step (as the leader last saw them)
    t_start = time.time()
    for step in range(start, r.steps):
        t0 = time.perf_counter()
        before = transport.counter.snapshot()
        frames = None
        if worker is not None:
            idx = batch_indices(n_train, r.batch_size, step, r.seed + worker_index)
            loss = worker.forward_backward({k: v[idx] for k, v in train.items()}, step)
            frames = worker.encode_gradients(step, lazy=True)  # encoded as the transport reads them
            ctl.publish("w", step, [loss, float(worker.skipped)])  # before sending: counted => reported
        _maybe_fault(cfg, rank, step + 1)  # mid-step: gradients computed, nothing sent yet
        weights = transport.step(step, frames, owner, out=dest)
        if worker is not None:
            worker.load_weights(weights)
        dt = time.perf_counter() - t0
        if owner is not None:
            d, c = transport.counter.delta(before), transport.counter.delta(base)
            ctl.publish("o", step, [d["up_recv"], d["down_sent"], c["up_recv"], c["down_sent"]])
        live = transport.live_workers
        leading = worker is not None and rank == min(live)
        if leading:
            if log is None:  # first step, or the previous leader is gone
                log = _LeaderLog(cfg, out, step, start, worker, dev if dev is not None else load_dev(cfg, tokenizer))
            ws = ctl.gather("w", step, live)
            os_ = ctl.gather("o", step, transport.owners)
            up, down = (sum(v[i] for v in os_.values()) for i in (0, 1))
            cum = [sum(v[i] for v in os_.values()) for i in (2, 3)]
            rec = {"step": step + 1, "loss": sum(v[0] for v in ws.values()) / len(ws),
                   "lr": owner.lr() if owner is not None else None,
                   "bytes_up": int(up), "bytes_down": int(down),
                   "fp32_bytes_up": int(up * pb["fp32_frames"] / pb["grad_frames"]),
                   "fp32_bytes_down": int(down * pb["fp32_frames"] / pb["weight_frames"]),
                   "step_s": dt, "skipped_grads": int(sum(v[1] for v in ws.values())), "workers": len(live)}
            log.step(rec, last=step + 1 == r.steps)
        if (r.checkpoint_every and (step + 1) % r.checkpoint_every == 0) or step + 1 == r.steps:
            _checkpoint(ck, ctl, step + 1, rank, owner, worker, leading,
                        sorted(set(transport.owners) | set(live)))
    summary = None
    if log is not None:
        ev = log.close()
        fp32 = [cum[0] * pb["fp32_frames"] / pb["grad_frames"], cum[1] * pb["fp32_frames"] / pb["weight_frames"]]
        lost = sorted(set(range(n_servers, world_size)) - set(transport.live_workers))
        summary = {
            "accuracy": ev["accuracy"], "eval_loss": ev["eval_loss"], "eval_n": ev["n"],
            "steps": r.steps, "start_step": start, "transport": t.kind, "workers": n_workers,
            "workers_lost": lost, "servers": n_servers, "w_bits": cfg.codec.w_bits, "g_bits": cfg.codec.g_bits,
            "bytes_up": int(cum[0]), "bytes_down": int(cum[1]),
            "fp32_bytes_up": int(fp32[0]), "fp32_bytes_down": int(fp32[1]),
            "compression": float(sum(fp32) / max(1.0, sum(cum))),
            "wall_s": time.time() - t_start, "model": r.model, "task": r.task,
            "numel": pb["numel"], "grad_frame_bytes": pb["grad_frames"], "weight_frame_bytes": pb["weight_frames"],
            "fp32_frame_bytes": pb["fp32_frames"],
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    # The store lives in rank 0's process (tcp:// rendezvous): it leaves only after everyone is done with it.
    ctl.publish("end", None)
    if rank == 0:
        try:
            ctl.gather("end", None, [q for q in sorted(set(transport.owners) | set(transport.live_workers)) if q != 0],
                       delete=False)
        except TransportError as e:
            print(f"lowbit: {e}", file=sys.stderr, flush=True)
    transport.close()
    return summary


class _LeaderLog:
    """What the leading worker keeps: metrics.jsonl, the progress bar, periodic evaluation. A worker
    that takes the lead mid-run (the previous leader died) appends to the same file."""

    def __init__(self, cfg: Config, out: Path, step: int, start: int, worker: Worker, dev) -> None:
        self.cfg, self.worker, self.dev = cfg, worker, dev
        out.mkdir(parents=True, exist_ok=True)
        if step == start:
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
        fresh = step == start and not cfg.run.resume
        self.fh = open(out / "metrics.jsonl", "w" if fresh else "a")
        c = cfg.codec
        self.bar = progress(cfg.run.steps, initial=step, desc=f"{cfg.transport.kind} w{c.w_bits}/g{c.g_bits}",
                            enabled=cfg.run.progress)

    def step(self, rec: dict, last: bool) -> None:
        r = self.cfg.run
        if r.eval_every and rec["step"] % r.eval_every == 0 and not last:
            rec.update({f"eval_{k}": v for k, v in self.worker.evaluate(_batches(self.dev, 64)).items()})
        if rec["step"] % max(1, r.log_every) == 0 or last:
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", MB=f"{(rec['bytes_up'] + rec['bytes_down']) / 1e6:.2f}",
                                 workers=rec["workers"], refresh=False)
            self.bar.update(1)

    def close(self) -> dict:
        if self.bar is not None:
            self.bar.close()
        self.fh.close()
        return self.worker.evaluate(_batches(self.dev, 64))


def _checkpoint(ck: Checkpointer, ctl: Board, step: int, rank: int, owner, worker, leading: bool,
                ranks: list[int]) -> None:
    """Every rank writes its part and marks it in the store, then waits until all ``ranks`` (owners
    and live workers) have marked theirs (a barrier through the store); the leader then commits
    ``latest.json``. The wait matters: the store lives in rank 0's process, so rank 0 must not run
    ahead (and possibly die) before the marks are read. Every rank that saw all marks commits
    (the same atomic write of ``latest.json``): rank 0 hosts the store and may die right after the
    barrier, before a slower leader has read the marks (seen in CI), so the commit cannot depend on
    one rank. Commits stay in step order: a rank publishes the next step's mark only after its own
    commit. If a rank dies while saving, the step is not committed, the previous checkpoint stays
    the latest, and training goes on."""
    if owner is not None:
        owner.save(ck.shard_path(step, rank))
    if worker is not None and worker.ef is not None:
        _save_worker(worker, ck.worker_path(step, rank))
    ctl.publish("ck", step)
    try:
        ctl.gather("ck", step, ranks, delete=False)
    except TransportError as e:
        if leading:
            print(f"lowbit: checkpoint of step {step} not committed: {e}", file=sys.stderr, flush=True)
        return
    ck.commit(step)


def _maybe_fault(cfg: Config, rank: int, step: int) -> None:
    f = parse_fault(cfg.run.fault)
    if f is not None and f[1] == rank and f[2] == step:
        os._exit(17)


def _spawn_entry(rank: int, world_size: int, cfg: Config, init_method: str, q) -> None:
    try:
        res = run_rank(rank, world_size, cfg, init_method)
        q.put((rank, "ok", res))
    except BaseException as e:  # report to the launcher instead of dying silently
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise


def launch_local(cfg: Config) -> dict:
    """Spawn every rank on this machine (gloo over 127.0.0.1 unless configured otherwise) and
    return the leader's summary. Config errors surface here, before any process starts."""
    cfg.validate()
    if cfg.transport.kind == "ray":
        from lowbit.train.ray_launch import run_ray
        return run_ray(cfg)
    import torch.multiprocessing as mp

    world = cfg.transport.world_size
    port = cfg.transport.port or free_port(cfg.transport.addr)
    init = f"tcp://{cfg.transport.addr}:{port}"
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_spawn_entry, args=(r, world, cfg, init, q), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + cfg.transport.timeout_s * 4 + 600
    # In ps "continue" mode a worker rank may die: the servers go on without it.
    n_servers = cfg.transport.servers if cfg.transport.kind == "ps" else 0
    may_lose = set(range(n_servers, world)) if cfg.transport.on_worker_failure == "continue" else set()
    results, errors, lost = {}, {}, {}

    def drain() -> None:
        while not q.empty():
            rank, status, payload = q.get()
            if status == "ok":
                results[rank] = payload
            elif rank in may_lose:
                lost[rank] = payload.splitlines()[0]
            else:
                errors[rank] = payload.splitlines()[0]

    def exited() -> dict[int, int]:
        return {i: p.exitcode for i, p in enumerate(procs)
                if p.exitcode not in (None, 0) and i not in errors and i not in lost and i not in results}

    dead: dict[int, int] = {}
    while len(results) + len(lost) < world:
        drain()
        for i, c in exited().items():
            if i in may_lose:
                lost[i] = f"exited with code {c}"
        if len(lost) == len(may_lose) and may_lose:
            errors.setdefault(-1, "every worker was lost")
        dead = {i: c for i, c in exited().items() if i not in may_lose}
        if errors or dead:
            time.sleep(1.0)  # let the other ranks notice and report, then tell the whole story
            drain()
            dead = {i: c for i, c in exited().items() if i not in may_lose}
            break
        if time.time() > deadline:
            errors[-1] = "timed out waiting for ranks"
            break
        time.sleep(0.05)
    if errors or dead:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        parts = [f"rank {i} exited with code {c} without reporting (killed or crashed)" for i, c in sorted(dead.items())]
        parts += [f"rank {i}: {m}" for i, m in sorted(errors.items())]
        parts += [f"worker rank {i} lost earlier: {m}" for i, m in sorted(lost.items())]
        first = min(list(dead) + list(errors))
        raise RuntimeError(f"training failed on rank {first}: " + "; ".join(parts) +
                           f". Checkpoints under {cfg.run.out}/ckpt are intact; rerun with --resume to continue.")
    for p in procs:
        p.join(60)
    summaries = [res for res in results.values() if res is not None]
    if not summaries:
        raise RuntimeError("training finished but no rank wrote a summary")
    if lost:
        print("lowbit: continued without worker ranks " +
              "; ".join(f"{i} ({m})" for i, m in sorted(lost.items())), file=sys.stderr, flush=True)
    return summaries[0]
