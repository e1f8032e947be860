"""Ray as a transport: the ranks of a run are Ray actors (:mod:`lowbit.comm.ray_group`), and the frames
they exchange travel as actor calls instead of torch.distributed messages. :class:`RayTransport` is
built inside a rank's function on :func:`~lowbit.comm.ray_group.group`; the actor group, the store
and the cluster session are re-exported here.

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

import sys
import threading
from typing import Mapping

import torch

from lowbit.codec.delta import DeltaDecoder, StateMismatch
from lowbit.comm.p2p import parse_bundle
from lowbit.comm.ray_group import (Group, RankActor, RankFailed, RayGroup, RayStore, StoreActor, _ray,
                                   default_temp_dir, group, init_local, ray_session)
from lowbit.comm.transport import ByteCounter, GradAccumulator, Owner, Transport, decode_weight, partition
from lowbit.errors import ConfigError, FrameError, TransportError

__all__ = ["KEEP_STEPS", "RayTransport",  # and, from lowbit.comm.ray_group:
           "Group", "RankActor", "RankFailed", "RayGroup", "RayStore", "StoreActor", "default_temp_dir", "group",
           "init_local", "ray_session"]

KEEP_STEPS = 4  # published weight bundles a server keeps (for replaced workers)


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
        key_server = partition(self.shapes, n_servers)
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
        g.attach(self)

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
