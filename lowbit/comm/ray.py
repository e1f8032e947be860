"""The parameter-server roles as Ray actors: frames as bytes through actor calls.

Roles, for ``S`` servers and ``W`` workers::

    WorkerActor w, step s:   [fetch: pull(s) from every server, when it holds no weights for s]
                             frames = compute(s)                      (key -> grad frame bytes)
                             push(s, w, bundle of the keys of server j)  -> ServerActor j, for all j
                             pull(s + 1) from every server -> decode -> load_weights
    ServerActor j:           push: validate (kind grad, step s, owned key, shape), decode to fp32;
                             when every expected worker pushed step s: sum in worker order, divide by
                             the number of contributions, Owner.apply(s, ...), publish the bundle of
                             Owner.weight_frames(s + 1) as the weights for step s + 1
                             pull(s): block (threading.Condition, with a timeout) until published

``pull(s)`` gives the weights a worker computes step ``s`` at (after ``s`` updates), and the owner
stamps them with ``s`` (``Owner.weight_frames(s)``); workers check the stamp.

Bytes: no length prefix travels (Ray frames the call), so a push or pull of a bundle counts exactly
``len(bundle)`` = the sum of its frame sizes, on both ends (:class:`ByteCounter`).

Faults: worker actors are created with ``max_restarts``/``max_task_retries``. A killed worker is
restarted by Ray (its factory runs again), its pending ``step`` call is retried, and on finding no
weights for the step it fetches them from the servers (``pull(s)``) and carries on. A server drops a
duplicate push for a step it already applied and replaces one for a pending step, so a retried step
is harmless (the replacement is identical: workers' gradients are pure functions of the step).
A worker that is gone for good can be retired (:meth:`ServerActor.retire`): servers then stop
waiting for it. Servers hold the only fp32 state and are not restarted: a dead server is an error.
Error-feedback residuals of a restarted worker start from zero.

This module knows only the transport contract: owners and workers come from picklable factories
(zero-argument callables), so nothing here imports :mod:`lowbit.train`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from lowbit.codec.codecs import decode_frame
from lowbit.comm.p2p import parse_bundle
from lowbit.comm.transport import ByteCounter, Owner, partition
from lowbit.errors import ConfigError, FrameError, TransportError

KEEP_STEPS = 4  # published weight bundles a server retains (for retried / rejoining workers)


def _ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is an extra
        raise ConfigError("the ray transport needs Ray: pip install 'lowbit[ray]'") from e
    return ray


def key_partition(shapes: Mapping[int, tuple], n_servers: int) -> dict[int, int]:
    """key -> server index, balanced by element count (:func:`lowbit.comm.transport.partition`)."""
    sizes = {int(k): int(torch.Size(tuple(s)).numel()) for k, s in shapes.items()}
    return partition(sizes, n_servers)


# ----------------------------------------------------------------------------------- server


class ServerActor:
    """Holds an :class:`~lowbit.comm.transport.Owner`; collects gradient bundles, applies, publishes.

    ``shapes``: key -> shape of (at least) the owned keys. ``workers``: the worker ids to wait for.
    ``start_step``: the step whose weights are published first (default ``owner.step_done`` or 0).
    ``timeout_s``: how long ``pull`` waits before a :class:`TransportError` naming the missing workers.
    """

    def __init__(self, owner_factory: Callable[[], Owner], shapes: Mapping[int, tuple],
                 workers: Iterable[int], *, server_id: int = 0, start_step: int | None = None,
                 timeout_s: float = 300.0, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.server_id = server_id
        self.owner = owner_factory()
        self.keys = sorted(int(k) for k in self.owner.owned_keys())
        self.shapes = {int(k): tuple(int(d) for d in s) for k, s in shapes.items()}
        missing = sorted(set(self.keys) - set(self.shapes))
        if missing:
            raise ConfigError(f"server {server_id}: no shapes given for owned keys {missing}")
        self.workers = sorted(int(w) for w in workers)
        self.expected = set(self.workers)
        self.timeout_s = float(timeout_s)
        self.counter = ByteCounter()
        self.cond = threading.Condition()
        self.pending: dict[int, dict[int, dict[int, torch.Tensor]]] = {}
        self.published: dict[int, bytes] = {}
        self.error: str | None = None
        self.current = int(start_step if start_step is not None else getattr(self.owner, "step_done", 0))
        self._publish(self.current, self.owner.weight_frames(self.current))

    def _where(self, step: int, worker: int | None = None) -> str:
        w = f" from worker {worker}" if worker is not None else ""
        return f"server {self.server_id}: bundle{w} at step {step}"

    def _publish(self, step: int, frames: Mapping[int, bytes]) -> None:
        if sorted(int(k) for k in frames) != self.keys:
            raise ConfigError(f"server {self.server_id}: Owner.weight_frames gave keys {sorted(frames)}, "
                              f"expected {self.keys}")
        self.published[step] = b"".join(bytes(frames[k]) for k in self.keys)
        for old in [s for s in self.published if s <= step - KEEP_STEPS]:
            del self.published[old]

    # -- the up-link -------------------------------------------------------------------------------
    def push(self, step: int, worker_id: int, bundle: bytes) -> int:
        """Gradient frames of ``worker_id`` for ``step`` (the keys this server owns). Returns the
        number of frames taken (0 for a duplicate of an applied step). Raises FrameError on a bad
        frame, naming this server, the worker and the step."""
        step, worker_id = int(step), int(worker_id)
        if worker_id not in self.workers:
            raise TransportError(f"server {self.server_id}: push from unknown worker {worker_id} "
                                 f"(workers {self.workers})")
        with self.cond:
            self.counter.up_recv += len(bundle)
            if step < self.current:
                return 0  # a retried push of a step already applied
            if step > self.current:
                raise TransportError(f"{self._where(step, worker_id)}: this server is at step {self.current}; "
                                     f"synchronous mode takes gradients only for the current step")
        decoded: dict[int, torch.Tensor] = {}
        try:
            parsed = parse_bundle(bundle, peer=worker_id, step=step, kind="grad", shapes=self.shapes,
                                  allowed_keys=self.keys)
        except FrameError as e:
            raise FrameError(f"server {self.server_id}: {e}") from e
        for pf in parsed:
            try:
                decoded[pf.frame.key] = decode_frame(pf.frame).float()
            except FrameError as e:
                raise FrameError(f"{self._where(step, worker_id)}: frame for key {pf.frame.key}: {e}") from e
        with self.cond:
            if step < self.current:
                return 0
            self.pending.setdefault(step, {})[worker_id] = decoded
            self.expected.add(worker_id)
            self._maybe_apply()
        return len(decoded)

    def _maybe_apply(self) -> None:
        """Under the lock: apply the current step once every expected worker pushed it."""
        step = self.current
        got = self.pending.get(step, {})
        if not self.expected or not self.expected <= set(got):
            return
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        for w in sorted(got):  # a fixed order: the fp32 sum does not depend on arrival
            for k, g in got[w].items():
                if k in sums:
                    sums[k].add_(g)
                    counts[k] += 1
                else:
                    sums[k] = g.clone()
                    counts[k] = 1
        try:
            self.owner.apply(step, {k: s / counts[k] for k, s in sums.items()}, counts)
            self._publish(step + 1, self.owner.weight_frames(step + 1))
        except Exception as e:
            self.error = f"server {self.server_id}: applying step {step} failed: {type(e).__name__}: {e}"
            self.cond.notify_all()
            raise
        del self.pending[step]
        self.current = step + 1
        self.cond.notify_all()

    # -- the down-link -----------------------------------------------------------------------------
    def pull(self, step: int, timeout_s: float | None = None) -> bytes:
        """The weight bundle for ``step`` (after ``step`` updates), blocking until it is published."""
        step = int(step)
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        with self.cond:
            ok = self.cond.wait_for(lambda: step in self.published or step < self.current - KEEP_STEPS + 1
                                    or self.error is not None, timeout)
            if self.error is not None:
                raise TransportError(self.error)
            if not ok:
                missing = sorted(self.expected - set(self.pending.get(self.current, {})))
                raise TransportError(f"server {self.server_id}: weights for step {step} not ready after "
                                     f"{timeout:g}s; at step {self.current}, waiting for gradients from "
                                     f"workers {missing}")
            if step not in self.published:
                raise TransportError(f"server {self.server_id}: weights for step {step} are no longer kept "
                                     f"(server at step {self.current}, keeps {sorted(self.published)})")
            b = self.published[step]
            self.counter.down_sent += len(b)
            self.counter.messages += 1
            return b

    # -- membership and introspection --------------------------------------------------------------
    def retire(self, worker_id: int) -> int:
        """Stop waiting for ``worker_id`` (gone for good); applies the current step if now complete.
        Returns the server's current step."""
        with self.cond:
            self.expected.discard(int(worker_id))
            self.pending.get(self.current, {}).pop(int(worker_id), None)
            self._maybe_apply()
            return self.current

    def stats(self) -> dict:
        with self.cond:
            out = self.counter.snapshot()
            out.update(server=self.server_id, step=self.current, keys=len(self.keys),
                       expected=sorted(self.expected))
            lr = getattr(self.owner, "lr", None)
            out["lr"] = lr() if callable(lr) else None
            return out

    def owner_call(self, method: str, *args, **kwargs):
        """Call a method of the owner (checkpoint save/load, ...) under the server's lock."""
        with self.cond:
            return getattr(self.owner, method)(*args, **kwargs)

    def ready(self) -> int:
        return self.current


