"""Ray as a transport: the ranks of a run are Ray actors, and the frames they exchange travel as actor
calls instead of torch.distributed messages.

:class:`RayGroup` (the driver's side) starts one :class:`RankActor` per rank and a :class:`StoreActor`,
then runs the same function on every rank (for training, :func:`lowbit.train.loop.train`), as a
torch.distributed launcher runs it in every process. Inside that function :func:`group` is the rank's
view of the run (its rank, the actors, the store), as the default process group is for
torch.distributed; :class:`RayTransport` is built on it, and :class:`RayStore` stands in for the c10d
store the control plane (:class:`lowbit.comm.board.Board`) keeps its keys in.

:class:`RayTransport` is a parameter server: ranks [0, S) own the keys (servers), the rest compute
(workers, index ``w`` = rank − S)::

    worker w, step s:  push(s, w, bundle of server j's keys)       -> server j, for every j
                       pull(s + 1) from every server -> validate, decode into ``out`` (deltas
                       onto the codes it holds)
    server j, step s:  wait for the push of every live worker; decode and sum each key in worker
                       order in fp32, divide (GradAccumulator); Owner.apply(s, ...); publish
                       Owner.weight_frames(s + 1) (delta-coded when the owner has a DeltaEncoder)
                       and the same weights as key frames; wait until every live worker pulled one

A push is validated (kind, step, owned key, shape) when it arrives, and a bad one is a FrameError in
the pushing call, naming the server. Bytes: no length prefix travels (Ray frames the call), so a push
or a pull counts exactly its bundle; a server counts a push when its step takes it and a pull when it
is served, and its step ends once every worker took the weights, so each step's counts are its own.

Workers are restarted by Ray (``max_restarts``) and their ``run`` is retried on the new actor, which
finds itself replaced (:attr:`Group.replaced`), joins at the servers' current step
(:meth:`Group.join_step`) and fetches that step's weights, which servers keep for the last
:data:`KEEP_STEPS` steps; a push for a step a server already applied is dropped, so a retried step is
harmless. A worker that cannot come back is retired (:meth:`RayGroup.retire`): servers stop waiting for
it. Servers hold the only fp32 state and are not restarted: a dead server fails the run.

Weights go down as the owner encodes them (:mod:`lowbit.codec.delta`: deltas against the previous
step's codes, key frames at the start, every ``keyframe_every`` steps and on resume). A server also
keeps each published step as key frames only (its deltas applied to a copy of the codes it sent), so
a worker that holds no codes (a replacement fetching its join step) or wrong ones (a
:class:`~lowbit.codec.delta.StateMismatch` while decoding) pulls key frames, while the others keep
pulling deltas; a mismatched worker re-pulls the step before it uses any of its weights.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch

from lowbit.codec.delta import DeltaDecoder, StateMismatch
from lowbit.comm.p2p import parse_bundle
from lowbit.comm.transport import ByteCounter, GradAccumulator, Owner, Transport, decode_weight, partition
from lowbit.errors import ConfigError, FrameError, TransportError

KEEP_STEPS = 4  # published weight bundles a server keeps (for replaced workers)


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
    transport: "RayTransport | None" = field(default=None, repr=False)

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


def _served() -> "RayTransport":
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


class RayTransport(Transport):
    """The parameter server over the actors of a :class:`RayGroup` (see the module docstring); built
    inside a rank's function, from :func:`group`."""

    def __init__(self, shapes: Mapping[int, tuple], n_servers: int, *, timeout: float = 300.0,
                 device: torch.device | str = "cpu"):
        g = group()
        if n_servers != g.n_servers:
            raise ConfigError(f"RayTransport for {n_servers} servers in a group of {g.n_servers}")
        self.group, self.rank, self.world_size, self.n_servers = g, g.rank, g.world_size, n_servers
        self.shapes = {int(k): tuple(int(d) for d in s) for k, s in shapes.items()}
        key_server = key_partition(self.shapes, n_servers)
        self.keys_of = {j: sorted(k for k, s in key_server.items() if s == j) for j in range(n_servers)}
        if any(not keys for keys in self.keys_of.values()):
            raise ConfigError(f"{n_servers} servers for {len(shapes)} parameter tensors leaves a server without keys")
        self.timeout_s, self.device = float(timeout), torch.device(device)
        self.counter = ByteCounter()
        self.index = self.rank - n_servers  # the worker index (negative on a server)
        self.live = list(range(n_servers, self.world_size))  # worker ranks still taking part
        self.current = -1  # a server: the step whose gradients it takes (its weights are published)
        self.held = DeltaDecoder()  # a worker's codes, onto which delta-coded weight frames apply
        if self.rank < n_servers:
            self.keys = self.keys_of[self.rank]
            self.cond = threading.Condition()
            self.pushed: dict[int, dict[int, tuple[list, int]]] = {}  # step -> worker -> (frames, bytes)
            self.published: dict[int, tuple[bytes, bytes]] = {}  # step -> (as encoded, as key frames)
            self.mirror: DeltaDecoder | None = None  # the codes sent so far, while deltas are being sent
            self.last_keys: tuple[int, bytes] | None = None  # the last published step as key frames
            self.whole_sent = 0  # what the bundles served would have taken as key frames
            self.pulled: dict[int, set[int]] = {}
            self.expected = set(range(self.world_size - n_servers))
            self.acc = GradAccumulator(self.device)
        with _READY:
            g.transport = self
            _READY.notify_all()

    @property
    def owners(self) -> list[int]:
        return list(range(self.n_servers))

    @property
    def live_workers(self) -> list[int]:
        return self.live

    def owned_keys(self) -> list[int]:
        return self.keys_of.get(self.rank, [])

    # -- the transport contract --------------------------------------------------------------------
    def step(self, step: int, grads: Mapping[int, bytes] | None, owner: Owner | None, *,
             out: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor] | None:
        if self.index < 0:
            self._serve(int(step), owner)
            return None
        self._push(int(step), grads)
        return self._pull(int(step) + 1, out)

    def fetch_weights(self, step: int, owner: Owner | None, *,
                      out: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor] | None:
        if self.index < 0:
            self._publish(int(step), owner.weight_frames(int(step)))
            self._await_pulls(int(step))
            return None
        return self._pull(int(step), out, full=True)  # a worker that starts or joins holds no codes

    def down_nbytes(self) -> tuple[int, int]:
        """A server's weight bundles served so far: (bytes as key frames, bytes sent). Workers get
        different frames of one step (key frames to a joining one), so the owner's encoder cannot
        say what the bytes sent stand for."""
        with self.cond:
            return self.whole_sent, self.counter.down_sent

    # -- a worker ----------------------------------------------------------------------------------
    def _push(self, step: int, grads: Mapping[int, bytes]) -> None:
        unknown = sorted(set(grads) - set(self.shapes))
        if unknown:
            raise ConfigError(f"rank {self.rank}: gradient frames for unknown keys {unknown}")
        refs = []
        for j in range(self.n_servers):
            bundle = b"".join(bytes(b) for k in self.keys_of[j] if (b := grads.get(k)) is not None)
            self.counter.up_sent += len(bundle)
            self.counter.messages += 1
            refs.append(self.group.actors[j].push.remote(step, self.index, bundle))
        _ray().get(refs, timeout=self.timeout_s + 60)

    def _pull(self, step: int, out: Mapping[int, torch.Tensor] | None, full: bool = False) -> dict[int, torch.Tensor]:
        servers = self.group.actors[:self.n_servers]
        answers = _ray().get([a.pull.remote(step, self.index, full) for a in servers], timeout=self.timeout_s + 60)
        weights: dict[int, torch.Tensor] = {}
        for j, (bundle, _) in enumerate(answers):
            try:
                self._decode(j, step, bundle, out, weights)
            except StateMismatch as e:  # resync this server's keys with key frames before any weight is used
                print(f"lowbit: rank {self.rank}: {e}; pulling key frames of step {step} from server {j}",
                      file=sys.stderr, flush=True)
                bundle, _ = _ray().get(servers[j].pull.remote(step, self.index, True), timeout=self.timeout_s + 60)
                self._decode(j, step, bundle, out, weights)
        self.live = [self.n_servers + w for w in answers[0][1]]
        return weights

    def _decode(self, j: int, step: int, bundle: bytes, out, weights: dict) -> None:
        """Server ``j``'s weight bundle for ``step``, validated and decoded into ``weights`` (and ``out``)."""
        self.counter.down_recv += len(bundle)
        for pf in parse_bundle(bundle, peer=j, step=step, kind="weight", shapes=self.shapes,
                               allowed_keys=self.keys_of[j], required_keys=self.keys_of[j], rank=self.rank):
            weights[pf.frame.key] = decode_weight(pf.frame, self.device, out, self.held)

    # -- a server ----------------------------------------------------------------------------------
    def push(self, step: int, worker: int, bundle: bytes) -> int:
        """Worker ``worker``'s gradient frames for ``step``, validated now and kept for the step.
        Returns the number of frames kept (0: a push for a step already applied)."""
        step, worker = int(step), int(worker)
        if not 0 <= worker < self.world_size - self.n_servers:
            raise TransportError(f"server {self.rank}: push from unknown worker {worker}")
        with self.cond:
            if step < self.current:
                return 0
            if step > self.current:
                raise TransportError(f"server {self.rank}: a push for step {step} from worker {worker}, but the "
                                     f"server is at step {self.current}")
        try:
            frames = [pf.frame for pf in parse_bundle(bundle, peer=worker, step=step, kind="grad",
                                                      shapes=self.shapes, allowed_keys=self.keys)]
        except FrameError as e:
            raise FrameError(f"server {self.rank}: {e}") from e
        with self.cond:
            if step < self.current:
                return 0
            self.pushed.setdefault(step, {})[worker] = (frames, len(bundle))
            self.cond.notify_all()
        return len(frames)

    def pull(self, step: int, worker: int, full: bool = False) -> tuple[bytes, list[int]]:
        """The weight bundle for ``step`` (after ``step`` updates), once published, as encoded or
        (``full``) as key frames; and the live workers."""
        step = int(step)
        with self.cond:
            if not self.cond.wait_for(lambda: step <= self.current, self.timeout_s):
                raise TransportError(f"server {self.rank}: weights for step {step} not ready after "
                                     f"{self.timeout_s:g}s (at step {self.current})")
            if step not in self.published:
                raise TransportError(f"server {self.rank}: weights for step {step} are no longer kept "
                                     f"(server at step {self.current}, keeps {sorted(self.published)})")
            encoded, keys = self.published[step]
            b = keys if full else encoded
            self.counter.down_sent += len(b)
            self.whole_sent += len(keys)
            self.counter.messages += 1
            self.pulled.setdefault(step, set()).add(int(worker))
            self.cond.notify_all()
            return b, sorted(self.expected)

    def retire(self, worker: int) -> None:
        """Stop waiting for ``worker`` (its actor is gone for good)."""
        with self.cond:
            self.expected.discard(int(worker))
            self.live = [self.n_servers + w for w in sorted(self.expected)]
            self.cond.notify_all()

    def _serve(self, step: int, owner: Owner) -> None:
        if step != self.current:
            raise TransportError(f"server {self.rank}: asked for step {step}, at step {self.current}")
        with self.cond:
            if not self.cond.wait_for(lambda: self.expected <= set(self.pushed.get(step, {})), self.timeout_s):
                missing = sorted(self.expected - set(self.pushed.get(step, {})))
                raise TransportError(f"server {self.rank}: no gradients for step {step} from workers {missing} "
                                     f"within {self.timeout_s:g}s")
            got = {w: v for w, v in self.pushed.pop(step, {}).items() if w in self.expected}
        by_key: dict[int, list] = {}
        for w in sorted(got):  # worker order: the fp32 sum does not depend on arrival
            frames, nbytes = got[w]
            self.counter.up_recv += nbytes
            for f in frames:
                by_key.setdefault(f.key, []).append(f)
        self.acc.reset()
        for frames in by_key.values():
            self.acc.add_all(frames, average=True)
        owner.apply(step, self.acc.averages(), dict(self.acc.counts))
        self._publish(step + 1, owner.weight_frames(step + 1))
        self._await_pulls(step + 1)

    def _publish(self, step: int, frames: Mapping[int, bytes]) -> None:
        if sorted(int(k) for k in frames) != self.keys:
            raise ConfigError(f"server {self.rank}: Owner.weight_frames gave keys {sorted(frames)}, "
                              f"expected {self.keys}")
        bundle = b"".join(bytes(frames[k]) for k in self.keys)
        keys = self._key_frames(step, bundle)
        with self.cond:
            self.published[step] = (bundle, keys)
            for old in [s for s in self.published if s <= step - KEEP_STEPS]:
                del self.published[old]
            self.current = step
            self.cond.notify_all()

    def _key_frames(self, step: int, bundle: bytes) -> bytes:
        """``bundle`` (this server's weights for ``step``) with every delta frame replaced by the key
        frame it stands for: its delta applied to a copy of the codes sent so far. A bundle without
        deltas is its own key frames."""
        def parse(b: bytes, s: int):
            return parse_bundle(b, peer=self.rank, step=s, kind="weight", shapes=self.shapes,
                                allowed_keys=self.keys, required_keys=self.keys, rank=self.rank)

        parsed = parse(bundle, step)
        if all(pf.frame.kind != "wdelta" for pf in parsed):
            self.mirror, self.last_keys = None, (step, bundle)  # a mirror is built when deltas follow
            return bundle
        if self.mirror is None:
            if self.last_keys is None:
                raise ConfigError(f"server {self.rank}: Owner.weight_frames began with delta frames")
            self.mirror = DeltaDecoder()
            for pf in parse(self.last_keys[1], self.last_keys[0]):
                self.mirror.apply(pf.frame)
        parts = []
        for pf in parsed:
            full = self.mirror.apply(pf.frame)  # a key frame is kept as it came
            parts.append(full.to_bytes() if pf.frame.kind == "wdelta" else pf.raw)
        keys = b"".join(parts)
        self.last_keys = (step, keys)
        return keys

    def _await_pulls(self, step: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.expected <= self.pulled.get(step, set()), self.timeout_s):
                missing = sorted(self.expected - self.pulled.get(step, set()))
                raise TransportError(f"server {self.rank}: workers {missing} did not take the weights of step "
                                     f"{step} within {self.timeout_s:g}s")
            for old in [s for s in self.pulled if s < step]:
                del self.pulled[old]


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
