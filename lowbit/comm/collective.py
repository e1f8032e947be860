"""Ring and tree exchange of frames without a central server, on torch.distributed point-to-point.

Every rank ``r`` of the ``p`` ranks owns the shard ``K_r`` of keys given by
:func:`~lowbit.comm.transport.partition` over element counts, computes gradients for *all* keys
and gets back the dequantized weights of all keys. One step: a reduce-scatter of *payloads* (every
gradient frame travels unmodified to its key's owner, which decodes and sums in fp32; nothing is
re-quantized in flight), then ``owner.apply`` and ``V_r = join(owner.weight_frames(step))``, then
an all-gather of the weight bundles (forwarded unchanged, which is exact).

Bytes per step (one message = 8-byte length prefix + bundle, :mod:`lowbit.comm.p2p`; ``g_k`` /
``w_k`` = size of a gradient / weight frame of key ``k``, ``G(Q) = Σ_{k owned by a rank in Q} g_k``,
``V_q = Σ_{k ∈ K_q} w_k``)::

    ring: reduce-scatter round s = 1..p−1 sends (r+s)%p my frames for K_{(r+s)%p}, receives from
          (r−s)%p; all-gather round t = 0..p−2 sends (r+1)%p V_{(r−t)%p}, receives V_{(r−1−t)%p}
        up_sent   = 8(p−1) + Σ_{q≠r} G({q})          up_recv   = 8(p−1) + (p−1)·G({r})
        down_sent = 8(p−1) + Σ_{q≠(r+1)%p} V_q       down_recv = 8(p−1) + Σ_{q≠r} V_q
        messages  = 2(p−1)
    tree: p = 2^L, rounds j = 0..L−1 with partner r XOR 2^j; halving sends the frames owned in
          O_j(r) = {q : q ≡ r on bits < j, bit j of q ≠ bit j of r}, receives those for
          M_j(r) = {q : q ≡ r on bits ≤ j}; doubling sends all held, H_j(r) = {q : q >> j = r >> j}
        up_sent   = Σ_j [8 + 2^j · G(O_j(r))]        up_recv   = Σ_j [8 + 2^j · G(M_j(r))]
        down_sent = Σ_j [8 + Σ_{q ∈ H_j(r)} V_q]     down_recv = Σ_j [8 + Σ_{q ∈ H_j(r ⊕ 2^j)} V_q]
        messages  = 2L

The tree moves more gradient bytes than the ring for p ≥ 8 (L/2 vs (p−1)/p of the payload) but in
log2(p) rounds instead of p − 1: the better choice for small, latency-bound messages.
:func:`ring_expected_bytes` and :func:`tree_expected_bytes` evaluate the formulas. See
docs/transports.md for the full design.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from lowbit.codec.bundle import ParsedFrame, bundle_bound, parse_bundle
from lowbit.codec.delta import DeltaDecoder
from lowbit.codec.frame import join_frames
from lowbit.comm.messages import LEN_PREFIX
from lowbit.comm.p2p import P2P
from lowbit.comm.transport import ByteCounter, GradAccumulator, Owner, Transport, check_owner, decode_weight, partition
from lowbit.errors import ConfigError, FrameError


def _per_owner(own: Mapping[int, int], nbytes: Mapping[int, int], p: int) -> list[int]:
    out = [0] * p
    for k, q in own.items():
        out[q] += nbytes[k]
    return out


def ring_expected_bytes(rank: int, world_size: int, shapes: Mapping[int, tuple],
                        grad_nbytes: Mapping[int, int], weight_nbytes: Mapping[int, int]) -> dict[str, int]:
    """Bytes one :meth:`RingTransport.step` adds on ``rank`` (formulas in the module docstring)."""
    p, r = world_size, rank
    own = partition(shapes, p)
    G, V = _per_owner(own, grad_nbytes, p), _per_owner(own, weight_nbytes, p)
    pre = LEN_PREFIX * (p - 1)
    return {"up_sent": pre + sum(G[q] for q in range(p) if q != r),
            "up_recv": pre + (p - 1) * G[r],
            "down_sent": pre + sum(V[q] for q in range(p) if q != (r + 1) % p),
            "down_recv": pre + sum(V[q] for q in range(p) if q != r),
            "messages": 2 * (p - 1)}


def _low_mask(j: int) -> int:
    return (1 << j) - 1


def tree_expected_bytes(rank: int, world_size: int, shapes: Mapping[int, tuple],
                        grad_nbytes: Mapping[int, int], weight_nbytes: Mapping[int, int]) -> dict[str, int]:
    """Bytes one :meth:`TreeTransport.step` adds on ``rank`` (formulas in the module docstring)."""
    p, r = world_size, rank
    L = _log2_exact(p)
    own = partition(shapes, p)
    G, V = _per_owner(own, grad_nbytes, p), _per_owner(own, weight_nbytes, p)
    out = {"up_sent": 0, "up_recv": 0, "down_sent": 0, "down_recv": 0, "messages": 2 * L}
    for j in range(L):
        m = _low_mask(j)
        O = [q for q in range(p) if q & m == r & m and (q >> j) & 1 != (r >> j) & 1]
        M = [q for q in range(p) if q & (m | (1 << j)) == r & (m | (1 << j))]
        out["up_sent"] += LEN_PREFIX + (1 << j) * sum(G[q] for q in O)
        out["up_recv"] += LEN_PREFIX + (1 << j) * sum(G[q] for q in M)
        partner = r ^ (1 << j)
        out["down_sent"] += LEN_PREFIX + sum(V[q] for q in range(p) if q >> j == r >> j)
        out["down_recv"] += LEN_PREFIX + sum(V[q] for q in range(p) if q >> j == partner >> j)
    return out


def _log2_exact(p: int) -> int:
    if p < 1 or p & (p - 1):
        raise ConfigError(f"the tree transport needs a power-of-two number of ranks, got {p}")
    return p.bit_length() - 1


class _Overlap:
    """Decoding handed to one helper thread, in order, while the calling thread goes on with the
    next round: the decode of round i overlaps the transfer of round i + 1 instead of leaving the
    link idle in between. One thread keeps the order, so fp32 sums are bit-identical to decoding
    inline. :meth:`join` waits for everything submitted and raises the first error."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list = []

    def submit(self, fn: Callable, *args) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-decode")
        self._futures.append(self._pool.submit(fn, *args))

    def join(self, quiet: bool = False) -> None:
        """Wait for all submitted work; raise its first error unless ``quiet`` (the caller is
        already raising one of its own: no helper may still write into the outputs then)."""
        futures, self._futures = self._futures, []
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None and not quiet:
            raise first


