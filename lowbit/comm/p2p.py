"""Rounds of bundles between ranks with torch.distributed point-to-point ops.

A *bundle* is frames back to back (:func:`lowbit.codec.frame.join_frames`); it may be empty. One
bundle travels as one logical message (:mod:`lowbit.comm.messages`)::

    int64 length L (8 bytes), then uint8[L] bundle bytes

either as two point-to-point sends (the second skipped when L = 0: NCCL, unbounded rounds) or, on
gloo where the receiver knows a bound for L, as one send into a buffer of that bound (see the
comment above :meth:`~lowbit.comm.messages.Messages.send_chunk`). Either way the bytes a message
costs on the wire, and what :class:`~lowbit.comm.transport.ByteCounter` records for it on both
ends, are exactly::

    message_bytes(bundle) = LEN_PREFIX + len(bundle) = 8 + Σ frame sizes

(``ByteCounter.messages`` counts logical messages, one per bundle sent.)

:meth:`P2P.exchange` posts every send and receive of a round at once (``dist.batch_isend_irecv``),
so a rank talks to several peers concurrently, and waits on each with a timeout: a peer that does
not answer gives a :class:`TransportError` naming the peer, the step and what was awaited, never a
hang. What came is validated by :func:`lowbit.codec.bundle.parse_bundle` (every frame's header, CRC,
kind, step, key and shape); the announced length is bounded before anything is allocated.
See docs/transports.md for the full design.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Iterable, Mapping

import torch
import torch.distributed as dist

from lowbit.codec.bundle import parse_bundle
from lowbit.comm.messages import LEN_PREFIX, Messages, Pending, as_uint8, group_device, to_memoryview
from lowbit.errors import FrameError

# parse_bundle and group_device are imported from here by other transports
__all__ = ["P2P", "group_device", "parse_bundle"]


class P2P(Messages):
    """Point-to-point bundle exchange within ``group``: rounds in which every rank sends a bundle to
    some peers and receives one from others, all concurrently (:meth:`exchange`), or riding out
    peers that fail (:meth:`exchange_tolerant`); the chunk messages of :class:`Messages` besides."""

    def exchange(self, step: int, sends: Mapping[int, object], recv_from: Iterable[int], *,
                 direction: str, max_recv: Mapping[int, int] | int | None = None,
                 send_bound: Mapping[int, int] | int | None = None,
                 reuse: object = None) -> dict[int, memoryview]:
        """One round: send ``sends[peer]`` (a bundle) to each peer and receive one bundle from each
        peer in ``recv_from``, all concurrently. ``direction`` ('up' or 'down') picks the counters.
        ``max_recv`` bounds the length a peer may announce (per peer or for all); a larger one is a
        :class:`FrameError`. Returns peer -> received bundle (a read-only memoryview). Any peer
        that fails is a :class:`TransportError`. ``reuse``: a name for this round within a step
        (its index): the bundles are received into the buffers of the same round of the previous
        step (see :meth:`_pooled`), so they are valid until that round of the next step.

        A *bounded* round (``max_recv`` or ``send_bound`` given) needs both for the sides it has:
        ``max_recv`` for what it receives and ``send_bound`` (the receiver's ``max_recv`` for this
        rank) for what it sends, and in one-message mode it moves each bundle as one message (see
        the comment above :meth:`send_chunk`): one receive announcement and no round trip between
        length and bytes. A bundle over its ``send_bound`` is refused here, before anything is sent. Both ends of a
        round must agree on whether it is bounded; an unbounded round is length, then bytes (the
        PS worker's ``"continue"`` upload, which the server takes with :meth:`exchange_tolerant`)."""
        recv_from = self._check_round(direction, sends, recv_from)
        if max_recv is not None or send_bound is not None:
            if (recv_from and max_recv is None) or (sends and send_bound is None):
                raise ValueError("a bounded round needs max_recv for what it receives and send_bound "
                                 f"for what it sends (got max_recv={max_recv!r}, send_bound={send_bound!r})")
            for p, b in sends.items():
                self._check_send(p, b, send_bound, what="a bundle")
            if self.one_message:
                return self._exchange_one_message(step, sends, recv_from, direction, max_recv, reuse)
        dev = self.device
        # Round 1: lengths.
        send_lens = {p: torch.tensor([len(memoryview(b).cast("B")) if not isinstance(b, torch.Tensor)
                                      else b.numel()], dtype=torch.int64, device=dev)
                     for p, b in sends.items()}
        recv_lens = {p: torch.empty(1, dtype=torch.int64, device=dev) for p in recv_from}
        self._post_all([("send", p, t, 0) for p, t in send_lens.items()] +
                       [("recv", p, t, 0) for p, t in recv_lens.items()], step, direction)
        lens = {p: int(t.item()) for p, t in recv_lens.items()}
        for p, n in lens.items():
            self._check_len(p, n, step, max_recv)
        # Round 2: payloads (nothing is sent for an empty bundle).
        send_bufs = {p: as_uint8(b, dev) for p, b in sends.items() if int(send_lens[p].item()) > 0}
        recv_bufs = {p: (torch.empty(n, dtype=torch.uint8, device=dev) if reuse is None
                         else self._pooled((direction, p, "round", reuse), n)) for p, n in lens.items() if n > 0}
        try:
            self._post_all([("send", p, t, 1) for p, t in send_bufs.items()] +
                           [("recv", p, t, 1) for p, t in recv_bufs.items()], step, direction)
        except BaseException:
            if reuse is not None:  # a receive may still be posted into a pooled buffer
                self.drop_recv_pool()
            raise
        self._count(direction, [int(t.item()) for t in send_lens.values()], list(lens.values()))
        return {p: (to_memoryview(recv_bufs[p]) if p in recv_bufs else memoryview(b"")) for p in recv_from}

    def _exchange_one_message(self, step: int, sends: Mapping[int, object], recv_from: list[int],
                              direction: str, max_recv, reuse) -> dict[int, memoryview]:
        """A bounded round in one-message mode: every receive posted first, into a buffer of
        ``LEN_PREFIX + max_recv`` bytes (pooled when ``reuse`` names the round), then every bundle
        sent as chunk 0 (its length and bytes in one message), then each receive awaited and its
        announced length checked."""
        def bound(p):
            return max_recv.get(p) if isinstance(max_recv, Mapping) else max_recv

        bufs = {p: (self._pooled((direction, p, "round", reuse), LEN_PREFIX + bound(p)) if reuse is not None
                    else torch.empty(LEN_PREFIX + bound(p), dtype=torch.uint8, device=self.device))
                for p in recv_from}
        works = self._post_raw([("recv", p, t, 0) for p, t in bufs.items()], direction)
        pending = Pending(direction)
        try:
            for p, b in sends.items():
                self.send_chunk(p, 0, b, direction, pending, reuse=None if reuse is None else ("round", reuse))
            got = {p: self.wait_chunk(p, 0, step, (w, bufs[p])) for p, w in zip(bufs, works)}
            self.finish(pending, step)
        except BaseException:
            self.drop_recv_pool()  # a receive or a send may still be posted in a pooled buffer
            raise
        for p in recv_from:
            self.count_recv(direction, len(got[p]))
        return got

    def exchange_tolerant(self, step: int, sends: Mapping[int, object], recv_from: Iterable[int], *,
                          direction: str, max_recv: Mapping[int, int] | int | None = None
                          ) -> tuple[dict[int, memoryview], dict[int, str]]:
        """Like :meth:`exchange`, but a peer whose send or receive fails (its process died: the
        connection closed; or it did not answer within the timeout) is dropped from the round
        instead of failing it. Returns (peer -> bundle for the peers that answered, failed peer ->
        reason). Only messages that completed are counted.

        Each peer is served by its own daemon thread (length, then bundle): gloo's point-to-point
        works cannot be polled, and a silent peer must not hold up the others' bundles. The timeout
        is enforced here, on the threads, not by gloo: a gloo wait that times out closes *every*
        pair of the process group ("Application timeout caused pair closure"), which would take
        the live peers down with the silent one. A silent peer's thread is left blocked; the peer
        is never addressed again. A bundle that arrives but is too long is still a
        :class:`FrameError`: a live peer sending garbage is a bug, not a failure to ride out."""
        recv_from = self._check_round(direction, sends, recv_from)
        dev, forever = self.device, timedelta(days=365)

        def wait(work) -> None:
            work.wait(timeout=forever)

        def send_one(p):
            buf = as_uint8(sends[p], dev)
            wait(dist.isend(torch.tensor([buf.numel()], dtype=torch.int64, device=dev), self._global(p),
                            self.group, tag=0))
            if buf.numel():
                wait(dist.isend(buf, self._global(p), self.group, tag=1))
            return buf.numel()

        def recv_one(p):
            n_t = torch.empty(1, dtype=torch.int64, device=dev)
            wait(dist.irecv(n_t, self._global(p), self.group, tag=0))
            n = int(n_t.item())
            self._check_len(p, n, step, max_recv)
            buf = torch.empty(n, dtype=torch.uint8, device=dev)
            if n:
                wait(dist.irecv(buf, self._global(p), self.group, tag=1))
            return buf

        jobs = [("send", p) for p in sends] + [("recv", p) for p in recv_from]
        results: dict[tuple[str, int], tuple[bool, object]] = {}

        def run(verb, p):
            try:
                results[(verb, p)] = (True, (send_one if verb == "send" else recv_one)(p))
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                results[(verb, p)] = (False, e)

        threads = [(verb, p, threading.Thread(target=run, args=(verb, p), daemon=True,
                                               name=f"lowbit-p2p-{verb}-{p}")) for verb, p in jobs]
        for *_, th in threads:
            th.start()
        deadline = time.monotonic() + self.timeout
        failed: dict[int, str] = {}
        got: dict[int, torch.Tensor] = {}
        sent_lens: dict[int, int] = {}
        for verb, p, th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
            if th.is_alive():
                failed[p] = f"no answer within {self.timeout:g}s"
                continue
            ok, v = results[(verb, p)]
            if not ok:
                if isinstance(v, FrameError):
                    raise v
                failed[p] = (str(v).splitlines()[0][:200] if str(v) else type(v).__name__)
                continue
            (sent_lens if verb == "send" else got)[p] = v
        self._count(direction, list(sent_lens.values()), [t.numel() for t in got.values()])
        return {p: to_memoryview(t) for p, t in got.items() if p not in failed}, failed
