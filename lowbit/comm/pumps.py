"""Receives kept posted ahead of their chunk messages, on helper threads (:class:`Pumps`), so that
the receiver decodes one chunk while the rest arrive.
"""
from __future__ import annotations

import queue
import threading
from typing import Mapping

from lowbit.comm.messages import Messages
from lowbit.comm.transport import StepTimeline
from lowbit.errors import ConfigError, TransportError


class Pumps:
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
    i posts every peer's chunk i + window (docs/transports.md, receive window, says why). A failed
    receive ends the other peers' pumps too (their later chunks would never be posted)."""

    def __init__(self, p2p: Messages, step: int, direction: str, bounds: Mapping[int, list[int]], what: str,
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
