"""Helpers for tests and benchmarks: the process-wide settings a run may change, saved and restored;
ranks of a real gloo group on this machine (:func:`run_ranks`, :func:`free_port`); stand-in owners
(:class:`SGDOwner`, :class:`FrameOwner`); the tiny training run tests start from (:func:`tiny_config`).

:func:`process_settings` reads every setting a lowbit call or a benchmark may change for the whole
process (torch's thread count, the environment, the working directory, the codec and LAQ switches,
codec threads, the compiled loops' SIMD and streaming-store choices); :func:`restore_settings` puts
them back; :func:`kept_settings` is both around a block. The test suite checks after every test that
nothing changed (``tests/conftest.py``), so tests pass in any order and at any thread count.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import torch

__all__ = ["process_settings", "restore_settings", "kept_settings", "settings_diff", "free_port", "run_ranks",
           "SGDOwner", "FrameOwner", "resealed"]


def process_settings() -> dict[str, Any]:
    """A snapshot of the process-wide settings (plain values, comparable with ``==``)."""
    from lowbit.codec import native, threads
    from lowbit.quant import weights

    s: dict[str, Any] = {
        "torch.num_threads": torch.get_num_threads(),
        "torch.default_dtype": torch.get_default_dtype(),
        "torch.grad_enabled": torch.is_grad_enabled(),
        "torch.deterministic": torch.are_deterministic_algorithms_enabled(),
        "os.environ": dict(os.environ),
        "cwd": os.getcwd(),
        "sys.path": list(sys.path),
        "codec.native": native.native_codec_enabled(),
        "codec.threads": threads.get_codec_threads(),
        "laq.native": weights._native_on,
    }
    if native.lib is not None:
        s["codec.simd"] = native.lib.simd(-1)
        s["codec.nt_stores"] = native.lib.nt_stores(-1)
    if weights._laq is not None:
        s["laq.simd"] = weights._laq.simd(-1)
    return s


def settings_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed between two snapshots, one line per setting (environment variables by name)."""
    out = []
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k), after.get(k)
        if a == b:
            continue
        if k == "os.environ":
            for v in sorted(set(a) | set(b)):
                if a.get(v) != b.get(v):
                    out.append(f"environment variable {v}: {a.get(v)!r} -> {b.get(v)!r}")
        elif k == "sys.path":
            added, removed = [p for p in b if p not in a], [p for p in a if p not in b]
            out.append(f"sys.path: added {added}, removed {removed}" if added or removed
                       else f"sys.path: reordered or duplicated: {a} -> {b}")
        else:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def restore_settings(s: dict[str, Any]) -> None:
    """Put back the settings of a :func:`process_settings` snapshot."""
    from lowbit.codec import native, threads
    from lowbit.quant import weights

    if torch.get_num_threads() != s["torch.num_threads"]:
        torch.set_num_threads(s["torch.num_threads"])
    torch.set_default_dtype(s["torch.default_dtype"])
    torch.set_grad_enabled(s["torch.grad_enabled"])
    torch.use_deterministic_algorithms(s["torch.deterministic"])
    if dict(os.environ) != s["os.environ"]:
        os.environ.clear()
        os.environ.update(s["os.environ"])
    if os.getcwd() != s["cwd"]:
        os.chdir(s["cwd"])
    sys.path[:] = s["sys.path"]
    native._on = s["codec.native"]
    threads.set_codec_threads(s["codec.threads"])
    weights._native_on = s["laq.native"]
    if "codec.simd" in s:
        native.lib.simd(1 if s["codec.simd"] else 0)
        native.lib.nt_stores(s["codec.nt_stores"])
    if "laq.simd" in s:
        weights._laq.simd(1 if s["laq.simd"] else 0)


@contextlib.contextmanager
def kept_settings() -> Iterator[dict[str, Any]]:
    """Run a block (a benchmark's ``main``, say) and restore every process-wide setting afterwards."""
    s = process_settings()
    try:
        yield s
    finally:
        restore_settings(s)


# ----------------------------------------------------------------------------- a tiny training run

def tiny_config(out, *layers: dict[str, dict[str, Any]]):
    """A :class:`lowbit.train.config.Config` for tests: tiny-bert, 2 ring workers, fp32 links, Adam
    lr 1e-3, 4 steps of batch 4 on 64 training / 32 dev examples, one thread per rank, no progress,
    writing to ``out``. Each layer ({section: {option: value}}) overrides in order; validated."""
    from lowbit.train.config import Config

    cfg = Config()
    base = {"transport": {"kind": "ring", "workers": 2, "timeout_s": 60},
            "codec": {"w_bits": 32, "g_bits": 32, "embed_bits": 32, "head_bits": 32},
            "optim": {"name": "adam", "lr": 1e-3},
            "run": {"model": "tiny-bert", "steps": 4, "batch_size": 4, "max_len": 16, "train_subset": 64,
                    "eval_subset": 32, "seed": 0, "dropout": 0.0, "threads_per_rank": 1, "progress": False,
                    "out": str(out)}}
    for layer in (base, *layers):
        for section, values in layer.items():
            cfg.override(section, values)
    return cfg.validate()


# ----------------------------------------------------------------------------- ranks on this machine

