"""Sharded parameter server over torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

Ranks ``[0, S)`` of the group are servers, ``[S, S+W)`` workers; keys go to servers by
:func:`~lowbit.comm.transport.partition` over their element counts, so every rank computes the
same assignment from ``shapes`` alone. In one synchronous step each worker sends every server the
gradient frames of its keys (bundle G_{w,s}); each server decodes and sums them in fp32
(:class:`GradAccumulator`), lets its owner update and re-quantize, and sends the weight bundle V_s,
encoded once, to every worker.

The step is pipelined by key group (:func:`chunk_keys`): a bundle travels as one chunk message
per group, a lazy ``grads`` encodes group i + 1 while group i is on the wire, and a server sums
group i as it arrives and sends its weights while later groups still come in. Receives are kept
posted ahead on helper threads (:class:`_Pumps`) because gloo moves a message only once its
receive is posted. With a receive window (``recv_window``) a server posts every worker's chunk
i + window only once chunk i has come from all of them, so each worker's upload is shared evenly
between the servers instead of one flow running ahead.

A key a worker leaves out of ``grads`` (its nonfinite policy skipped it) is averaged over the
contributions that came (``counts[key]`` < W). ``on_worker_failure="stop"`` turns a failed peer
into a :class:`TransportError` on every rank that talks to it; ``"continue"`` lets the servers
drop dead workers (whole bundles, :meth:`P2P.exchange_tolerant`; server 0 publishes the live
workers in the c10d store). A server failure always stops the run.

Bytes per step (one message = 8-byte length prefix + chunk; C_s = the number of chunks of server
s, 1 in ``"continue"`` mode)::

    worker w:  up_sent   = Σ_s (8·C_s + |G_{w,s}|)      down_recv = Σ_s (8·C_s + |V_s|)
    server s:  up_recv   = Σ_w (8·C_s + |G_{w,s}|)      down_sent = W · (8·C_s + |V_s|)

:func:`expected_bytes` evaluates these from per-key frame sizes. See docs/transports.md for the
full design.
"""
from __future__ import annotations

import contextlib
import math
import queue
import threading
from typing import Mapping

import torch
import torch.distributed as dist

from lowbit.codec.bundle import bundle_bound, parse_bundle
from lowbit.codec.delta import DeltaDecoder
from lowbit.codec.frame import Frame, join_frames
from lowbit.comm.board import Board
from lowbit.comm.messages import LEN_PREFIX, Pending
from lowbit.comm.p2p import P2P
from lowbit.comm.transport import (ByteCounter, GradAccumulator, Owner, StepTimeline, Transport, decode_weight,
                                   partition)
from lowbit.errors import ConfigError, FrameError, TransportError

FAILURE_MODES = ("stop", "continue")
DEFAULT_CHUNKS = 10  # pieces per bundle: the receiver decodes one while the next is on the wire
DEFAULT_RECV_WINDOW = 2  # gradient chunks per worker a server has posted ahead (see the module docstring)


def _sizes(shapes: Mapping[int, tuple]) -> dict[int, int]:
    return {int(k): math.prod(tuple(s)) for k, s in shapes.items()}


def ps_partition(shapes: Mapping[int, tuple], n_servers: int) -> dict[int, int]:
    """key -> server rank, balanced by element count."""
    return partition(_sizes(shapes), n_servers)


def chunk_shares(n: int) -> list[float]:
    """Relative sizes of ``n`` key groups: equal, except that with 4 or more the last
    ``min(4, n - 2)`` halve, one after the other (10 groups: six of 1, then 1/2, 1/4, 1/8, 1/16).
    Whatever is still to do once the last gradients are in (average and re-quantize the groups
    completed last, send them to every worker, which decode them) grows with the last groups; the
    earlier groups' weights leave while later gradients still arrive."""
    if n < 4:
        return [1.0] * n
    t = min(4, n - 2)
    return [1.0] * (n - t) + [0.5 ** j for j in range(1, t + 1)]


