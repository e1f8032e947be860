"""The contract every transport meets, and byte accounting.

One training step, seen by a transport::

    worker:  grad frames (bytes, one per parameter key)  ==up==>  owner of each key
    owner:   decode, sum in fp32, divide by the number of contributions  ->  Owner.apply(...)
    owner:   Owner.weight_frames(step) (bytes)            ==down==> every worker
    worker:  decode weight frames -> dequantized tensors

Frames are self-describing (:mod:`lowbit.codec.frame`), so a receiving rank needs no codec
configuration: it validates and decodes what arrives. Nothing is summed in quantized form in
flight; owners decode and sum in fp32.

Roles: in the parameter-server transport, ranks [0, S) are owners (servers) and [S, S+W) are
workers. In the ring and tree transports every rank is both: it owns a shard of the keys and
computes gradients for all keys.
"""
from __future__ import annotations

import heapq
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Protocol

import torch

from lowbit.codec.decode import decode_frame, decode_sum
from lowbit.codec.delta import DeltaDecoder
from lowbit.codec.frame import Frame
from lowbit.errors import ConfigError, FrameError


class Owner(Protocol):
    """What a transport calls on the rank that owns a shard of the full-precision weights."""

    def owned_keys(self) -> Iterable[int]:
        """The parameter keys this owner holds."""

    def apply(self, step: int, grads: dict[int, torch.Tensor], counts: dict[int, int]) -> None:
        """Average fp32 gradients (already divided by ``counts[key]`` contributions) for step ``step``:
        take the optimizer step and re-quantize the weights."""

    def weight_frames(self, step: int) -> dict[int, bytes]:
        """The current (quantized) weights of every owned key as encoded frames.

    An owner may also offer the step in parts, which lets the parameter server pipeline it
    (update and send a group of keys while later groups are still arriving)::

        apply_keys(step, grads, counts, keys, last)   # optimizer step + re-quantization of ``keys``;
                                                      # ``last``: the step's final part (lr schedule advances)
        weight_frames(step, keys)                     # frames of ``keys`` only

    :class:`lowbit.train.server.ShardServer` does; an owner without ``apply_keys`` gets one
    :meth:`apply` per step, after every group has arrived."""


@dataclass
class ByteCounter:
    """Bytes this rank put on / took off the wire, split by direction of the training step."""

    up_sent: int = 0      # gradient payloads sent (worker -> owner)
    up_recv: int = 0      # gradient payloads received (owner side)
    down_sent: int = 0    # weight payloads sent (owner -> workers, and forwarding in ring/tree)
    down_recv: int = 0    # weight payloads received
    messages: int = 0     # point-to-point messages sent

    @property
    def sent(self) -> int:
        return self.up_sent + self.down_sent

    @property
    def recv(self) -> int:
        return self.up_recv + self.down_recv

    def snapshot(self) -> dict[str, int]:
        return {"up_sent": self.up_sent, "up_recv": self.up_recv, "down_sent": self.down_sent,
                "down_recv": self.down_recv, "messages": self.messages, "sent": self.sent, "recv": self.recv}

    def delta(self, before: dict[str, int]) -> dict[str, int]:
        now = self.snapshot()
        return {k: now[k] - before.get(k, 0) for k in now}


class StepTimeline:
    """When each piece of a step happened on this rank, for the last ``keep`` steps: where a
    pipelined step loses time against its wire-time ideal (a late first chunk, a slow flow, the
    tail after the last gradients are in) is read off these, not guessed.

    A step is ``{"step", "t0", "events"}``: ``t0`` is ``time.perf_counter()`` when the step began
    (CLOCK_MONOTONIC on Linux, so the ranks of one host line up), and each event is
    ``(seconds since t0, what, peer, group)``. The parameter server records ``grads_posted``
    (worker, per server and key group), ``grads_in`` (server, as each worker's chunk arrives),
    ``group_averaged`` and ``weights_posted`` (server, per group), ``weights_in`` and
    ``weights_decoded`` (worker, per server and group) and ``end``. Off (``keep=0``) a mark is a
    call of a no-op; on, one clock read and a list append (safe from the receive threads)."""

    def __init__(self, keep: int = 8) -> None:
        if not isinstance(keep, int) or keep < 0:
            raise ConfigError(f"StepTimeline keep must be an int >= 0, got {keep!r}")
        self.keep = keep
        self.steps: deque = deque(maxlen=max(keep, 1))
        self._lock = threading.Lock()
        # mark(what, peer=None, group=None): record an event of the step begun last (a no-op when off)
        self.mark: Callable[..., None] = _no_mark

    def begin(self, step: int) -> None:
        """Start recording ``step`` (the oldest kept step is dropped beyond ``keep``); from now on
        :attr:`mark` records into it."""
        if not self.keep:
            return
        t0, events, lock = time.perf_counter(), [], self._lock
        self.steps.append({"step": int(step), "t0": t0, "events": events})

        def mark(what: str, peer: int | None = None, group: int | None = None) -> None:
            t = time.perf_counter() - t0
            with lock:
                events.append((t, what, peer, group))
        self.mark = mark

    def marker(self) -> Callable[..., None]:
        """:attr:`mark`, bound to the step being recorded now: a receive thread that outlives its
        step (a step given up with receives still posted) marks that step, not the next one."""
        return self.mark

    def last(self) -> dict | None:
        """The most recent step (its events sorted by time), or None before the first."""
        if not self.keep or not self.steps:
            return None
        st = self.steps[-1]
        with self._lock:
            return {"step": st["step"], "t0": st["t0"], "events": sorted(st["events"], key=lambda e: e[0])}


