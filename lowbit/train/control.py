"""The run's control plane, over the c10d store every rank already shares (with Ray, the store actor
of :mod:`lowbit.comm.ray`; :class:`lowbit.comm.board.Board`):
per-step numbers for the leader's log, checkpoint marks, the end handshake, and a coordinated stop.

Keys (under ``lowbit/ctl/``)::

    worker_step/<step>/<rank>   a worker's [loss, skipped gradients, whole/sent upload], set after its step
    owner_bytes/<step>/<rank>   an owner's [up bytes received, down bytes sent] this step and since the start
    checkpoint/<step>/<rank>    a rank wrote its part of a checkpoint: {"files": {name: record}, "error"}
    at/<rank>                   the step a rank is in now (overwritten every step)
    stop                        the step at which every rank stops (set once, see :func:`request_stop`)
    end/<rank>                  a rank is done with the store

A stop (SIGTERM or Ctrl-C on the launcher, SIGTERM on a rank) must end every rank at the same step
boundary, or the ranks still in the exchange would wait for the ones that left. The requester reads
every rank's ``at`` and sets ``stop`` = max + 2: the ranks run in lockstep (no rank is a whole step
ahead of another), and a rank checks ``stop`` when it begins a step, so none has begun that step yet.
"""
from __future__ import annotations

import signal
import threading
import time

from lowbit.comm.board import Board

STOP_KEY = "lowbit/ctl/stop"
_STOP_REQUESTS = "lowbit/ctl/stop_requests"
_AT = "lowbit/ctl/at/"

STOP_GRACE_S = 30.0  # after a stop request, how long the ranks get to reach the boundary and checkpoint

_signalled = threading.Event()  # set by the SIGTERM handler of a rank


def rank_step(store, rank: int) -> int | None:
    """The step ``rank`` last began (None when it never reported one)."""
    key = _AT + str(rank)
    return int(store.get(key)) if store.check([key]) else None


def request_stop(store, ranks: list[int]) -> int:
    """Ask every rank to stop at the next step boundary no rank has reached; returns that step. Only
    the first request sets it (later ones return the same step)."""
    if store.add(_STOP_REQUESTS, 1) == 1:
        at = [int(store.get(_AT + str(r))) for r in ranks if store.check([_AT + str(r)])]
        store.set(STOP_KEY, str(max(at, default=0) + 2))
    return int(store.get(STOP_KEY))  # waits (up to the store's timeout) for the first requester


def install_stop_handler() -> None:
    """A rank's SIGTERM (a scheduler's preemption) requests a coordinated stop instead of killing the
    rank mid-exchange; Ctrl-C is the launcher's to handle (the terminal sends it to every process)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, lambda *_: _signalled.set())


class Control:
    """One rank's view of the control plane (see the module docstring)."""

    def __init__(self, store, rank: int, world_size: int, timeout: float):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.board = Board(store, rank, timeout)
        self._stop_at: int | None = None

    def begin_step(self, step: int) -> int | None:
        """Called as a step begins: records where this rank is and returns the step every rank stops
        at, once one is set (None until then)."""
        self.store.set(_AT + str(self.rank), str(step))
        if _signalled.is_set() and self._stop_at is None:
            self._stop_at = request_stop(self.store, list(range(self.world_size)))
        if self._stop_at is None and self.store.check([STOP_KEY]):
            self._stop_at = int(self.store.get(STOP_KEY))
        return self._stop_at

    def publish(self, kind: str, step: int | None, values=None) -> None:
        self.board.publish(kind, step, values)

    def gather(self, kind: str, step: int | None, ranks, *, delete: bool = True) -> dict:
        return self.board.gather(kind, step, ranks, delete=delete)


class StopSignals:
    """SIGTERM and SIGINT on a launcher for the duration of a block (main thread only; the old
    handlers come back after): counted, the first one's time kept, ``on_signal()`` called. The
    launcher asks the ranks to stop at a step boundary on the first and kills them on a second."""

    def __init__(self, on_signal=None):
        self.count, self.when, self._old, self.on_signal = 0, None, {}, on_signal

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def again(self) -> "StopSignals":
        """A block that puts this counter's handlers back in (a library replaced them meanwhile)."""
        return StopSignals(lambda: self._handle(None, None))

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.when = self.when or time.time()
        if self.on_signal is not None:
            self.on_signal()

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
