"""One logical message between two ranks of a process group, and the chunk messages built on it.

A message carries one bundle (frames back to back, :mod:`lowbit.codec.bundle`; it may be empty)::

    int64 length L (8 bytes), then uint8[L] bundle bytes

either as one send into a receive buffer of a known bound (gloo) or as two sends, length then
bytes (NCCL; see the comment above :meth:`Messages.send_chunk`). Either way it costs, on the wire
and in :class:`~lowbit.comm.transport.ByteCounter` on both ends, exactly
:func:`message_bytes` = ``LEN_PREFIX + len(bundle)``. Tensors live on the process group's device:
CPU for gloo, the current CUDA device for NCCL. What a peer announces is checked
(:func:`lowbit.codec.bundle.check_announced`) before anything is allocated for it.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterable, Mapping

import torch
import torch.distributed as dist

from lowbit.codec.bundle import check_announced
from lowbit.comm.transport import ByteCounter
from lowbit.errors import FrameError, TransportError

LEN_PREFIX = 8  # bytes of the int64 length sent before every bundle


def message_bytes(bundle_len: int) -> int:
    """Wire bytes of one bundle message: the 8-byte length prefix plus the bundle."""
    return LEN_PREFIX + int(bundle_len)


def group_device(group=None) -> torch.device:
    """Where point-to-point tensors must live for ``group``'s backend."""
    backend = dist.get_backend(group)
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def as_uint8(bundle, device: torch.device) -> torch.Tensor:
    if isinstance(bundle, torch.Tensor):
        return bundle.to(device)
    if not len(memoryview(bundle)):
        return torch.empty(0, dtype=torch.uint8, device=device)
    with warnings.catch_warnings():  # bytes are read-only; the send only reads them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(bundle, dtype=torch.uint8)
    return t if device.type == "cpu" else t.to(device)


def _nbytes(part) -> int:
    return part.numel() if isinstance(part, torch.Tensor) else len(memoryview(part).cast("B"))


def _lay_out(dst: torch.Tensor, parts: list) -> None:
    """``parts`` (bytes-likes or uint8 tensors, their lengths summing to ``dst.numel()``) copied one
    after another into ``dst``: one copy from the frames into the message, instead of joining them
    into a new bytes object and copying that (two copies, and page faults on the fresh memory)."""
    mv = memoryview(dst.numpy()) if dst.device.type == "cpu" else None
    off = 0
    for b in parts:
        if mv is not None and not isinstance(b, torch.Tensor):
            b = memoryview(b).cast("B")
            n = len(b)
            mv[off:off + n] = b
        else:
            n = _nbytes(b)
            if n:
                dst[off:off + n].copy_(as_uint8(b, dst.device))
        off += n


def to_memoryview(t: torch.Tensor) -> memoryview:
    """A received buffer as a read-only memoryview, so frames parsed from it view their payload
    without a copy (:meth:`Frame.from_bytes` copies writable ones). A buffer is reused only where
    the caller asked for it (chunk receives, ``exchange(reuse=...)``), and then from the next step
    on (:meth:`Messages._pooled`)."""
    return memoryview(t.detach().cpu().numpy()).cast("B").toreadonly()


@dataclass
class Pending:
    """Sends posted but not yet waited for (see :meth:`Messages.finish`); ``keep`` holds their buffers."""

    direction: str
    works: list = field(default_factory=list)
    what: list = field(default_factory=list)
    sent_lens: list = field(default_factory=list)
    keep: list = field(default_factory=list)

    def add(self, works, what, nbytes: int, keep=None) -> None:
        self.works += list(works)
        self.what += list(what)[:len(works)]
        self.sent_lens.append(nbytes)
        self.keep.append(keep)


