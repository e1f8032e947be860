"""Sharded parameter server over torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

Ranks ``[0, S)`` of the group are servers, ``[S, S+W)`` workers; keys go to servers by element
count (:mod:`lowbit.comm.chunk_plan`), so every rank computes the same assignment from ``shapes``
alone. In one synchronous step each worker sends every server the gradient frames of its keys
(bundle G_{w,s}); each server decodes and sums them in fp32 (:class:`GradAccumulator`), lets its
owner update and re-quantize, and sends the weight bundle V_s, encoded once, to every worker. A
bundle travels as one chunk message per key group, received on helper threads
(:class:`~lowbit.comm.pumps.Pumps`), so a group is summed, updated and sent down while later
groups are still on the wire.

``on_worker_failure="stop"`` turns a failed peer into a :class:`TransportError` on every rank that
talks to it; ``"continue"`` lets the servers drop dead workers (whole bundles,
:meth:`P2P.exchange_tolerant`; server 0 publishes the live workers in the c10d store). A server
failure always stops the run. docs/transports.md describes the pipeline, the receive window, the
weights channel, ``continue`` mode and the bytes per step (:func:`expected_bytes`).
"""
from __future__ import annotations

import contextlib
from typing import Mapping

import torch
import torch.distributed as dist

from lowbit.codec.bundle import bundle_bound, parse_bundle
from lowbit.codec.delta import DeltaDecoder
from lowbit.codec.frame import Frame, join_frames
from lowbit.comm.board import Board
from lowbit.comm.chunk_plan import DEFAULT_CHUNKS, chunk_keys, element_counts
from lowbit.comm.messages import LEN_PREFIX, Pending
from lowbit.comm.p2p import P2P
from lowbit.comm.pumps import Pumps
from lowbit.comm.transport import (ByteCounter, GradAccumulator, Owner, StepTimeline, Transport, check_owner,
                                   decode_weight, partition)
from lowbit.errors import ConfigError, FrameError, TransportError

FAILURE_MODES = ("stop", "continue")
DEFAULT_RECV_WINDOW = 2  # gradient chunks per worker a server has posted ahead (docs/transports.md)


def expected_bytes(rank: int, world_size: int, n_servers: int, shapes: Mapping[int, tuple],
                   grad_nbytes: Mapping[int, int], weight_nbytes: Mapping[int, int],
                   chunks: int = DEFAULT_CHUNKS) -> dict[str, int]:
    """The byte counts one synchronous :meth:`ParameterServerTransport.step` adds on ``rank`` when
    every worker sends a frame of ``grad_nbytes[k]`` bytes for every key and servers send weight
    frames of ``weight_nbytes[k]`` bytes, each bundle cut into ``chunks``. One message is the 8-byte
    length prefix and a chunk; C_s = the number of chunks of server s, 1 in ``"continue"`` mode::

        worker w:  up_sent   = Σ_s (8·C_s + |G_{w,s}|)      down_recv = Σ_s (8·C_s + |V_s|)
        server s:  up_recv   = Σ_w (8·C_s + |G_{w,s}|)      down_sent = W · (8·C_s + |V_s|)
    """
    own = partition(shapes, n_servers)
    sizes = element_counts(shapes)
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
    weight frames with non-blocking point-to-point ops (see the module docstring and
    docs/transports.md).

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
            chunk i has come from every worker (docs/transports.md); 0 posts them all at once. Only
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
        self.owner_of = partition(self.shapes, n_servers)
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
        sizes = element_counts(self.shapes)
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
        pumps: list[Pumps] = []  # posted once group 0 is on its way: no weight can come before it
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
        check_owner(owner, self.keys_of[self.rank], f"server rank {self.rank}")

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

    def _sum_arriving(self, step: int, i: int, pumps: "Pumps") -> FrameError | None:
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
            pumps = Pumps(self.p2p, step, "up", {w: self.bounds_of[self.rank] for w in self.workers}, f"rank {self.rank}: gradients",
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
        """``"continue"`` mode: whole bundles, each worker on its own thread (:meth:`P2P.exchange_tolerant`)."""
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

    def _weight_pumps(self, step: int) -> "Pumps":
        return Pumps(self.p2p, step, "down", dict(self.bounds_of), f"rank {self.rank}: weights", in_order=False,
                      timeline=self.timeline)

    def _pull_weights(self, step: int, dest: Mapping[int, torch.Tensor] | None,
                      pumps: "Pumps | None" = None) -> dict[int, torch.Tensor]:
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