def chunk_keys(keys: list[int], sizes: Mapping[int, int], chunks: int) -> list[list[int]]:
    """``keys`` (in order) cut into at most ``chunks`` contiguous groups whose element counts follow
    :func:`chunk_shares` (a key is never split), none empty (fewer groups when there are fewer keys)."""
    keys = list(keys)
    n = max(1, min(int(chunks), len(keys)))
    shares = chunk_shares(n)
    ends = [sum(shares[:j + 1]) / sum(shares) for j in range(n)]  # cumulative fraction after group j
    total = sum(sizes[k] for k in keys)
    groups: list[list[int]] = [[]]
    done = 0
    for i, k in enumerate(keys):
        left_keys, left_groups = len(keys) - i, n - len(groups) + 1
        if groups[-1] and len(groups) < n and (done >= total * ends[len(groups) - 1] or left_keys < left_groups):
            groups.append([])
        groups[-1].append(k)
        done += sizes[k]
    return groups


def expected_bytes(rank: int, world_size: int, n_servers: int, shapes: Mapping[int, tuple],
                   grad_nbytes: Mapping[int, int], weight_nbytes: Mapping[int, int],
                   chunks: int = DEFAULT_CHUNKS) -> dict[str, int]:
    """The byte counts one synchronous :meth:`ParameterServerTransport.step` adds on ``rank`` when
    every worker sends a frame of ``grad_nbytes[k]`` bytes for every key and servers send weight
    frames of ``weight_nbytes[k]`` bytes, each bundle cut into ``chunks`` (formulas in the module
    docstring)."""
    own = ps_partition(shapes, n_servers)
    sizes = _sizes(shapes)
    W = world_size - n_servers
    c = {s: len(chunk_keys(sorted(k for k in own if own[k] == s), sizes, chunks)) for s in range(n_servers)}
    g = {s: sum(grad_nbytes[k] for k in own if own[k] == s) for s in range(n_servers)}
    v = {s: sum(weight_nbytes[k] for k in own if own[k] == s) for s in range(n_servers)}
    if rank < n_servers:
        return {"up_sent": 0, "up_recv": W * (c[rank] * LEN_PREFIX + g[rank]),
                "down_sent": W * (c[rank] * LEN_PREFIX + v[rank]), "down_recv": 0, "messages": W * c[rank]}
    return {"up_sent": sum(c[s] * LEN_PREFIX + g[s] for s in g), "up_recv": 0, "down_sent": 0,
            "down_recv": sum(c[s] * LEN_PREFIX + v[s] for s in v), "messages": sum(c.values())}