class _ShardedTransport(Transport):
    """Common part of ring and tree: shard ownership, checks, the owner step, decoding (on a helper
    thread while the next round is on the wire, :class:`_Overlap`)."""

    def __init__(self, shapes: Mapping[int, tuple], group=None, *, timeout: float = 300.0,
                 device: torch.device | str = "cpu") -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if not shapes:
            raise ConfigError("shapes is empty: nothing to exchange")
        self.shapes = {int(k): tuple(int(d) for d in s) for k, s in shapes.items()}
        self.owner_of = partition(self.shapes, self.world_size)
        self.keys_of = {q: sorted(k for k, o in self.owner_of.items() if o == q) for q in range(self.world_size)}
        self.device = torch.device(device)
        self.counter = ByteCounter()
        self.held = DeltaDecoder()  # this rank's codes, onto which delta-coded weight frames apply
        self.p2p = P2P(self.group, self.counter, timeout)
        self._acc = GradAccumulator(self.device)  # buffers reused every step (see GradAccumulator)
        self._overlap = _Overlap()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-encode")

    def owned_keys(self, rank: int | None = None) -> list[int]:
        """Keys owned by ``rank`` (default: this rank)."""
        return list(self.keys_of[self.rank if rank is None else rank])

    def keys_of_ranks(self, ranks) -> list[int]:
        return sorted(k for q in ranks for k in self.keys_of[q])

    # ------------------------------------------------------------------ public API

    def step(self, step: int, grads: dict[int, bytes] | None, owner: Owner | None, *,
             out: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        self._check_owner(owner)
        if grads is None:
            raise ConfigError(f"rank {self.rank} computes gradients for all keys: pass its frames to step()")
        unknown = sorted(set(grads) - set(self.shapes))
        if unknown:
            raise ConfigError(f"gradient frames for unknown keys {unknown}")
        acc = self._acc
        acc.reset()
        with self._overlapped():
            for peer, pf in self._reduce_scatter(step, grads):
                self._overlap.submit(self._add_grad, peer, pf, step)
        owner.apply(step, acc.averages(), dict(acc.counts))
        return self._all_gather(step, owner, out)

    def _add_grad(self, peer: int, pf: ParsedFrame, step: int) -> None:
        try:
            self._acc.add(pf.frame)
        except FrameError as e:
            raise FrameError(f"rank {self.rank}: gradient frame for key {pf.frame.key} via peer {peer} "
                             f"at step {step}: {e}") from e

    @contextlib.contextmanager
    def _overlapped(self):
        """The rounds inside hand decoding to :attr:`_overlap`; on leaving, wait for it (and raise
        its first error), also when a round failed (then the round's error is the one raised)."""
        try:
            yield self._overlap
        except BaseException:
            self._overlap.join(quiet=True)
            raise
        self._overlap.join()

    def fetch_weights(self, step: int, owner: Owner | None, *,
                      out: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        self._check_owner(owner)
        return self._all_gather(step, owner, out)

    # ------------------------------------------------------------------ pieces

    def _check_owner(self, owner: Owner | None) -> None:
        check_owner(owner, self.keys_of[self.rank], f"rank {self.rank}")

    def _own_weight_bundle(self, step: int, owner: Owner) -> bytes:
        mine = self.keys_of[self.rank]
        frames = owner.weight_frames(step)
        if sorted(int(k) for k in frames) != mine:
            raise ConfigError(f"rank {self.rank}: Owner.weight_frames gave keys {sorted(frames)}, expected {mine}")
        return join_frames([frames[k] for k in mine])

    def _parse_grads(self, buf, peer: int, step: int, owners, copies: int) -> list[ParsedFrame]:
        return parse_bundle(buf, peer=peer, step=step, kind="grad", shapes=self.shapes,
                            allowed_keys=self.keys_of_ranks(owners), max_per_key=copies, rank=self.rank)

    def _decode_weights(self, buf, peer: int, step: int, owners, out: dict[int, torch.Tensor],
                        dest: Mapping[int, torch.Tensor] | None) -> None:
        keys = self.keys_of_ranks(owners)
        for pf in parse_bundle(buf, peer=peer, step=step, kind="weight", shapes=self.shapes,
                               allowed_keys=keys, required_keys=keys, rank=self.rank):
            try:
                out[pf.frame.key] = decode_weight(pf.frame, self.device, dest, self.held)
            except FrameError as e:
                raise FrameError(f"rank {self.rank}: weight frame for key {pf.frame.key} from peer {peer} "
                                 f"at step {step}: {e}") from e

    def _reduce_scatter(self, step: int, grads):  # pragma: no cover - abstract
        raise ConfigError("use RingTransport or TreeTransport")

    def _all_gather(self, step: int, owner: Owner, dest):  # pragma: no cover - abstract
        raise ConfigError("use RingTransport or TreeTransport")


class RingTransport(_ShardedTransport):
    """Ring-ordered reduce-scatter of gradient payloads and ring all-gather of weight bundles
    (p − 1 rounds each; byte formulas in the module docstring, :func:`ring_expected_bytes`)."""

    def expected_bytes(self, grad_nbytes: Mapping[int, int], weight_nbytes: Mapping[int, int],
                       rank: int | None = None) -> dict[str, int]:
        return ring_expected_bytes(self.rank if rank is None else rank, self.world_size, self.shapes,
                                   grad_nbytes, weight_nbytes)

    def _reduce_scatter(self, step, grads):
        """Round s sends rank (r + s) % p its keys' frames. The bundle of round s + 1 is joined on a
        helper thread while round s is on the wire: with :class:`LazyFrames` that is where those
        keys are encoded (the only thread reading ``grads`` meanwhile)."""
        p, r = self.world_size, self.rank
        mine = self.keys_of[r]

        def bundle_for(q: int) -> bytes:
            return join_frames([grads[k] for k in self.keys_of[q] if grads.get(k)])

        own = bundle_for(r)
        nxt = self._encoder.submit(bundle_for, (r + 1) % p) if p > 1 else None
        try:
            for pf in self._parse_grads(own, r, step, [r], 1):
                yield r, pf
            bound = bundle_bound(self.shapes, mine)
            for s in range(1, p):
                dst, src = (r + s) % p, (r - s) % p
                bundle = nxt.result()
                nxt = self._encoder.submit(bundle_for, (r + s + 1) % p) if s + 1 < p else None
                got = self.p2p.exchange(step, {dst: bundle}, [src], direction="up", max_recv=bound,
                                        send_bound=bundle_bound(self.shapes, self.keys_of[dst]), reuse=s)
                for pf in self._parse_grads(got[src], src, step, [r], 1):
                    yield src, pf
        finally:
            if nxt is not None:  # a round failed: let the encode in flight finish before leaving
                nxt.exception()

    def _all_gather(self, step, owner, dest):
        p, r = self.world_size, self.rank
        cur = self._own_weight_bundle(step, owner)
        out: dict[int, torch.Tensor] = {}
        dst, src = (r + 1) % p, (r - 1) % p
        with self._overlapped() as overlap:
            overlap.submit(self._decode_weights, cur, r, step, [r], out, dest)
            for t in range(p - 1):
                origin = (r - 1 - t) % p  # whose weights arrive; this rank forwards (r - t) % p's
                got = self.p2p.exchange(step, {dst: cur}, [src], direction="down",
                                        max_recv=bundle_bound(self.shapes, self.keys_of[origin]),
                                        send_bound=bundle_bound(self.shapes, self.keys_of[(r - t) % p]), reuse=t)
                cur = got[src]
                overlap.submit(self._decode_weights, cur, src, step, [origin], out, dest)
        return out


class TreeTransport(_ShardedTransport):
    """Recursive halving of gradient payloads (frames forwarded unmodified) and recursive doubling
    all-gather of weight bundles: log2(p) rounds each; p must be a power of two (ConfigError).
    Byte formulas in the module docstring, :func:`tree_expected_bytes`."""

    def __init__(self, shapes: Mapping[int, tuple], group=None, **kw) -> None:
        g = group if group is not None else dist.group.WORLD
        self.levels = _log2_exact(dist.get_world_size(g))
        super().__init__(shapes, group, **kw)

    def expected_bytes(self, grad_nbytes: Mapping[int, int], weight_nbytes: Mapping[int, int],
                       rank: int | None = None) -> dict[str, int]:
        return tree_expected_bytes(self.rank if rank is None else rank, self.world_size, self.shapes,
                                   grad_nbytes, weight_nbytes)

    def _reduce_scatter(self, step, grads):
        p, r = self.world_size, self.rank
        own = join_frames([grads[k] for k in sorted(grads) if grads.get(k)])
        held = [(r, pf) for pf in self._parse_grads(own, r, step, range(p), 1)]
        for j in range(self.levels):
            bit = 1 << j
            partner = r ^ bit
            send = [(src, pf) for src, pf in held if self.owner_of[pf.frame.key] & bit != r & bit]
            held = [(src, pf) for src, pf in held if self.owner_of[pf.frame.key] & bit == r & bit]
            m = _low_mask(j) | bit
            mine = [q for q in range(p) if q & m == r & m]
            theirs = [q for q in range(p) if q & m == partner & m]
            got = self.p2p.exchange(step, {partner: join_frames([pf.raw for _, pf in send])}, [partner], direction="up",
                                    max_recv=bundle_bound(self.shapes, self.keys_of_ranks(mine), copies=bit),
                                    send_bound=bundle_bound(self.shapes, self.keys_of_ranks(theirs), copies=bit),
                                    reuse=j)
            held += [(partner, pf) for pf in self._parse_grads(got[partner], partner, step, mine, bit)]
        return held

    def _all_gather(self, step, owner, dest):
        p, r = self.world_size, self.rank
        held = [self._own_weight_bundle(step, owner)]
        out: dict[int, torch.Tensor] = {}
        with self._overlapped() as overlap:
            overlap.submit(self._decode_weights, held[0], r, step, [r], out, dest)
            for j in range(self.levels):
                partner = r ^ (1 << j)
                theirs = [q for q in range(p) if q >> j == partner >> j]
                ours = [q for q in range(p) if q >> j == r >> j]
                got = self.p2p.exchange(step, {partner: join_frames(held)}, [partner], direction="down",
                                        max_recv=bundle_bound(self.shapes, self.keys_of_ranks(theirs)),
                                        send_bound=bundle_bound(self.shapes, self.keys_of_ranks(ours)), reuse=j)
                overlap.submit(self._decode_weights, got[partner], partner, step, theirs, out, dest)
                held.append(got[partner])
        return out