@dataclass
class Messages:
    """Chunk messages within ``group`` (group ranks, translated to global ranks for the calls):
    posted, awaited with a timeout (a peer that does not answer is a :class:`TransportError` naming
    the peer, the step and what was awaited, never a hang), received into pooled buffers and
    counted into ``counter``.

    ``down_group``: optional second process group over the same ranks, in the same order, that
    carries every ``"down"`` message (the rounds of :class:`~lowbit.comm.p2p.P2P` too, but for its
    tolerant exchange, which keeps ``group``). gloo moves a message only after the
    receiver has announced its receive to the sender, and that announcement travels on the same
    connection as the receiver's own outgoing data: a worker's "ready for weight chunk i" queued
    behind the megabytes of gradients it is still sending, so no weight left a server before every
    gradient had arrived. Its own connections let the weights flow down while the gradients still
    go up."""

    group: object = None
    counter: ByteCounter | None = None
    timeout: float = 300.0
    down_group: object = None
    recv_pool: dict = field(default_factory=dict, repr=False)  # (direction, peer, chunk or round) -> buffer
    send_pool: dict = field(default_factory=dict, repr=False)  # (direction, peer, reuse) -> one-message buffer
    one_message: bool | None = None  # chunk messages as one send (gloo); None = by backend

    def __post_init__(self) -> None:
        if self.group is None:
            self.group = dist.group.WORLD
        if self.counter is None:
            self.counter = ByteCounter()
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.device = group_device(self.group)
        if self.one_message is None:  # gloo receives a shorter message into a larger buffer; NCCL does not
            self.one_message = self.device.type == "cpu"

    def open_down_channel(self) -> None:
        """Give ``"down"`` messages connections of their own: :attr:`down_group` becomes a new
        process group over this group's ranks (same order, same backend). Collective: every rank
        of the group must call it."""
        backend = dist.get_backend(self.group)
        if self.group is dist.group.WORLD:
            self.down_group = dist.new_group(backend=backend)
        else:
            self.down_group = dist.new_group(ranks=dist.get_process_group_ranks(self.group), backend=backend,
                                             use_local_synchronization=True)

    def _global(self, r: int) -> int:
        if self.group is dist.group.WORLD or self.group is None:
            return r
        return dist.get_global_rank(self.group, r)

    def _wait(self, works, what: list[tuple[str, int]], step: int) -> None:
        td = timedelta(seconds=self.timeout)
        t0 = time.monotonic()
        for w, (verb, peer) in zip(works, what):
            try:
                ok = w.wait(timeout=td)
            except Exception as e:  # gloo raises RuntimeError on timeout or a closed connection
                waited = time.monotonic() - t0
                how = "timed out" if waited >= self.timeout * 0.99 else "failed"
                raise TransportError(f"rank {self.rank}: {verb} peer {peer} at step {step} {how} after "
                                     f"{waited:.1f}s: {str(e).splitlines()[0][:300]}") from e
            if ok is False:
                raise TransportError(f"rank {self.rank}: {verb} peer {peer} at step {step} did not complete "
                                     f"within {self.timeout:g}s")

    def _post(self, ops: list[dist.P2POp]):
        if not ops:
            return []
        return dist.batch_isend_irecv(ops)

    # Chunk messages: chunk i of a bundle is one logical message of LEN_PREFIX + L bytes, in one of
    # two protocols (both ends must use the same: ``one_message``):
    #  - one message (gloo, the default on CPU): the int64 length and the bytes in one send (tag 2i),
    #    received into a buffer of LEN_PREFIX + bound bytes posted at the start of the step (gloo
    #    takes a shorter message into a larger buffer; only the bytes that come are touched). A
    #    chunk then costs one receive announcement instead of two, and no round trip separates its
    #    length from its bytes. gloo aborts the receiving *process* when a message exceeds its
    #    buffer, so ``send_chunk(bound=...)`` refuses such a bundle on the sender; a peer that goes
    #    around it and announces more than the bound is a FrameError at the receiver.
    #  - length, then bytes (NCCL, whose receives must match the send's size; the PS's
    #    ``"continue"`` mode): an int64 (tag 2i), then the bytes (tag 2i + 1; none when empty),
    #    whose receive is posted once the length is in and checked. With one chunk this is exactly
    #    the protocol of :meth:`P2P.exchange`.
    # The sender can post chunk i as soon as it exists (the parameter server sends a key group's new
    # weights while later groups are still being averaged).

    def send_chunk(self, peer, chunk: int, bundle, direction: str, pending: "Pending",
                   bound: int | None = None, reuse: object = None) -> None:
        """Post chunk ``chunk`` of a bundle to ``peer``; it completes in :meth:`finish` of ``pending``.
        ``bundle``: bytes-like or a uint8 tensor, or a list of them (the frames of the bundle, laid
        out back to back straight into the message: no joined copy first). ``peer``: a rank, or a
        list of ranks that all get the same bundle (the message is laid out once and sent to each).
        ``bound``: the most bytes the receiver accepts for this chunk (its :func:`bundle_bound`); a
        longer bundle is a :class:`FrameError` here, before anything is sent. ``reuse``: a name for
        this message within a step (one per peer and direction); in one-message mode it is laid out
        in the buffer of the same name from the previous step (see :meth:`_message`)."""
        peers = [peer] if isinstance(peer, int) else list(peer)
        self._check_round(direction, {p: None for p in peers}, [])
        parts = bundle if isinstance(bundle, list) else [bundle]
        nbytes = sum(_nbytes(b) for b in parts)
        for p in peers:
            self._check_send(p, nbytes, bound, what=f"chunk {chunk}")
        if self.one_message:  # length and bytes in one message: no round trip between them
            key = None if reuse is None else (direction, peers[0] if len(peers) == 1 else tuple(peers), reuse)
            msg = self._message(key, nbytes, bound)
            msg[:LEN_PREFIX].view(torch.int64)[0] = nbytes
            _lay_out(msg[LEN_PREFIX:], parts)
            works = self._post_raw([("send", p, msg, 2 * chunk) for p in peers], direction)
            for p, w in zip(peers, works):
                pending.add([w], [(f"sending chunk {chunk} to", p)], nbytes, keep=msg)
            return
        if isinstance(bundle, list):
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            _lay_out(buf, parts)
        else:
            buf = as_uint8(bundle, self.device)
        n = torch.tensor([buf.numel()], dtype=torch.int64, device=self.device)
        for p in peers:
            ops = [("send", p, n, 2 * chunk)] + ([("send", p, buf, 2 * chunk + 1)] if buf.numel() else [])
            works = self._post_raw(ops, direction)
            pending.add(works, [(f"sending the length of chunk {chunk} to", p), (f"sending chunk {chunk} to", p)],
                        buf.numel(), keep=(n, buf))

    def post_chunks(self, peer: int, bounds: list[int], direction: str,
                    chunks: Iterable[int] | None = None) -> list[tuple[object, torch.Tensor]]:
        """One-message mode: post, all at once, the receives of ``peer``'s chunks ``chunks`` (default
        all, 0..C-1 for C = ``len(bounds)``), chunk i into a (pooled) buffer of ``LEN_PREFIX +
        bounds[i]`` bytes; each (work, buffer) goes to :meth:`wait_chunk`. Only the bytes that
        arrive are touched (and kept resident)."""
        self._check_round(direction, {}, [peer])
        idx = range(len(bounds)) if chunks is None else [int(i) for i in chunks]
        bufs = [self._pooled((direction, peer, i), LEN_PREFIX + int(bounds[i])) for i in idx]
        works = self._post_raw([("recv", peer, t, 2 * i) for i, t in zip(idx, bufs)], direction)
        return list(zip(works, bufs))

    def wait_chunk(self, peer: int, chunk: int, step: int, posted: tuple[object, torch.Tensor],
                   of: int = 1) -> memoryview:
        """One-message mode: the bytes of chunk ``chunk`` posted by :meth:`post_chunks` (not counted:
        see :meth:`count_recv`); valid until the same chunk of the next step is received."""
        work, buf = posted
        self._wait([work], [(f"awaiting chunk {chunk} from", peer)], step)
        n = int(buf[:LEN_PREFIX].view(torch.int64)[0])
        self._check_len(peer, n, step, buf.numel() - LEN_PREFIX, chunk=chunk if of > 1 else None)
        return to_memoryview(buf[LEN_PREFIX:LEN_PREFIX + n]) if n else memoryview(b"")

    def post_chunk_lengths(self, peer: int, chunks: Iterable[int], direction: str) -> list[tuple[object, torch.Tensor]]:
        """Post, all at once, the receives of the lengths of ``peer``'s chunks ``chunks``: each
        (work, int64 tensor) goes to :meth:`post_chunk_body` in turn. gloo moves a message only
        once its receive is posted, so a length posted early never holds the sender up."""
        self._check_round(direction, {}, [peer])
        lens = [(int(i), torch.empty(1, dtype=torch.int64, device=self.device)) for i in chunks]
        works = self._post_raw([("recv", peer, t, 2 * i) for i, t in lens], direction)
        return [(w, t) for w, (_, t) in zip(works, lens)]

    def post_chunk_body(self, peer: int, chunk: int, step: int, direction: str, length: tuple[object, torch.Tensor],
                        max_recv: int | None = None, of: int = 1) -> tuple[object, torch.Tensor]:
        """Wait for chunk ``chunk``'s ``length`` (from :meth:`post_chunk_lengths`), check it against
        ``max_recv`` before anything is allocated, and post the receive of its bytes without
        waiting: (work or None when empty, buffer), for :meth:`wait_chunk_body`."""
        work, n_t = length
        self._wait([work], [(f"awaiting the length of chunk {chunk} from", peer)], step)
        n = int(n_t.item())
        self._check_len(peer, n, step, max_recv, chunk=chunk if of > 1 else None)
        buf = self._pooled((direction, peer, chunk), n)
        return (self._post_raw([("recv", peer, buf, 2 * chunk + 1)], direction)[0] if n else None), buf

    def wait_chunk_body(self, peer: int, chunk: int, step: int, posted: tuple[object, torch.Tensor]) -> memoryview:
        """The bytes of a chunk whose receive :meth:`post_chunk_body` posted (not counted: see
        :meth:`count_recv`); valid until the same chunk of the next step is received."""
        work, buf = posted
        if work is not None:
            self._wait([work], [(f"awaiting chunk {chunk} from", peer)], step)
        return to_memoryview(buf) if buf.numel() else memoryview(b"")

    def count_recv(self, direction: str, nbytes: int) -> None:
        """Count one received chunk message of ``nbytes`` bundle bytes (chunk receives are counted by
        the caller, which may receive on helper threads)."""
        self._count(direction, [], [nbytes])

    def finish(self, pending: "Pending", step: int) -> None:
        """Wait for the sends in ``pending`` (a peer that fails is a :class:`TransportError`) and count them."""
        try:
            self._wait(pending.works, pending.what, step)
        except BaseException:  # a send may still be in flight from a pooled buffer
            self.send_pool = {}
            raise
        self._count(pending.direction, pending.sent_lens, [])
        pending.works, pending.what, pending.sent_lens, pending.keep = [], [], [], []

    def _pooled(self, key: tuple, n: int) -> torch.Tensor:
        """The receive buffer of chunk or round ``key`` for ``n`` bytes: last step's when it is large
        enough. A step moves the same chunks every time, and receiving into fresh memory costs a page
        fault per 4 KiB inside ``recv``. The bytes a chunk receive returns are therefore valid until the same chunk of the next step
        arrives: the transports decode (or forward) every received bundle within its step."""
        buf = self.recv_pool.get(key)
        if buf is None or buf.numel() < n:
            buf = self.recv_pool[key] = torch.empty(n, dtype=torch.uint8, device=self.device)
        return buf[:n]

    def _message(self, key: tuple | None, nbytes: int, bound: int | None) -> torch.Tensor:
        """A buffer for the one-message form of an ``nbytes`` bundle (LEN_PREFIX + nbytes), the
        pooled one of ``key`` when it is large enough (allocated at the bound, so it is not
        reallocated when the next step's bundle is a little longer), else fresh (``key`` None).
        Laying a message out in fresh memory page-faults once per 4 KiB, which costs more than the
        copy itself. A pooled buffer is
        written again only by the same message of a later step, after :meth:`finish` has waited
        for this one; a step that fails drops the pools (:meth:`drop_recv_pool`, and :meth:`finish`
        itself when a send failed)."""
        n = LEN_PREFIX + nbytes
        if key is None:
            return torch.empty(n, dtype=torch.uint8, device=self.device)
        buf = self.send_pool.get(key)
        if buf is None or buf.numel() < n:
            buf = self.send_pool[key] = torch.empty(LEN_PREFIX + max(nbytes, bound or 0), dtype=torch.uint8,
                                                    device=self.device)
        return buf[:n]

    def drop_recv_pool(self) -> None:
        """Forget the pooled receive and send buffers (a step given up with receives or sends still
        posted in them)."""
        self.recv_pool = {}
        self.send_pool = {}

    def _check_round(self, direction: str, sends: Mapping[int, object], recv_from: Iterable[int]) -> list[int]:
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        recv_from = list(recv_from)
        for p in list(sends) + recv_from:
            if not 0 <= p < self.world_size or p == self.rank:
                raise TransportError(f"rank {self.rank}: invalid peer {p} (world size {self.world_size})")
        return recv_from

    def _check_send(self, peer: int, bundle, bound, what: str) -> int:
        """The length of ``bundle`` (or ``bundle`` itself, a byte count) for ``peer``; a
        :class:`FrameError` when it is over ``bound`` (per peer or for all; None: unbounded)."""
        nbytes = bundle if isinstance(bundle, int) else _nbytes(bundle)
        b = bound.get(peer) if isinstance(bound, Mapping) else bound
        if b is not None and nbytes > b:
            raise FrameError(f"rank {self.rank}: {what} for peer {peer} has {nbytes} bytes; "
                             f"at most {b} bytes are possible for the frames it may carry")
        return nbytes

    def _check_len(self, peer: int, n: int, step: int, max_recv, chunk: int | None = None) -> None:
        bound = max_recv.get(peer) if isinstance(max_recv, Mapping) else max_recv
        check_announced(n, bound, peer=peer, step=step, rank=self.rank, chunk=chunk)

    def _count(self, direction: str, sent_lens: list[int], recv_lens: list[int]) -> None:
        """Count completed messages (one per bundle, :func:`message_bytes` each)."""
        c = self.counter
        sent = sum(message_bytes(n) for n in sent_lens)
        got = sum(message_bytes(n) for n in recv_lens)
        if direction == "up":
            c.up_sent += sent
            c.up_recv += got
        else:
            c.down_sent += sent
            c.down_recv += got
        c.messages += len(sent_lens)

    def _channel(self, direction: str | None):
        """The process group a message of ``direction`` travels on (see ``down_group``)."""
        return self.down_group if direction == "down" and self.down_group is not None else self.group

    def _post_raw(self, ops: list[tuple[str, int, torch.Tensor, int]], direction: str | None = None) -> list:
        """Post ``(verb, peer, tensor, tag)`` operations batched; the works, in order."""
        g = self._channel(direction)
        return self._post([dist.P2POp(dist.isend if v == "send" else dist.irecv, t, self._global(p), g,
                                      tag=tag) for v, p, t, tag in ops])

    def _post_all(self, ops: list[tuple[str, int, torch.Tensor, int]], step: int,
                  direction: str | None = None) -> None:
        """Post ``(verb, peer, tensor, tag)`` operations batched and wait for each (first failure raises)."""
        works = self._post_raw(ops, direction)
        what = [((f"sending the {'length' if tag == 0 else 'bundle'} to" if v == "send" else
                  f"awaiting the {'length' if tag == 0 else 'bundle'} from"), p) for v, p, _, tag in ops]
        self._wait(works, what, step)
