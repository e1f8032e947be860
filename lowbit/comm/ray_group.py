"""The ranks of a Ray run as actors, and the control plane they share.

:class:`RayGroup` (the driver's side) starts one :class:`RankActor` per rank and a :class:`StoreActor`,
then runs the same function on every rank (for training, :func:`lowbit.train.loop.train`), as a
torch.distributed launcher runs it in every process. Inside that function :func:`group` is the rank's
view of the run (its rank, the actors, the store), as the default process group is for
torch.distributed; :class:`lowbit.comm.ray.RayTransport` is built on it and serves its peers' calls
through the rank's actor, and :class:`RayStore` stands in for the c10d store the control plane
(:class:`lowbit.comm.board.Board`) keeps its keys in.

Workers are restarted by Ray (``max_restarts``) and their ``run`` is retried on the new actor, which
finds itself replaced (:attr:`Group.replaced`) and joins at the servers' current step
(:meth:`Group.join_step`). A worker that cannot come back is retired (:meth:`RayGroup.retire`):
servers stop waiting for it. Servers are not restarted: a dead server fails the run
(:class:`RankFailed`). :func:`ray_session` starts (or joins) the cluster a run uses.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from lowbit.comm.transport import Transport
from lowbit.errors import ConfigError, TransportError


def _ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is an extra
        raise ConfigError("the ray transport needs Ray: pip install 'lowbit[ray]'") from e
    return ray


def _first_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:300]}"


class RankFailed(TransportError):
    """A rank's function raised, or its actor died for good (``rank`` -1: the driver gave up). ``step``:
    the step the rank was in, when the driver could read it."""

    def __init__(self, rank: int, message: str, step: int | None = None):
        super().__init__(f"rank {rank}: {message}" if rank >= 0 else message)
        self.rank, self.message, self.step = rank, message, step


# ----------------------------------------------------------------------------------- the store


class StoreActor:
    """Keys and byte values with blocking waits: what the c10d store offers the control plane (and
    ``append``/``take``, for text a rank passes to the driver)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        with self.cond:
            self.data[key] = value
            self.cond.notify_all()

    def wait(self, keys: list[str], timeout_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: all(k in self.data for k in keys), timeout_s)

    def get(self, key: str, timeout_s: float) -> bytes | None:
        return self.data[key] if self.wait([key], timeout_s) else None

    def check(self, keys: list[str]) -> bool:
        with self.cond:
            return all(k in self.data for k in keys)

    def add(self, key: str, n: int) -> int:
        with self.cond:
            v = int(self.data.get(key, b"0")) + n
            self.data[key] = str(v).encode()
            self.cond.notify_all()
            return v

    def delete_key(self, key: str) -> bool:
        with self.cond:
            return self.data.pop(key, None) is not None

    def append(self, key: str, value: bytes) -> None:
        with self.cond:
            self.data[key] = self.data.get(key, b"") + value

    def take(self, key: str) -> bytes:
        with self.cond:
            return self.data.pop(key, b"")


class RayStore:
    """The c10d store's methods (set, get, wait, check, add, delete_key) over a :class:`StoreActor`;
    ``get`` and ``wait`` wait at most ``timeout_s`` (``wait`` takes a timedelta, as c10d's does).
    Also ``append``/``take``: text a rank passes to the driver."""

    def __init__(self, actor, timeout_s: float):
        self.actor, self.timeout_s = actor, float(timeout_s)

    def _call(self, method: str, *args, wait_s: float = 0.0):
        return _ray().get(getattr(self.actor, method).remote(*args), timeout=wait_s + 60)

    def set(self, key: str, value) -> None:
        self._call("set", key, value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key: str) -> bytes:
        v = self._call("get", key, self.timeout_s, wait_s=self.timeout_s)
        if v is None:
            raise TransportError(f"store: {key!r} was not set within {self.timeout_s:g}s")
        return v

    def wait(self, keys, timeout=None) -> None:
        s = self.timeout_s if timeout is None else timeout.total_seconds()
        if not self._call("wait", list(keys), s, wait_s=s):
            raise TransportError(f"store: keys not set within {s:g}s")

    def check(self, keys) -> bool:
        return self._call("check", list(keys))

    def add(self, key: str, n: int) -> int:
        return self._call("add", key, int(n))

    def delete_key(self, key: str) -> bool:
        return self._call("delete_key", key)

    def append(self, key: str, value: bytes) -> None:
        self._call("append", key, bytes(value))

    def take(self, key: str) -> bytes:
        """What was appended under ``key`` since the last take."""
        return self._call("take", key)


