"""Starting ranks: :func:`run_rank` (one rank: process group, then :func:`lowbit.train.loop.train`) and
:func:`launch_local` (every rank of a run on this machine, watched until they are done).

The launcher hosts the c10d store the ranks rendezvous through (so the control plane outlives any
rank), writes each rank's output to ``OUT/logs/rank_R.log`` and keeps the console for the leader's
progress bar and its own messages. When a rank fails it stops the others and raises
:class:`RunFailed` with one summary: which rank, its exit code or signal, the step, the last complete
checkpoint and the command that resumes. SIGTERM or Ctrl-C on the launcher asks every rank to stop at
the same step boundary and checkpoint it (:mod:`lowbit.train.control`), then raises :class:`Interrupted`.
With ``--transport ray`` the ranks are Ray actors running the same loop (:mod:`lowbit.train.ray_launch`)
and the run ends the same way.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import wait
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lowbit.errors import ConfigError, LowbitError
from lowbit.train.checkpoint import Checkpointer, ResumePoint
from lowbit.train.config import Config
from lowbit.train.control import STOP_GRACE_S, StopSignals, install_stop_handler, rank_step, request_stop

#: exit statuses of ``lowbit train`` (and ``python -m lowbit.train``)
EXIT_OK, EXIT_USAGE, EXIT_RANK_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130


class RunFailed(LowbitError, RuntimeError):
    """A rank (or actor) failed; the message is the launcher's summary of what happened and how to resume."""

    exit_code = EXIT_RANK_FAILED


class Interrupted(LowbitError):
    """The launcher was asked to stop (SIGTERM, Ctrl-C); the ranks stopped at a step boundary."""

    exit_code = EXIT_INTERRUPTED


def pick_backend(cfg: Config) -> str:
    b = cfg.transport.backend
    if b == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if b == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend nccl asked for, but no CUDA device is visible")
    return b


def run_rank(rank: int, world_size: int, cfg: Config, *, store_addr: tuple[str, int] | None = None,
             local_rank: int = 0, resume: ResumePoint | None = None, console=None) -> dict | None:
    """One rank, from process-group init to the summary. ``store_addr``: the launcher's store
    (:func:`launch_local`); None reads the torchrun environment (``env://``: RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT)."""
    from lowbit.train.loop import train

    cfg.validate()
    backend = pick_backend(cfg)
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    torch.set_num_threads(cfg.run.threads_per_rank or max(1, (os.cpu_count() or 1) // world_size))
    timeout = timedelta(seconds=cfg.transport.timeout_s)
    if store_addr is not None:
        store = dist.TCPStore(store_addr[0], store_addr[1], world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world_size,
                                timeout=timeout)
    else:
        # Under torchrun, keys in the agent's store survive a restart of the group; a restarted rank
        # could read a dead peer's address. A prefix per attempt keeps each group apart.
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                             is_master=(rank == 0 and not agent), timeout=timeout)
        store = dist.PrefixStore(f"lowbit/attempt_{attempt}", base)
        dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world_size,
                                timeout=timeout)
    install_stop_handler()
    try:
        return train(rank, world_size, cfg, store, device, resume=resume, console=console)
    finally:
        dist.destroy_process_group()