def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on ``addr`` now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, fn, args, q, pg_timeout: float) -> None:
    from datetime import timedelta
    import traceback

    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=pg_timeout))
        q.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as e:  # report, never hang the parent
        q.put((rank, "err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    # Flush the queue's feeder thread, then leave without destroy_process_group: a peer may have
    # left on purpose (bad-peer tests) and a teardown could wait on it.
    q.close()
    q.join_thread()
    os._exit(0)


def run_ranks(fn, world: int, *args, timeout: float = 90.0, may_fail: frozenset = frozenset(),
              pg_timeout: float = 60.0) -> dict[int, object]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks over 127.0.0.1 (spawned processes, one
    torch thread each); return rank -> result. A rank that raised makes this raise AssertionError
    with its traceback. Results must be plain picklable data. Ranks in ``may_fail`` may raise or exit
    without reporting (fault injection): their result is ``{"failed": <first line of the error or
    the exit code>}``. ``pg_timeout``: the process group's timeout (its collectives)."""
    import queue as _queue
    import time

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world, port, fn, args, q, pg_timeout), daemon=True) for r in range(world)]
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
        q.close()
    for r in may_fail:
        if r in errors:
            results[r] = {"failed": errors.pop(r).splitlines()[0]}
    if errors:
        raise AssertionError("\n".join(f"rank {r}: {e}" for r, e in sorted(errors.items())))
    return results


# ----------------------------------------------------------------------------- stand-in owners

class SGDOwner:
    """A stand-in :class:`~lowbit.comm.transport.Owner`: fp32 weights ``init`` (key -> tensor) updated
    by plain SGD (``w -= lr * g``), weight frames from ``codec`` (fp32 by default). Keeps what it was
    given: ``grads`` (the last step's averages), ``counts`` (the last step's contributions) and
    ``count_history`` (every step's), ``step_done``. ``strict_steps``: weight frames asked for a step
    other than the number of updates applied fail an assertion (the weights for step s are those
    after s updates)."""

    def __init__(self, init: dict, lr: float = 1.0, codec=None, strict_steps: bool = False):
        from lowbit.codec.codecs import RawCodec

        self.w = {int(k): v.detach().clone().float() for k, v in init.items()}
        self.lr, self.strict_steps = lr, strict_steps
        self.codec = codec if codec is not None else RawCodec(torch.float32, "weight")
        self.grads: dict = {}
        self.counts: dict = {}
        self.count_history: list[dict] = []
        self.step_done = 0

    def owned_keys(self):
        return sorted(self.w)

    def apply(self, step, grads, counts) -> None:
        self.grads = {k: g.clone() for k, g in grads.items()}
        self.counts = dict(counts)
        self.count_history.append(dict(counts))
        for k, g in grads.items():
            self.w[k] -= self.lr * g
        self.step_done = step + 1

    def weight_frames(self, step):
        assert not self.strict_steps or step == self.step_done, (step, self.step_done)
        return {k: self.codec.encode(w, key=k, step=step).to_bytes() for k, w in self.w.items()}


class FrameOwner:
    """A stand-in Owner whose weight frames are made beforehand (``frames``: key -> bytes), for timing
    an exchange alone: ``apply`` only keeps the counts. ``pipelined``: it also offers the step by key
    group (``apply_keys``), as :class:`~lowbit.train.server.ShardServer` does, so the parameter server
    pipelines it; otherwise it gets one ``apply`` per step."""

    def __init__(self, frames: dict, pipelined: bool = True) -> None:
        self.keys = sorted(int(k) for k in frames)
        self.frames = frames
        self.counts: dict[int, int] = {}
        if pipelined:
            self.apply_keys = self._apply_keys

    def owned_keys(self):
        return self.keys

    def apply(self, step, grads, counts) -> None:
        self.counts = dict(counts)

    def _apply_keys(self, step, grads, counts, keys, last) -> None:
        self.counts.update(counts)

    def weight_frames(self, step, keys=None):
        return self.frames if keys is None else {k: self.frames[k] for k in keys}


# ----------------------------------------------------------------------------- frames

def resealed(buf: bytes, edit) -> bytes:
    """The frame ``buf`` with its payload bytes edited by ``edit(bytearray)`` and its CRC recomputed:
    corruption the CRC cannot see, which a frame kind's own checks must catch."""
    import struct

    from lowbit.codec.frame import Frame, crc32

    f = Frame.from_bytes(buf)
    p = bytearray(f.payload.numpy().tobytes())
    edit(p)
    f.payload = torch.frombuffer(p, dtype=torch.uint8)
    raw = bytearray(f.to_bytes())
    struct.pack_into("<I", raw, len(raw) - 4, crc32(bytes(raw[:-4])))
    return bytes(raw)


def mutated(buf: bytes, edits, reseal: bool) -> bytes:
    """``buf`` with ``edits`` ((position, byte) pairs, positions taken modulo the length) applied to
    its payload and the CRC recomputed (``reseal``), or to the whole frame as it is."""
    def edit(p):
        for pos, val in edits:
            p[pos % len(p)] = val
    if reseal:
        return resealed(buf, edit)
    b = bytearray(buf)
    edit(b)
    return bytes(b)