def _no_mark(what: str, peer: int | None = None, group: int | None = None) -> None:
    pass


@dataclass
class GradAccumulator:
    """fp32 sums of decoded gradient frames per key, and how many contributions each got.

    The first frame of a key is decoded into a buffer, later ones are added to it chunk by chunk
    (:func:`~lowbit.codec.decode.decode_frame` with ``accumulate=True``: no full-size temporary).
    :meth:`add_all` takes every sender's frame of a key at once and decodes, sums and averages them
    in one pass over the buffer (:func:`~lowbit.codec.decode.decode_sum`), the same bits.
    :meth:`reset` starts the next step and keeps the buffers: a transport holds one accumulator
    for the whole run, so the shard's gradient memory is allocated (and page-faulted) once, not
    every step. The tensors :meth:`averages` returns are those buffers: valid until the next
    :meth:`reset`."""

    device: torch.device | str = "cpu"
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    spare: dict[int, torch.Tensor] = field(default_factory=dict)
    averaged: set = field(default_factory=set)  # keys whose sum add_all already divided

    def reset(self) -> None:
        self.spare.update(self.sums)
        self.sums, self.counts, self.averaged = {}, {}, set()

    def add_all(self, frames: list[Frame], *, average: bool = False) -> None:
        """Frames of one key (one per sender, in a fixed sender order) decoded and summed into the
        key's buffer in one pass; with ``average`` also divided by the key's number of
        contributions, which are then complete (:meth:`averages` leaves the key as it is). A frame
        whose codes leave its grid raises FrameError with ``index``, its position in ``frames``."""
        k = frames[0].key
        if k in self.averaged:
            raise FrameError(f"gradient for key {k} arrived after its average was taken")
        buf = self.sums.get(k)
        if buf is not None and buf.shape != tuple(frames[0].shape):
            raise FrameError(f"gradient for key {k} has shape {tuple(frames[0].shape)}, "
                             f"earlier contributions had {tuple(buf.shape)}")
        have = buf is not None
        if not have:
            buf = self.spare.pop(k, None)
            if buf is None or buf.shape != tuple(frames[0].shape):
                buf = torch.empty(frames[0].shape, dtype=torch.float32, device=self.device)
        count = self.counts.get(k, 0) + len(frames)
        decode_sum(frames, buf, divisor=count if average else 1, accumulate=have)
        self.sums[k], self.counts[k] = buf, count
        if average:
            self.averaged.add(k)

    def add(self, frame: Frame) -> None:
        """One sender's frame of a key: decoded into the key's buffer, or added to it."""
        self.add_all([frame])

    def averages(self, keys: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """The mean per key (of ``keys``, default all), computed in place (the sums are not used
        afterwards: one pass less over the shard's gradients than allocating a new tensor)."""
        keys = self.sums if keys is None else [k for k in keys if k in self.sums]
        out = {k: self.sums[k].div_(self.counts[k]) if self.counts[k] > 1 and k not in self.averaged
               else self.sums[k] for k in keys}
        self.averaged.update(out)
        return out


def decode_weight(frame: Frame, device: torch.device | str, out: Mapping[int, torch.Tensor] | None,
                  held: DeltaDecoder | None = None) -> torch.Tensor:
    """A weight frame decoded into ``out[frame.key]`` when given (in place; a non-contiguous
    destination gets a copy), else into a new tensor on ``device``. ``held``: the codes this
    receiver keeps, which a delta frame applies to (:mod:`lowbit.codec.delta`)."""
    if held is not None:
        frame = held.apply(frame)
    elif frame.kind == "wdelta":
        raise FrameError(f"a delta frame for key {frame.key}, but this receiver keeps no codes to apply it to")
    dst = None if out is None else out.get(frame.key)
    if dst is None:
        return decode_frame(frame, device)
    if dst.numel() != math.prod(frame.shape):
        raise ConfigError(f"out[{frame.key}] has {dst.numel()} elements, the weight frame has shape "
                          f"{tuple(frame.shape)}")
    if dst.is_contiguous():
        decode_frame(frame, out=dst.view(-1))
    else:
        dst.copy_(decode_frame(frame, dst.device).reshape(dst.shape))
    return dst


def check_owner(owner: Owner | None, keys: list[int], who: str) -> None:
    """The Owner that the rank ``who``, owner of ``keys``, passed to ``step()``: there, and holding
    exactly those keys (else a :class:`ConfigError`)."""
    if owner is None:
        raise ConfigError(f"{who} owns a shard: pass its Owner to step()")
    have = sorted(int(k) for k in owner.owned_keys())
    if have != keys:
        raise ConfigError(f"{who} must own keys {keys} (partition by size), its Owner holds {have}")


def partition(sizes: Mapping[int, int | tuple], n_owners: int) -> dict[int, int]:
    """key -> owner index in 0..n_owners-1, so shards balance by size: largest first onto the least
    loaded owner (LPT). ``sizes``: key -> element count, or key -> shape. Deterministic (ties broken
    by key, then owner index) and computed from the shapes alone, so every rank agrees."""
    if n_owners < 1:
        raise ConfigError(f"need at least one owner, got {n_owners}")
    sizes = {int(k): v if isinstance(v, int) else math.prod(tuple(v)) for k, v in sizes.items()}
    heap = [(0, o) for o in range(n_owners)]
    out: dict[int, int] = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        load, o = heapq.heappop(heap)
        out[key] = o
        heapq.heappush(heap, (load + sizes[key], o))
    return out


class LazyFrames(Mapping):
    """key -> frame bytes, each made by ``encode(key)`` the first time the key is read, then kept.

    Pass it as ``grads`` to :meth:`Transport.step`: the parameter server reads the keys of one key
    group just before posting that group, so group i + 1 is encoded while group i is on the wire
    instead of every gradient being encoded before the first byte leaves. ``encode`` may return
    ``None`` for a key whose gradient a nonfinite policy skipped (the transports leave it out).
    ``encoded`` lists the keys in the order they were encoded."""

    def __init__(self, keys: Iterable[int], encode: Callable[[int], bytes | None]) -> None:
        self._keys = [int(k) for k in keys]
        self._known = set(self._keys)
        if len(self._known) != len(self._keys):
            raise ConfigError("LazyFrames: duplicate keys")
        self._encode = encode
        self._done: dict[int, bytes | None] = {}
        self.encoded: list[int] = []

    def __getitem__(self, key: int) -> bytes | None:
        if key not in self._done:
            if key not in self._known:
                raise KeyError(key)
            self._done[key] = self._encode(key)
            self.encoded.append(key)
        return self._done[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class Transport(ABC):
    """Moves gradient frames to owners and weight frames back, counting bytes."""

    rank: int
    world_size: int
    counter: ByteCounter

    @abstractmethod
    def step(self, step: int, grads: dict[int, bytes] | None, owner: Owner | None, *,
             out: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor] | None:
        """One synchronous exchange. Workers pass their gradient frames (key -> bytes, or a
        :class:`LazyFrames` that encodes them as the transport reads them); owners pass
        their :class:`Owner`. Returns the new dequantized weights (key -> tensor) on ranks that
        compute (workers), ``None`` on pure owners (servers).

        ``out`` (optional, key -> tensor with the key's element count): where to decode each key's
        weights, typically views of the model's own parameters, so the weights land in place with
        no full-size temporary and no copy; the returned dict then holds those tensors."""

    @abstractmethod
    def fetch_weights(self, step: int, owner: Owner | None, *,
                      out: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor] | None:
        """The down-link half alone: owners send their current weight frames, workers receive
        all of them (start of training, resume, a rejoining worker). ``out`` as in :meth:`step`."""

    @property
    def owners(self) -> list[int]:
        """Ranks that own keys (apply updates, send weights). Default: every rank."""
        return list(range(self.world_size))

    @property
    def live_workers(self) -> list[int]:
        """Ranks that compute gradients and are still taking part. Default: every rank, always
        (a transport that can lose workers overrides this)."""
        return list(range(self.world_size))

    def close(self) -> None:  # pragma: no cover - trivial default
        pass