def _spawn_entry(rank: int, world_size: int, cfg: Config, store_addr, resume, log_path: str, q) -> None:
    """A spawned rank: its output goes to its log file (the console is kept for the leader's progress
    bar); Ctrl-C is the launcher's to handle; the result or the error goes back on the pipe ``q`` (a
    pipe, not a queue: a queue's semaphores would leak if the launcher were killed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit is an OSError (EFBIG), not a kill
    console = os.fdopen(os.dup(2), "w", buffering=1)
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        res = run_rank(rank, world_size, cfg, store_addr=store_addr, resume=resume, console=console)
        q.send((rank, "ok", res))
    except BaseException as e:  # report to the launcher instead of dying silently
        traceback.print_exc()
        q.send((rank, "error", f"{type(e).__name__}: {e}"))
        sys.exit(1)


def _signal_name(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch_local(cfg: Config, *, resume_command: str | None = None) -> dict:
    """Check the configuration (:func:`lowbit.train.preflight.preflight`: nothing starts on a bad
    one), spawn every rank on this machine (gloo over 127.0.0.1 unless configured otherwise), wait
    for them and return the leader's summary. ``resume_command``: the command line the failure
    summary tells the user to run (default: the same run with ``resume=True``)."""
    from lowbit.train.preflight import preflight

    cfg, resume = preflight(cfg)
    if cfg.transport.kind == "ray":
        return _launch_ray(cfg, resume, resume_command)
    import torch.multiprocessing as mp

    t, out = cfg.transport, Path(cfg.run.out)
    world = t.world_size
    store = dist.TCPStore(t.addr, t.port, world, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=t.timeout_s))
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]  # (launcher's end, rank's end)
    procs = [ctx.Process(target=_spawn_entry, daemon=False,
                         args=(r, world, cfg, (t.addr, store.port), resume, str(logs / f"rank_{r}.log"), pipes[r][1]))
             for r in range(world)]
    reports = [reader for reader, _ in pipes]
    n_servers = t.n_servers
    may_lose = set(range(n_servers, world)) if t.on_worker_failure == "continue" else set()
    results, errors, lost, dead = {}, {}, {}, {}
    stop_at = None
    with StopSignals() as stop:
        for p in procs:
            p.start()
        for _, writer in pipes:
            writer.close()  # the rank holds its end; EOF here means it is gone
        t_start = time.time()
        deadline = t_start + t.timeout_s * 4 + 600

        def drain() -> None:
            for conn in wait(reports, timeout=0):
                try:
                    rank, status, payload = conn.recv()
                except (EOFError, OSError):
                    reports.remove(conn)
                    continue
                if status == "ok":
                    results[rank] = payload
                elif rank in may_lose:
                    lost[rank] = payload
                else:
                    errors[rank] = payload

        def exited() -> dict[int, int]:
            return {i: p.exitcode for i, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and i not in errors and i not in lost and i not in results}

        while len(results) + len(lost) < world:
            drain()
            if stop.count and stop_at is None:
                stop_at = request_stop(store, list(range(world)))
                print(f"lowbit: stopping: every rank stops before step {stop_at + 1} and checkpoints",
                      file=sys.stderr, flush=True)
            if stop.count > 1 or (stop.when and time.time() > stop.when + STOP_GRACE_S):
                break
            for i, c in exited().items():
                if i in may_lose:
                    lost[i] = _signal_name(c)
            if len(lost) == len(may_lose) and may_lose:
                errors.setdefault(-1, "every worker was lost")
            dead = {i: c for i, c in exited().items() if i not in may_lose}
            if errors or dead:
                time.sleep(1.0)  # let the other ranks notice and report, then tell the whole story
                drain()
                dead = {i: c for i, c in exited().items() if i not in may_lose}
                break
            if time.time() > deadline:
                errors[-1] = f"timed out after {time.time() - t_start:.0f}s waiting for the ranks"
                break
            time.sleep(0.05)
    for p in procs:
        if p.is_alive() and (errors or dead or stop.count):
            p.terminate()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
    for reader, _ in pipes:
        reader.close()
    ck = Checkpointer(out)
    if errors or dead or (stop.count and len(results) + len(lost) < world):
        raise _failure(cfg, ck, lambda r: rank_step(store, r), errors, dead, lost, logs, resume_command,
                       interrupted=bool(stop.count))
    summaries = [res for res in results.values() if res is not None]
    if stop.count:
        raise _stopped(ck, summaries[0] if summaries else None, resume_command)
    if not summaries:
        raise RunFailed("training finished but no rank wrote a summary")
    if lost:
        print("lowbit: continued without worker ranks " +
              "; ".join(f"{i} ({m})" for i, m in sorted(lost.items())), file=sys.stderr, flush=True)
    return summaries[0]


def _launch_ray(cfg: Config, resume: ResumePoint | None, resume_command: str | None) -> dict:
    """The ranks as Ray actors (:func:`lowbit.train.ray_launch.run_ray`), ending as :func:`launch_local`
    does: a failed rank or a stop becomes the same one-line summary."""
    from lowbit.comm.ray import RankFailed
    from lowbit.train.ray_launch import run_ray

    ck, logs = Checkpointer(cfg.run.out), Path(cfg.run.out) / "logs"
    with StopSignals() as stop:
        try:
            summary = run_ray(cfg, resume=resume, signals=stop)
        except RankFailed as e:
            raise _failure(cfg, ck, {e.rank: e.step}.get, {e.rank: e.message}, {}, {}, logs, resume_command,
                           interrupted=bool(stop.count)) from e
        except (ConfigError, LowbitError):
            raise
        except Exception as e:  # noqa: BLE001 - Ray's own errors (a cluster that went away, ...)
            raise _failure(cfg, ck, {}.get, {-1: f"{type(e).__name__}: {str(e).strip()[:300]}"}, {}, {}, logs,
                           resume_command, interrupted=bool(stop.count)) from e
    if summary.get("stopped"):
        raise _stopped(ck, summary, resume_command)
    return summary


def _stopped(ck: Checkpointer, summary: dict | None, resume_command: str | None) -> Interrupted:
    last = ck.latest_step()
    return Interrupted(f"stopped after step {summary['steps_done'] if summary else '?'}; checkpoint "
                       f"{ck.step_dir(last) if last else 'none'}; resume with: "
                       + (resume_command or "the same run with --resume"))


def _failure(cfg: Config, ck: Checkpointer, at, errors, dead, lost, logs: Path, resume_command,
             interrupted: bool) -> LowbitError:
    """The one message a failed launch ends with. ``at(rank)``: the step the rank last began, or None."""
    def step_of(rank: int) -> str:
        try:
            step = at(rank) if rank >= 0 else None
        except Exception:  # noqa: BLE001 - the store may be gone with the ranks
            step = None
        return f" in step {step + 1}" if step is not None else ""

    def role(r: int) -> str:
        if not cfg.transport.n_servers:
            return ""
        return " (server)" if r < cfg.transport.n_servers else " (worker)"

    # The root cause first: a rank that died; else the first error reported (the others' errors
    # follow from it and are in their logs).
    if dead:
        parts = [f"rank {i}{role(i)} {_signal_name(c)}{step_of(i)}" for i, c in sorted(dead.items())]
    elif errors:
        i, m = next(iter(errors.items()))
        parts = [f"rank {i}{role(i)}{step_of(i)}: {m}" if i >= 0 else m]
    else:
        parts = []
    others = len(errors) - (0 if dead else 1)
    if others > 0:
        parts.append(f"{others} other rank(s) failed after it")
    parts += [f"worker rank {i} was lost earlier ({m})" for i, m in sorted(lost.items())]
    last = ck.latest_step()
    where = f"the last complete checkpoint is {ck.step_dir(last)}" if last else "no checkpoint was completed"
    how = resume_command or "rerun with --resume"
    first = "stopped" if interrupted else "training failed"
    msg = (f"{first}: {'; '.join(parts) or 'the ranks did not stop in time'}. {where[0].upper() + where[1:]}; "
           f"resume with: {how}. Each rank's output: {logs}/rank_R.log")
    return (Interrupted if interrupted else RunFailed)(msg)
