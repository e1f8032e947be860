"""Sharded parameter server over torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

Ranks ``[0, S)`` of the group are servers, ``[S, S+W)`` workers. Keys are assigned to servers by
:func:`~lowbit.comm.transport.partition` over their element counts (largest first onto the least
loaded server), so every rank computes the same assignment from the ``shapes`` map alone.

One synchronous step (``step(step, grads, owner)``)::

    worker w:  for each server s: isend bundle G_{w,s} = frames of w's gradients for keys of s
               irecv from every server s its weight bundle V_s; decode -> all keys
    server s:  irecv G_{w,s} from every worker; decode and sum in fp32 (GradAccumulator);
               owner.apply(step, sums / counts, counts); V_s = join(owner.weight_frames(step))
               encoded once, isend V_s to every worker

A worker may leave a key out of ``grads`` (or map it to ``None`` / ``b""``): its nonfinite policy
skipped that gradient. The server then averages over the contributions that came
(``counts[key]`` < W); a key nobody sent is absent from both ``grads`` and ``counts`` given to
``Owner.apply``.

Bytes per step (one message = 8-byte length prefix + bundle, see :mod:`lowbit.comm.p2p`)::

    worker w:  up_sent   = Σ_s (8 + |G_{w,s}|)          down_recv = Σ_s (8 + |V_s|)
    server s:  up_recv   = Σ_w (8 + |G_{w,s}|)          down_sent = W · (8 + |V_s|)

:func:`expected_bytes` evaluates these from per-key frame sizes.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.distributed as dist

from lowbit.codec.codecs import decode_frame
from lowbit.comm.p2p import LEN_PREFIX, P2P, bundle_bound, join, parse_bundle
from lowbit.comm.transport import ByteCounter, GradAccumulator, Owner, Transport, partition
from lowbit.errors import ConfigError, FrameError


def _sizes(shapes: Mapping[int, tuple]) -> dict[int, int]:
    return {int(k): math.prod(tuple(s)) for k, s in shapes.items()}


def ps_partition(shapes: Mapping[int, tuple], n_servers: int) -> dict[int, int]:
    """key -> server rank, balanced by element count."""
    return partition(_sizes(shapes), n_servers)


def expected_bytes(rank: int, world_size: int, n_servers: int, shapes: Mapping[int, tuple],
                   grad_nbytes: Mapping[int, int], weight_nbytes: Mapping[int, int]) -> dict[str, int]:
    """The byte counts one synchronous :meth:`ParameterServerTransport.step` adds on ``rank`` when
    every worker sends a frame of ``grad_nbytes[k]`` bytes for every key and servers send weight
    frames of ``weight_nbytes[k]`` bytes (formulas in the module docstring)."""
    own = ps_partition(shapes, n_servers)
    W = world_size - n_servers
    g = {s: sum(grad_nbytes[k] for k in own if own[k] == s) for s in range(n_servers)}
    v = {s: sum(weight_nbytes[k] for k in own if own[k] == s) for s in range(n_servers)}
    if rank < n_servers:
        return {"up_sent": 0, "up_recv": W * (LEN_PREFIX + g[rank]), "down_sent": W * (LEN_PREFIX + v[rank]),
                "down_recv": 0, "messages": W}
    return {"up_sent": sum(LEN_PREFIX + g[s] for s in g), "up_recv": 0, "down_sent": 0,
            "down_recv": sum(LEN_PREFIX + v[s] for s in v), "messages": n_servers}


class ParameterServerTransport(Transport):
    """S server ranks own shards of the fp32 weights; W worker ranks push gradient frames and pull
    weight frames with non-blocking point-to-point ops (see the module docstring).

    Args:
        shapes: key -> shape of every parameter (the same map on every rank).
        n_servers: S, ranks [0, S) serve; at least one worker must remain.
        group: the process group (default WORLD); ranks are group ranks.
        timeout: seconds to wait for any peer before :class:`TransportError`.
        device: where decoded tensors are returned / accumulated (default CPU).
    """

    def __init__(self, shapes: Mapping[int, tuple], n_servers: int = 1, group=None, *,
                 timeout: float = 300.0, device: torch.device | str = "cpu") -> None:
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
        self.p2p = P2P(self.group, self.counter, timeout)

    @property
    def is_server(self) -> bool:
        return self.rank < self.n_servers

    def owned_keys(self, rank: int | None = None) -> list[int]:
        """Keys served by ``rank`` (default: this rank); empty for workers."""
        r = self.rank if rank is None else rank
        return list(self.keys_of.get(r, []))

    # ------------------------------------------------------------------ public API

    def step(self, step: int, grads: dict[int, bytes] | None, owner: Owner | None
             ) -> dict[int, torch.Tensor] | None:
        if self.is_server:
            self._check_owner(owner)
            self._serve_grads(step, owner)
            self._send_weights(step, owner)
            return None
        if grads is None:
            raise ConfigError(f"worker rank {self.rank} must pass its gradient frames to step()")
        self._push_grads(step, grads)
        return self._pull_weights(step)

    def fetch_weights(self, step: int, owner: Owner | None) -> dict[int, torch.Tensor] | None:
        if self.is_server:
            self._check_owner(owner)
            self._send_weights(step, owner)
            return None
        return self._pull_weights(step)

    # ------------------------------------------------------------------ halves

    def _check_owner(self, owner: Owner | None) -> None:
        if owner is None:
            raise ConfigError(f"server rank {self.rank} must pass its Owner to step()")
        have = sorted(int(k) for k in owner.owned_keys())
        if have != self.keys_of[self.rank]:
            raise ConfigError(f"server rank {self.rank} must own keys {self.keys_of[self.rank]} "
                              f"(partition by size), its Owner holds {have}")

    def _push_grads(self, step: int, grads: Mapping[int, bytes | None]) -> None:
        unknown = sorted(set(grads) - set(self.shapes))
        if unknown:
            raise ConfigError(f"gradient frames for unknown keys {unknown}")
        bundles = {s: join(grads[k] for k in self.keys_of[s] if grads.get(k)) for s in self.servers}
        self.p2p.exchange(step, bundles, [], direction="up")

    def _serve_grads(self, step: int, owner: Owner) -> None:
        mine = self.keys_of[self.rank]
        got = self.p2p.exchange(step, {}, self.workers, direction="up",
                                max_recv=bundle_bound(self.shapes, mine))
        acc = GradAccumulator(self.device)
        for w in self.workers:
            for pf in parse_bundle(got[w], peer=w, step=step, kind="grad", shapes=self.shapes,
                                   allowed_keys=mine, rank=self.rank):
                try:
                    acc.add(pf.frame)
                except FrameError as e:
                    raise FrameError(f"rank {self.rank}: bundle from peer {w} at step {step}: {e}") from e
        owner.apply(step, acc.averages(), dict(acc.counts))

    def _send_weights(self, step: int, owner: Owner) -> None:
        mine = self.keys_of[self.rank]
        frames = owner.weight_frames(step)
        if sorted(int(k) for k in frames) != mine:
            raise ConfigError(f"server rank {self.rank}: Owner.weight_frames gave keys {sorted(frames)}, "
                              f"expected {mine}")
        bundle = join(frames[k] for k in mine)  # encoded once, sent W times
        self.p2p.exchange(step, {w: bundle for w in self.workers}, [], direction="down")

    def _pull_weights(self, step: int) -> dict[int, torch.Tensor]:
        got = self.p2p.exchange(step, {}, self.servers, direction="down",
                                max_recv={s: bundle_bound(self.shapes, self.keys_of[s]) for s in self.servers})
        out: dict[int, torch.Tensor] = {}
        for s in self.servers:
            for pf in parse_bundle(got[s], peer=s, step=step, kind="weight", shapes=self.shapes,
                                   allowed_keys=self.keys_of[s], required_keys=self.keys_of[s],
                                   rank=self.rank):
                try:
                    out[pf.frame.key] = decode_frame(pf.frame, self.device)
                except FrameError as e:
                    raise FrameError(f"rank {self.rank}: bundle from peer {s} at step {step}: {e}") from e
        return out