# ----------------------------------------------------------------------------------- the ranks


@dataclass
class Group:
    """One rank's view of the run, inside its actor (see :func:`group`)."""

    rank: int
    world_size: int
    n_servers: int
    actors: list
    store: RayStore
    timeout_s: float
    replaced: bool  # this actor replaces one that died (Ray restarted it)
    transport: "Transport | None" = field(default=None, repr=False)

    def attach(self, transport: Transport) -> None:
        """The transport this rank built: its actor serves the peers' calls to it from now on."""
        with _READY:
            self.transport = transport
            _READY.notify_all()

    def join_step(self) -> int:
        """The step a replaced worker joins at: the earliest one a server still waits on."""
        steps = _ray().get([a.at.remote() for a in self.actors[:self.n_servers]], timeout=self.timeout_s + 60)
        return min(steps)


_GROUP: Group | None = None
_READY = threading.Condition()  # signalled when a run's group, then its transport, is set


def group() -> Group:
    """This rank's :class:`Group`, inside a function :meth:`RayGroup.run` runs."""
    if _GROUP is None:
        raise TransportError("not inside a rank of a RayGroup (RayGroup.run sets up the group)")
    return _GROUP


def _served() -> Transport:
    """This rank's transport, once the rank's function has built it (a peer may call first)."""
    with _READY:
        ok = _READY.wait_for(lambda: _GROUP is not None and _GROUP.transport is not None,
                             _GROUP.timeout_s if _GROUP is not None else 600.0)
    if not ok:
        raise TransportError("this rank built no RayTransport in time")
    return _GROUP.transport