# ----------------------------------------------------------------------------------- worker


class WorkerActor:
    """Runs a compute object (``worker_factory()``) with ``load_weights(dict)``, ``compute(step)``
    (-> key -> grad frame bytes, or ``(frames, info)``) and ``evaluate()``, and talks to the servers.

    ``servers``: the ServerActor handles; ``key_server``: key -> index into ``servers``."""

    def __init__(self, worker_id: int, worker_factory: Callable[[], object], servers: Sequence,
                 key_server: Mapping[int, int], shapes: Mapping[int, tuple], *, timeout_s: float = 300.0,
                 threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.worker_id = int(worker_id)
        self.obj = worker_factory()
        self.servers = list(servers)
        self.shapes = {int(k): tuple(int(d) for d in s) for k, s in shapes.items()}
        self.key_server = {int(k): int(s) for k, s in key_server.items()}
        self.keys_of = {j: sorted(k for k, s in self.key_server.items() if s == j) for j in range(len(self.servers))}
        self.timeout_s = float(timeout_s)
        self.counter = ByteCounter()
        self.have: int | None = None  # the step whose weights are loaded
        self.fetches = 0
        self.pid = os.getpid()

    def _pull(self, step: int) -> None:
        ray = _ray()
        refs = [s.pull.remote(step) for s in self.servers]
        bundles = ray.get(refs, timeout=self.timeout_s + 30)
        weights: dict[int, torch.Tensor] = {}
        for j, b in enumerate(bundles):
            self.counter.down_recv += len(b)
            for pf in parse_bundle(b, peer=j, step=step, kind="weight", shapes=self.shapes,
                                   allowed_keys=self.keys_of[j], required_keys=self.keys_of[j],
                                   rank=self.worker_id):
                try:
                    weights[pf.frame.key] = decode_frame(pf.frame)
                except FrameError as e:
                    raise FrameError(f"worker {self.worker_id}: weight frame for key {pf.frame.key} from "
                                     f"server {j} at step {step}: {e}") from e
        self.obj.load_weights(weights)
        self.have = step

    def fetch(self, step: int) -> int:
        """Load the weights for ``step`` from every server (start, resume, a replaced worker)."""
        self._pull(int(step))
        self.fetches += 1
        return self.have

    def step(self, step: int) -> dict:
        """One synchronous step; returns the step's numbers (loss, bytes, whether it fetched)."""
        ray = _ray()
        step = int(step)
        before = self.counter.snapshot()
        fetched = False
        if self.have != step:
            self.fetch(step)
            fetched = True
        out = self.obj.compute(step)
        frames, info = out if isinstance(out, tuple) else (out, {})
        unknown = sorted(set(frames) - set(self.key_server))
        if unknown:
            raise ConfigError(f"worker {self.worker_id}: gradient frames for unknown keys {unknown}")
        refs = []
        for j, srv in enumerate(self.servers):
            bundle = b"".join(bytes(frames[k]) for k in self.keys_of[j] if frames.get(k))
            self.counter.up_sent += len(bundle)
            self.counter.messages += 1
            refs.append(srv.push.remote(step, self.worker_id, bundle))
        ray.get(refs, timeout=self.timeout_s + 30)
        self._pull(step + 1)
        d = self.counter.delta(before)
        return {"worker": self.worker_id, "step": step, "fetched": fetched, "pid": self.pid, **info, **d}

    def evaluate(self, *args, **kwargs):
        return self.obj.evaluate(*args, **kwargs)

    def call(self, method: str, *args, **kwargs):
        """Call a method of the compute object (checkpointing its state, ...)."""
        return getattr(self.obj, method)(*args, **kwargs)

    def stats(self) -> dict:
        out = self.counter.snapshot()
        out.update(worker=self.worker_id, have=self.have, fetches=self.fetches, pid=self.pid)
        return out


# ----------------------------------------------------------------------------------- driver


def _cpus_per_actor(n_actors: int) -> float:
    ray = _ray()
    total = float(ray.cluster_resources().get("CPU", 0.0))
    if total >= n_actors:
        return 1.0
    return max(0.0, total / max(1, n_actors) * 0.99) if total else 0.0


class RayPS:
    """S server actors and W worker actors wired together, and the synchronous step driver.

    ``owner_factories[j]()`` builds server j's Owner (it must own exactly the keys that
    :func:`key_partition` gives server j); ``worker_factories[w]()`` builds worker w's compute object.
    """

    def __init__(self, owner_factories: Sequence[Callable[[], Owner]],
                 worker_factories: Sequence[Callable[[], object]], shapes: Mapping[int, tuple], *,
                 start_step: int | None = None, timeout_s: float = 300.0, max_restarts: int = 3,
                 threads: int = 0, key_server: Mapping[int, int] | None = None):
        ray = _ray()
        if not ray.is_initialized():
            raise TransportError("Ray is not initialized: call ray.init(...) (or lowbit.comm.ray.init_local) first")
        S, W = len(owner_factories), len(worker_factories)
        if S < 1 or W < 1:
            raise ConfigError(f"need at least one server and one worker, got {S} and {W}")
        self.shapes = {int(k): tuple(s) for k, s in shapes.items()}
        self.key_server = dict(key_server) if key_server is not None else key_partition(self.shapes, S)
        self.timeout_s = timeout_s
        self.max_restarts = max_restarts
        cpus = _cpus_per_actor(S + W)
        server_cls = ray.remote(ServerActor).options(num_cpus=cpus, max_concurrency=2 * W + 8, max_restarts=0)
        self.servers = [server_cls.remote(f, self.shapes, range(W), server_id=j, start_step=start_step,
                                          timeout_s=timeout_s, threads=threads)
                        for j, f in enumerate(owner_factories)]
        # Workers are built while the servers build (both load models): only fetch waits for servers.
        worker_cls = ray.remote(WorkerActor).options(num_cpus=cpus, max_concurrency=2,
                                                     max_restarts=max_restarts, max_task_retries=max_restarts)
        self.workers = [worker_cls.remote(w, f, self.servers, self.key_server, self.shapes,
                                          timeout_s=timeout_s, threads=threads)
                        for w, f in enumerate(worker_factories)]
        self.alive = list(range(W))
        starts = ray.get([s.ready.remote() for s in self.servers], timeout=timeout_s + 120)
        if len(set(starts)) != 1:
            raise TransportError(f"servers start at different steps {starts}: checkpoints do not match")
        self.start = starts[0]
        ray.get([w.fetch.remote(self.start) for w in self.workers], timeout=timeout_s + 120)

    def run_steps(self, steps: Iterable[int], on_step: Callable[[int, list[dict]], None] | None = None
                  ) -> list[list[dict]]:
        """Run ``steps`` synchronously; ``on_step(step, results)`` after each (results: one dict per
        live worker). A worker whose actor dies is retried (Ray restarts it; it re-fetches the
        weights); one that cannot come back is retired and the run goes on with the others."""
        ray = _ray()
        from ray.exceptions import ActorUnavailableError, RayActorError

        history = []
        for s in steps:
            pending = {w: self.workers[w].step.remote(s) for w in self.alive}
            results = []
            tries = {w: 0 for w in pending}
            while pending:
                w, ref = next(iter(pending.items()))
                try:
                    results.append(ray.get(ref, timeout=self.timeout_s + 60))
                    del pending[w]
                except (RayActorError, ActorUnavailableError) as e:
                    tries[w] += 1  # Ray retries a task on a restarted actor itself; this is the rest
                    if tries[w] > self.max_restarts:
                        del pending[w]
                        self.alive.remove(w)
                        if not self.alive:
                            raise TransportError(f"step {s}: every worker actor died; last error: {e}") from e
                        ray.get([srv.retire.remote(w) for srv in self.servers], timeout=self.timeout_s + 60)
                    else:
                        time.sleep(0.5)
                        pending[w] = self.workers[w].step.remote(s)
            results.sort(key=lambda r: r["worker"])
            history.append(results)
            if on_step is not None:
                on_step(s, results)
        return history

    def kill_worker(self, w: int, restart: bool = True) -> None:
        """Kill worker actor ``w`` (fault injection); with ``restart`` Ray replaces it."""
        _ray().kill(self.workers[w], no_restart=not restart)

    def server_stats(self) -> list[dict]:
        return _ray().get([s.stats.remote() for s in self.servers])

    def worker_stats(self) -> list[dict]:
        return _ray().get([self.workers[w].stats.remote() for w in self.alive])

    def shutdown(self) -> None:
        ray = _ray()
        for a in self.workers + self.servers:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass


def default_temp_dir() -> str:
    """Where a local cluster keeps its session files: short (Ray's sockets live there) and per user."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"lowbit-ray-{os.getuid()}")


def init_local(num_cpus: int, temp_dir: str | None = None, address: str = "", **init_kw) -> bool:
    """Connect to ``address`` when given (or ``$LOWBIT_RAY_ADDRESS``), else start a local cluster
    on this machine (loopback, no dashboard, session files under ``temp_dir``, default
    :func:`default_temp_dir`). Returns True when this call started Ray (the caller shuts it down).
    Does nothing when Ray is already initialized. Prefer :func:`ray_session`, which also puts back
    what ``ray.init`` changes in the process (environment variables, ``sys.path``)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("LOWBIT_RAY_ADDRESS", "")
    env = {"env_vars": {"RAY_AUTH_MODE": "disabled", **init_kw.pop("env_vars", {})}}
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",)}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # read by ray.init in this process
    try:
        if address:
            ray.init(address=address, log_to_driver=False, runtime_env=env)
            return True
        temp_dir = os.path.abspath(temp_dir or default_temp_dir())
        os.makedirs(temp_dir, exist_ok=True)
        init_kw.setdefault("logging_level", logging.WARNING)  # not "Started a local Ray instance" on every run
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=env,
                 _node_ip_address="127.0.0.1", _temp_dir=temp_dir, **init_kw)
        return True
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def ray_session(num_cpus: int, temp_dir: str | None = None, address: str = "", **init_kw) -> Iterator[bool]:
    """:func:`init_local` for the duration of a block: a cluster (or connection) this call made is shut
    down afterwards, and the environment variables and ``sys.path`` entries ``ray.init`` set in this
    process are put back. Yields whether this call started Ray."""
    import sys

    env, path = dict(os.environ), list(sys.path)
    started = init_local(num_cpus, temp_dir, address, **init_kw)
    try:
        yield started
    finally:
        if started:
            _ray().shutdown()
            os.environ.clear()
            os.environ.update(env)
            sys.path[:] = path