class ParameterServerTransport(Transport):
    """S server ranks own shards of the fp32 weights; W worker ranks push gradient frames and pull
    weight frames with non-blocking point-to-point ops (see the module docstring).

    Args:
        shapes: key -> shape of every parameter (the same map on every rank).
        n_servers: S, ranks [0, S) serve; at least one worker must remain.
        group: the process group (default WORLD); ranks are group ranks.
        timeout: seconds to wait for any peer before :class:`TransportError`.
        device: where decoded tensors are returned / accumulated (default CPU).
        on_worker_failure: ``"stop"`` or ``"continue"`` (see the module docstring).
        chunks: each bundle travels as this many chunks (contiguous key groups, :func:`chunk_keys`)
            so that the receiver decodes chunk i while chunk i + 1 is on the wire; ``"continue"``
            mode sends whole bundles (one chunk).
        store: the c10d store for the live-worker list in ``"continue"`` mode (default: the
            default process group's store).
        weights_channel: send the weights down over a second process group of the same ranks
            (:meth:`P2P.open_down_channel`), so they leave a server while gradients still arrive; without
            it gloo serializes the two directions (a worker's "ready to receive" waits behind its
            own outgoing gradients). Creating a group is collective: every rank of ``group`` must
            construct the transport (as training and the benchmarks do). Not in ``"continue"`` mode.
        timeline: a :class:`~lowbit.comm.transport.StepTimeline` that records when each chunk of a
            step left and arrived (``self.timeline``; default off). Not in ``"continue"`` mode.
        recv_window: a server posts each worker's gradient chunk i + ``recv_window`` only once
            chunk i has come from every worker (module docstring); 0 posts them all at once. Only
            where chunks travel as one message each (gloo, ``"stop"`` mode).
    """

    def __init__(self, shapes: Mapping[int, tuple], n_servers: int = 1, group=None, *,
                 timeout: float = 300.0, device: torch.device | str = "cpu",
                 on_worker_failure: str = "stop", store=None, chunks: int = DEFAULT_CHUNKS,
                 weights_channel: bool = False, timeline: StepTimeline | None = None,
                 recv_window: int = DEFAULT_RECV_WINDOW) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if not isinstance(n_servers, int) or not 1 <= n_servers < self.world_size:
            raise ConfigError(f"n_servers must be in 1..{self.world_size - 1} for a group of "
                              f"{self.world_size} ranks (at least one worker), got {n_servers!r}")
        if not shapes:
            raise ConfigError("shapes is empty: nothing to exchange")
        self.shapes = {int(k): tuple(int(d) for d in s) for k, s in shapes.items()}
        self.n_servers = n_servers
        self.servers = list(range(n_servers))
        self.workers = list(range(n_servers, self.world_size))
        self.owner_of = ps_partition(self.shapes, n_servers)
        self.keys_of = {s: sorted(k for k, o in self.owner_of.items() if o == s) for s in self.servers}
        self.device = torch.device(device)
        self.counter = ByteCounter()
        self.held = DeltaDecoder()  # a worker's codes, onto which delta-coded weight frames apply
        self.p2p = P2P(self.group, self.counter, timeout)
        if on_worker_failure == "continue":  # whole bundles as length, then bytes (P2P.exchange_tolerant),
            self.p2p.one_message = False     # which the workers' chunk receives must then speak too
        self._acc = GradAccumulator(self.device)  # buffers reused every step (see GradAccumulator)
        self.timeline = timeline if timeline is not None else StepTimeline(keep=0)
        if on_worker_failure not in FAILURE_MODES:
            raise ConfigError(f"on_worker_failure must be one of {FAILURE_MODES}, got {on_worker_failure!r}")
        self.tolerant = on_worker_failure == "continue"
        if not isinstance(chunks, int) or not 1 <= chunks <= 64:
            raise ConfigError(f"chunks must be an int in 1..64, got {chunks!r}")
        self.chunks = 1 if self.tolerant else chunks
        if not isinstance(recv_window, int) or isinstance(recv_window, bool) or not 0 <= recv_window <= 64:
            raise ConfigError(f"recv_window must be an int in 0..64 (0 = every receive posted at once), got {recv_window!r}")
        self.recv_window = recv_window  # used where chunks are one message each (see _serve_step)
        sizes = _sizes(self.shapes)
        self.groups_of = {s: chunk_keys(self.keys_of[s], sizes, self.chunks) for s in self.servers}
        self.bounds_of = {s: [bundle_bound(self.shapes, g) for g in self.groups_of[s]] for s in self.servers}
        if self.tolerant and not self.is_server:
            # A server may wait ``timeout`` for a silent worker's length, again for its bundle and
            # once more sending its weights before it answers the others: workers wait longer.
            self.p2p.timeout = 4 * timeout
        self._live = list(self.workers)
        self.lost: dict[int, tuple[int, str]] = {}  # worker rank -> (step, reason); known to servers
        if weights_channel and not self.tolerant:
            self.p2p.open_down_channel()
        self.board = None
        self.server_group = None
        if self.tolerant:
            self.board = Board(store if store is not None else dist.distributed_c10d._get_default_store(),
                               self.rank, timeout, prefix="lowbit/ps")
            if n_servers > 1:  # every rank must take part in creating a group
                self.server_group = dist.new_group([self.p2p._global(s) for s in self.servers])

    @property
    def owners(self) -> list[int]:
        return list(self.servers)

    @property
    def live_workers(self) -> list[int]:
        """Worker ranks still taking part (all of them unless ``"continue"`` dropped some)."""
        return list(self._live)

    @property
    def is_server(self) -> bool:
        return self.rank < self.n_servers

    def owned_keys(self, rank: int | None = None) -> list[int]:
        """Keys served by ``rank`` (default: this rank); empty for workers."""
        r = self.rank if rank is None else rank
        return list(self.keys_of.get(r, []))

    # ------------------------------------------------------------------ public API

    def step(self, step: int, grads: dict[int, bytes] | None, owner: Owner | None, *,
             out: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor] | None:
        tl = self.timeline
        tl.begin(step)
        if self.is_server:
            self._check_owner(owner)
            if self.tolerant:
                self._serve_grads(step, owner)
                self._send_weights(step, owner)
            else:
                self._serve_step(step, owner)
            tl.mark("end")
            return None
        if grads is None:
            raise ConfigError(f"worker rank {self.rank} must pass its gradient frames to step()")
        unknown = sorted(set(grads) - set(self.shapes))
        if unknown:
            raise ConfigError(f"gradient frames for unknown keys {unknown}")
        if self.tolerant:
            self._push_grads(step, grads)
            weights = self._pull_weights(step, out)
            self._read_live(step)
            return weights
        pumps: list[_Pumps] = []  # posted once group 0 is on its way: no weight can come before it
        pending = Pending("up")
        try:
            self._push_grads(step, grads, pending, after_first=lambda: pumps.append(self._weight_pumps(step)))
        except BaseException:  # e.g. a gradient the lazy encoder refused: fail now, not after a timeout
            for pu in pumps:
                pu.close(wait=False)
            with contextlib.suppress(TransportError):
                self.p2p.finish(pending, step)
            raise
        pumps = pumps[0]
        weights = self._pull_weights(step, out, pumps)  # while the last gradient chunks may still be leaving
        self.p2p.finish(pending, step)
        tl.mark("end")
        return weights

    def fetch_weights(self, step: int, owner: Owner | None, *,
                      out: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor] | None:
        self.timeline.begin(step)
        if self.is_server:
            self._check_owner(owner)
            self._send_weights(step, owner, publish=False)
            return None
        return self._pull_weights(step, out)

    # ------------------------------------------------------------------ halves

    def _check_owner(self, owner: Owner | None) -> None:
        if owner is None:
            raise ConfigError(f"server rank {self.rank} must pass its Owner to step()")
        have = sorted(int(k) for k in owner.owned_keys())
        if have != self.keys_of[self.rank]:
            raise ConfigError(f"server rank {self.rank} must own keys {self.keys_of[self.rank]} "
                              f"(partition by size), its Owner holds {have}")

    def _push_grads(self, step: int, grads: Mapping[int, bytes | None], pending: Pending | None = None,
                    after_first=None) -> None:
        """Post group i of every server's bundle, i = 0, 1, ...: ``grads`` is read group by group,
        so a lazy mapping encodes group i + 1 while group i is on the wire. ``after_first()`` is
        called once group 0 is posted to every server. The sends complete in ``finish(pending)``;
        ``"continue"`` mode sends whole bundles and waits for them."""
        if self.tolerant:
            bundles = {s: join_frames([grads[k] for k in self.keys_of[s] if grads.get(k)]) for s in self.servers}
            self.p2p.exchange(step, bundles, [], direction="up")
            return
        for i in range(max(len(g) for g in self.groups_of.values())):
            for s in self.servers:
                if i < len(self.groups_of[s]):
                    frames = [grads[k] for k in self.groups_of[s][i] if grads.get(k)]
                    self.p2p.send_chunk(s, i, frames, "up", pending, bound=self.bounds_of[s][i], reuse=i)
                    self.timeline.mark("grads_posted", s, i)
            if i == 0 and after_first is not None:
                after_first()

    def _drop(self, step: int, failed: Mapping[int, str], half: str) -> None:
        """Agree with the other servers on the workers lost in this half and stop serving them."""
        mask = torch.zeros(self.world_size, dtype=torch.int64)
        for w in failed:
            mask[w] = 1
        if self.server_group is not None:
            dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=self.server_group)
        gone = [w for w in self._live if mask[w]]
        for w in gone:
            self.lost[w] = (step, failed.get(w, f"lost by another server during the {half}"))
            self._live.remove(w)
        if not self._live:
            raise TransportError(f"rank {self.rank}: every worker is lost at step {step} "
                                 f"({ {w: r for w, (_, r) in self.lost.items()} })")

    def _publish_live(self, step: int) -> None:
        if self.rank == self.servers[0]:
            self.board.publish("live", step, self._live)
            if step >= 2:  # every live worker read it before sending the gradients of step + 1
                self.board.forget("live", step - 2, [self.rank])

    def _read_live(self, step: int) -> None:
        s0 = self.servers[0]
        self._live = [int(w) for w in self.board.gather("live", step, [s0], delete=False)[s0]]

    def close(self) -> None:
        """In ``"continue"`` mode the live-worker lists live in the store, which the rank that
        hosts it (rank 0, a server, for ``tcp://`` rendezvous) must not take away while workers still
        read it: workers say goodbye, and server 0 waits (at most the timeout) for the live ones."""
        if not self.tolerant:
            return
        if not self.is_server:
            self.board.publish("bye", None)
        elif self.rank == self.servers[0]:
            try:
                self.board.gather("bye", None, self._live, delete=False)
            except TransportError:  # a worker lost at the very end; nothing left to serve
                pass

    def _sum_group(self, step: int, i: int, chunks: Mapping[int, object], average: bool) -> None:
        """Key group i from the workers in ``chunks`` (worker -> bundle, in the order of the sum): each
        bundle validated, then every key's frames decoded, added to what earlier chunks of the group
        left in the key's buffer and, with ``average``, averaged, in one pass over the buffer
        (GradAccumulator.add_all)."""
        by_key: dict[int, list[tuple[int, Frame]]] = {}  # key -> (worker, frame), in the order of chunks
        for w, chunk in chunks.items():
            for pf in parse_bundle(chunk, peer=w, step=step, kind="grad", shapes=self.shapes,
                                   allowed_keys=self.groups_of[self.rank][i], rank=self.rank):
                by_key.setdefault(pf.frame.key, []).append((w, pf.frame))
        for sent in by_key.values():
            try:
                self._acc.add_all([f for _, f in sent], average=average)
            except FrameError as e:
                w = sent[getattr(e, "index", 0)][0]
                raise FrameError(f"rank {self.rank}: bundle from peer {w} at step {step}: {e}") from e

    def _sum_arriving(self, step: int, i: int, pumps: "_Pumps") -> FrameError | None:
        """Key group i from every worker, summed as the chunks come instead of once all are in: the
        chunk that arrives first is decoded while the others are still on the wire, and chunks that
        are already in when the server gets to them are decoded together in one pass
        (:meth:`_sum_group`). The order of the sum stays fixed, so the bits do not depend on timing:
        the first two workers' chunks in the order they arrive (a + b and b + a are the same fp32
        number), then the others in worker order. Every worker's chunk i is taken, also after a bad
        one, whose FrameError is returned (a failed receive raises at once)."""
        order = list(self.workers)
        if len(order) >= 2 and pumps.first_of(order[:2]) != order[0]:
            order[0], order[1] = order[1], order[0]
        pos, error = 0, None
        while pos < len(order):
            batch = [order[pos]]
            pos += 1
            while pos < len(order) and pumps.ready(order[pos]):
                batch.append(order[pos])
                pos += 1
            chunks = {w: pumps.get(w) for w in batch}
            if error is None:
                try:
                    self._sum_group(step, i, chunks, average=pos == len(order))
                except FrameError as e:
                    error = e
        return error

    def _serve_step(self, step: int, owner: Owner) -> None:
        """The server's whole step, pipelined by key group: as soon as group i has come from every
        worker it is averaged, the owner updates and re-quantizes those keys (``apply_keys``) and
        their weights leave for the workers, while group i + 1 is still arriving. An owner without
        ``apply_keys`` is updated once, after the last group."""
        groups = self.groups_of[self.rank]
        self._acc.reset()
        pending = Pending("down")
        parts = hasattr(owner, "apply_keys")

        with self._finishing(pending, step):
            pumps = _Pumps(self.p2p, step, "up", {w: self.bounds_of[self.rank] for w in self.workers}, f"rank {self.rank}: gradients",
                           in_order=True, timeline=self.timeline,
                           window=self.recv_window if self.p2p.one_message else 0)
            error: FrameError | None = None  # a bad chunk: the rest of the step is still drained
            try:
                for i in range(len(groups)):
                    if error is not None:
                        for w in self.workers:  # chunk i of every worker, drained
                            pumps.get(w)
                        continue
                    error = self._sum_arriving(step, i, pumps)
                    if error is not None:
                        continue
                    self.timeline.mark("group_averaged", None, i)
                    if parts:
                        owner.apply_keys(step, self._acc.averages(groups[i]),
                                         {k: self._acc.counts[k] for k in groups[i] if k in self._acc.counts},
                                         groups[i], i == len(groups) - 1)
                        self._send_group(step, owner, i, pending)
                        self.timeline.mark("weights_posted", None, i)
            finally:
                pumps.close()
            if error is not None:
                raise error
            if not parts:
                owner.apply(step, self._acc.averages(), dict(self._acc.counts))
                frames = owner.weight_frames(step)
                for i in range(len(groups)):
                    self._send_group(step, owner, i, pending, frames)
                    self.timeline.mark("weights_posted", None, i)

    @contextlib.contextmanager
    def _finishing(self, pending: Pending, step: int):
        """Wait for the weight chunks already posted, also when the step fails (then quietly: the
        first error is the one to report)."""
        try:
            yield
        except BaseException:
            try:
                self.p2p.finish(pending, step)
            except TransportError:
                pass
            raise
        self.p2p.finish(pending, step)

    def _send_group(self, step: int, owner: Owner, i: int, pending: Pending, frames=None) -> None:
        keys = self.groups_of[self.rank][i]
        if frames is None:
            frames = owner.weight_frames(step, keys) if hasattr(owner, "apply_keys") else owner.weight_frames(step)
        missing = [k for k in keys if k not in frames]
        if missing:
            raise ConfigError(f"server rank {self.rank}: Owner.weight_frames lacks keys {missing}")
        # encoded once, laid out once, sent to every worker
        self.p2p.send_chunk(self.workers, i, [frames[k] for k in keys], "down", pending,
                            bound=self.bounds_of[self.rank][i], reuse=i)

    def _serve_grads(self, step: int, owner: Owner) -> None:
        """``"continue"`` mode: whole bundles, each worker on its own thread (see the module docstring)."""
        self._acc.reset()
        got, failed = self.p2p.exchange_tolerant(step, {}, self._live, direction="up",
                                                 max_recv=bundle_bound(self.shapes, self.keys_of[self.rank]))
        self._drop(step, failed, "gradient upload")
        self._sum_group(step, 0, {w: got[w] for w in sorted(got)}, average=True)  # worker order
        owner.apply(step, self._acc.averages(), dict(self._acc.counts))

    def _send_weights(self, step: int, owner: Owner, publish: bool = True) -> None:
        mine = self.keys_of[self.rank]
        frames = owner.weight_frames(step)
        if sorted(int(k) for k in frames) != mine:
            raise ConfigError(f"server rank {self.rank}: Owner.weight_frames gave keys {sorted(frames)}, "
                              f"expected {mine}")
        if self.tolerant:
            bundle = join_frames([frames[k] for k in mine])  # encoded once, sent W times
            _, failed = self.p2p.exchange_tolerant(step, {w: bundle for w in self._live}, [], direction="down")
            self._drop(step, failed, "weight download")
            if publish:
                self._publish_live(step)
            return
        pending = Pending("down")
        with self._finishing(pending, step):
            for i in range(len(self.groups_of[self.rank])):
                self._send_group(step, owner, i, pending, frames)

    def _weight_pumps(self, step: int) -> "_Pumps":
        return _Pumps(self.p2p, step, "down", dict(self.bounds_of), f"rank {self.rank}: weights", in_order=False,
                      timeline=self.timeline)

    def _pull_weights(self, step: int, dest: Mapping[int, torch.Tensor] | None,
                      pumps: "_Pumps | None" = None) -> dict[int, torch.Tensor]:
        """Every server's weights, group by group as the servers send them (chunk messages), each
        decoded (into ``dest`` when given) while the next is on the way, in the order they arrive."""
        out: dict[int, torch.Tensor] = {}
        pumps = pumps or self._weight_pumps(step)
        try:
            for s, i, chunk in pumps.as_they_come():
                keys = self.groups_of[s][i]
                for pf in parse_bundle(chunk, peer=s, step=step, kind="weight", shapes=self.shapes,
                                       allowed_keys=keys, required_keys=keys, rank=self.rank):
                    try:
                        out[pf.frame.key] = decode_weight(pf.frame, self.device, dest, self.held)
                    except FrameError as e:
                        raise FrameError(f"rank {self.rank}: bundle from peer {s} at step {step}: {e}") from e
                self.timeline.mark("weights_decoded", s, i)
        finally:
            pumps.close()
        return out