class RankActor:
    """One rank: runs the rank's function (:meth:`run`) and serves its peers' calls to the
    transport it builds (pushes and pulls, on a server)."""

    def __init__(self, rank: int, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.rank = rank
        self.fresh = False  # a run announced by reset(); a run that comes without one is Ray's retry

    def reset(self) -> None:
        global _GROUP
        with _READY:
            _GROUP, self.fresh = None, True

    def run(self, actors: list, store, n_servers: int, timeout_s: float, fn: Callable, *args):
        global _GROUP
        replaced, self.fresh = not self.fresh, False
        with _READY:
            _GROUP = Group(self.rank, len(actors), n_servers, list(actors), RayStore(store, timeout_s), timeout_s,
                           replaced)
            _READY.notify_all()
        return fn(*args)

    def push(self, step: int, worker: int, bundle: bytes) -> int:
        return _served().push(step, worker, bundle)

    def pull(self, step: int, worker: int, full: bool = False) -> tuple[bytes, list[int]]:
        return _served().pull(step, worker, full)

    def retire(self, worker: int) -> None:
        _served().retire(worker)

    def at(self) -> int:
        return _served().current

    def stats(self) -> dict:
        t = _served()
        return {**t.counter.snapshot(), "rank": self.rank, "step": t.current, "pid": os.getpid()}


# ----------------------------------------------------------------------------------- the driver


def _cpus_per_actor(n_actors: int) -> float:
    ray = _ray()
    total = float(ray.cluster_resources().get("CPU", 0.0))
    if total >= n_actors:
        return 1.0
    return max(0.0, total / max(1, n_actors) * 0.99) if total else 0.0


class RayGroup:
    """The driver's side of a run: a :class:`StoreActor` and one :class:`RankActor` per rank in the
    running Ray. Ranks [0, n_servers) are servers, never restarted; workers are restarted up to
    ``max_restarts`` times, their ``run`` retried. Actors that call each other run several calls at
    once (``max_concurrency``): a server serves every worker's push and pull while its own step runs."""

    def __init__(self, world_size: int, n_servers: int, *, timeout_s: float = 300.0, threads: int = 0,
                 max_restarts: int = 3):
        ray = _ray()
        if not ray.is_initialized():
            raise TransportError("Ray is not initialized: call ray.init(...) (or lowbit.comm.ray.ray_session) first")
        W = world_size - n_servers
        if n_servers < 1 or W < 1:
            raise ConfigError(f"need at least one server and one worker, got {n_servers} and {W}")
        self.world_size, self.n_servers, self.timeout_s = world_size, n_servers, float(timeout_s)
        self.store_actor = ray.remote(StoreActor).options(num_cpus=0, max_concurrency=4 * world_size + 16).remote()
        self.store = RayStore(self.store_actor, timeout_s)
        cpus = _cpus_per_actor(world_size)
        server = ray.remote(RankActor).options(num_cpus=cpus, max_concurrency=2 * W + 8, max_restarts=0)
        worker = ray.remote(RankActor).options(num_cpus=cpus, max_concurrency=4, max_restarts=max_restarts,
                                               max_task_retries=max_restarts)
        self.actors = [(server if r < n_servers else worker).remote(r, threads) for r in range(world_size)]
        self.retired: list[int] = []

    def start(self, fn: Callable, args: Sequence[tuple]) -> dict:
        """Run ``fn(*args[rank])`` on every rank; returns {ObjectRef: rank} for :meth:`wait`."""
        ray = _ray()
        ray.get([a.reset.remote() for a in self.actors], timeout=self.timeout_s + 60)
        return {a.run.remote(self.actors, self.store_actor, self.n_servers, self.timeout_s, fn, *args[r]): r
                for r, a in enumerate(self.actors)}

    def wait(self, refs: dict, poll: Callable[[], None] | None = None) -> dict[int, object]:
        """Every rank's return value (rank -> value). A worker whose actor is gone for good is retired
        and the others go on; any other failure is a :class:`RankFailed` at once. ``poll()`` is called
        between waits (the driver's signals)."""
        ray = _ray()
        from ray.exceptions import RayActorError, RayTaskError

        pending, results = dict(refs), {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
            if poll is not None:
                poll()
            for ref in done:
                r = pending.pop(ref)
                try:
                    results[r] = ray.get(ref)
                except RayTaskError as e:
                    raise RankFailed(r, _first_line(e.cause if e.cause is not None else e)) from e
                except RayActorError as e:
                    if r < self.n_servers or len(self.retired) + 1 >= self.world_size - self.n_servers:
                        raise RankFailed(r, f"its actor died: {_first_line(e)}") from e
                    self.retire(r)
        return results

    def run(self, fn: Callable, args: Sequence[tuple], poll: Callable[[], None] | None = None) -> dict[int, object]:
        return self.wait(self.start(fn, args), poll)

    def retire(self, rank: int) -> None:
        """Worker ``rank`` is gone for good: every server stops waiting for it."""
        self.retired.append(rank)
        _ray().get([a.retire.remote(rank - self.n_servers) for a in self.actors[:self.n_servers]],
                   timeout=self.timeout_s + 60)

    def shutdown(self) -> None:
        ray = _ray()
        for a in self.actors + [self.store_actor]:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
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
        with warnings.catch_warnings():  # Ray's notice of a future default for GPU env vars, on every init
            warnings.filterwarnings("ignore", message=".*accelerator visible devices", category=FutureWarning)
            if address:
                ray.init(address=address, log_to_driver=False, runtime_env=env)
                return True
            temp_dir = os.path.abspath(temp_dir or default_temp_dir())
            os.makedirs(temp_dir, exist_ok=True)
            init_kw.setdefault("logging_level", logging.WARNING)  # not "Started a local Ray instance" every run
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