class _Pumps:
    """Receives every peer's chunks 0..C−1 of a step into a queue, so the caller decodes while the
    rest arrive. gloo moves a message only after its receive is posted (the receiver announces it
    to the sender), so a receive posted late idles the connection. One-message chunks
    (``p2p.one_message``): every chunk's receive is posted here, at once, and per peer one daemon
    thread waits for them in order. Length, then bytes: per peer, one daemon thread posts the
    receives of all C lengths at once, then each chunk's bytes the moment its length is in
    (checked against its bound before anything is allocated); a second thread waits for the
    bytes in order. Either way the sender's chunk i + 1 never waits for the receiver to have taken
    chunk i. ``in_order``: one queue per peer, taken chunk by chunk with :meth:`get`; otherwise one
    queue for all, taken in arrival order with :meth:`as_they_come`. A receive error is raised on
    the caller's thread. :meth:`close` waits for every thread (each ends with its last chunk, an
    error, or the transport's timeout), so none is left to take a later step's messages.

    ``window`` > 0 (one-message chunks, every peer sending the same number): only chunks
    0..window−1 of every peer are posted at once; the pump thread that takes the last peer's chunk
    i posts every peer's chunk i + window (the module docstring says why). A failed receive ends
    the other peers' pumps too (their later chunks would never be posted)."""

    def __init__(self, p2p: P2P, step: int, direction: str, bounds: Mapping[int, list[int]], what: str,
                 in_order: bool, timeline: StepTimeline, window: int = 0) -> None:
        self.p2p, self.step, self.direction, self.what = p2p, step, direction, what
        self.mark, self.arrived = timeline.marker(), "grads_in" if direction == "up" else "weights_in"
        self.bounds = {int(p): list(b) for p, b in bounds.items()}
        shared: queue.Queue = queue.Queue()
        self.queues = {p: queue.Queue() if in_order else shared for p in self.bounds}
        self.arrival = threading.Condition()  # notified whenever a chunk (or an error) is queued
        self.threads = []
        self.failed = False  # a receive failed: the later chunks' receives may still be posted
        n_chunks = {len(b) for b in self.bounds.values()}
        if window and not (p2p.one_message and len(n_chunks) == 1):
            raise ConfigError("a receive window needs one-message chunks and the same number of chunks from every peer")
        self.window = int(window)
        self._chunks = max(n_chunks, default=0)  # per peer (all the same where a window is used)
        self.posted: dict[int, queue.Queue] = {}  # peer -> (chunk, posted receive), in chunk order
        self._came: dict[int, int] = {}  # chunk -> how many peers' chunk has arrived (window)
        self._window_lock = threading.Lock()
        for p in self.bounds:
            posted = self.posted[p] = queue.Queue()
            if p2p.one_message:  # the chunks' receives posted now (the first `window` of them); one
                try:             # thread waits for them in order
                    first = range(min(self.window or len(self.bounds[p]), len(self.bounds[p])))
                    for i, item in zip(first, p2p.post_chunks(p, self.bounds[p], direction, first)):
                        posted.put((i, item))
                except BaseException as e:  # noqa: BLE001 - raised on the caller's thread by _take
                    posted.put((None, e))
                targets = ((self._pump, "recv"),)
            else:
                targets = ((self._post, "post"), (self._pump, "recv"))
            self.threads += [threading.Thread(target=target, args=(p, posted), daemon=True,
                                              name=f"lowbit-{name}-{direction}-{p}") for target, name in targets]
        for th in self.threads:
            th.start()

    def _post(self, peer: int, posted: queue.Queue) -> None:
        bounds = self.bounds[peer]
        try:
            lengths = self.p2p.post_chunk_lengths(peer, range(len(bounds)), self.direction)
            for i, (bound, length) in enumerate(zip(bounds, lengths)):
                posted.put((i, self.p2p.post_chunk_body(peer, i, self.step, self.direction, length, bound,
                                                        of=len(bounds))))
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread
            posted.put((None, e))

    def _pump(self, peer: int, posted: queue.Queue) -> None:
        try:
            for _ in self.bounds[peer]:
                i, body = posted.get()  # the poster always answers: a chunk or its error
                if i is None:
                    raise body
                buf = (self.p2p.wait_chunk(peer, i, self.step, body, of=len(self.bounds[peer])) if self.p2p.one_message
                       else self.p2p.wait_chunk_body(peer, i, self.step, body))
                self.mark(self.arrived, peer, i)
                if self.window:
                    self._slide(i)
                self._put(peer, (peer, i, buf))
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread
            self.failed = True
            if self.window:  # the other peers' later chunks may now never be posted: end their pumps
                for q, posted_q in self.posted.items():
                    if q != peer:
                        posted_q.put((None, TransportError(f"{self.what}: peer {q}'s later chunks of step {self.step} "
                                                           f"not received: peer {peer} failed first")))
            self._put(peer, (peer, None, e))

    def _slide(self, i: int) -> None:
        """Chunk i has come from one more peer; once it has from all, every peer's chunk i + window is
        posted (on this, the last such peer's, thread)."""
        with self._window_lock:
            self._came[i] = self._came.get(i, 0) + 1
            nxt = i + self.window
            if self._came[i] < len(self.bounds) or nxt >= self._chunks:
                return
            for q, posted in self.posted.items():
                posted.put((nxt, self.p2p.post_chunks(q, self.bounds[q], self.direction, [nxt])[0]))

    def _put(self, peer: int, item) -> None:
        with self.arrival:
            self.queues[peer].put(item)
            self.arrival.notify_all()

    def first_of(self, peers: list[int]) -> int:
        """The first of ``peers`` (in_order pumps) whose next chunk is in, or arrives first."""
        wait = self.p2p.timeout + 30
        with self.arrival:
            if not self.arrival.wait_for(lambda: any(not self.queues[p].empty() for p in peers), timeout=wait):
                raise TransportError(f"{self.what}: nothing from peers {peers} at step {self.step} within {wait:g}s")
        return next(p for p in peers if not self.queues[p].empty())

    def ready(self, peer: int) -> bool:
        """Whether ``peer``'s next chunk is in (in_order pumps)."""
        return not self.queues[peer].empty()

    def _take(self, peer: int | None) -> tuple[int, int, memoryview]:
        """The next item of ``peer``'s queue (any peer's: None); counted."""
        wait = self.p2p.timeout + 30  # each receive has the transport's timeout; this is a backstop
        q = self.queues[peer if peer is not None else next(iter(self.queues))]
        try:
            p, i, buf = q.get(timeout=wait)
        except queue.Empty:
            who = "the peers" if peer is None else f"peer {peer}"
            raise TransportError(f"{self.what}: nothing from {who} at step {self.step} within {wait:g}s") from None
        if i is None:
            raise buf
        self.p2p.count_recv(self.direction, len(buf))
        return p, i, buf

    def get(self, peer: int) -> memoryview:
        """``peer``'s next chunk (``in_order`` pumps: chunks 0, 1, ... in turn)."""
        return self._take(peer)[2]

    def as_they_come(self):
        """Every chunk of every peer as ``(peer, chunk, bytes)``, in arrival order."""
        for _ in range(sum(len(b) for b in self.bounds.values())):
            yield self._take(None)

    def close(self, wait: bool = True) -> None:
        """Wait for every thread; ``wait=False`` leaves them (the step failed on this side before its
        peers sent everything: waiting would only delay the error by the timeout)."""
        if wait:
            for th in self.threads:
                th.join()
        if self.failed or not wait:  # receives may still be posted into the pooled buffers: the next
            self.p2p.drop_recv_pool()  # step gets new ones
