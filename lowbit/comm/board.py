"""A small key-value board in the c10d store that rendezvous already gave every rank (TCPStore for
``tcp://`` and ``env://`` launches): ranks publish small JSON values under ``<prefix>/<kind>/<step>/<rank>``
and others wait for them with a timeout. It is the control plane: nothing here is a collective, so a
rank that died blocks nobody who does not wait for it, and nothing here is counted as payload.

Used by the parameter server's ``"continue"`` mode (the live workers of each step) and by the
training loop (per-step numbers, checkpoint marks, the end handshake; see :mod:`lowbit.train.loop`).
"""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Iterable

from lowbit.errors import TransportError

class Board:
    def __init__(self, store, rank: int, timeout: float, prefix: str = "lowbit/ctl"):
        self.store = store
        self.rank = rank
        self.timeout = timedelta(seconds=timeout)
        self.prefix = prefix

    def _key(self, kind: str, step: int | None, rank: int) -> str:
        return f"{self.prefix}/{kind}/{rank}" if step is None else f"{self.prefix}/{kind}/{step}/{rank}"

    def publish(self, kind: str, step: int | None, values: list | None = None) -> None:
        self.store.set(self._key(kind, step, self.rank), json.dumps(values or []))

    def forget(self, kind: str, step: int | None, ranks: Iterable[int]) -> None:
        """Delete what ``ranks`` published (cleanup only; a store that cannot delete keeps it)."""
        for r in ranks:
            try:
                self.store.delete_key(self._key(kind, step, r))
            except Exception:  # noqa: BLE001 - cleanup only
                pass

    def gather(self, kind: str, step: int | None, ranks: Iterable[int], *, delete: bool = True
               ) -> dict[int, list]:
        """What each of ``ranks`` published under ``kind``/``step``; waits at most the timeout for
        each. Raises :class:`TransportError` naming the ranks that did not publish."""
        ranks = list(ranks)
        keys = [self._key(kind, step, r) for r in ranks]
        try:
            self.store.wait(keys, self.timeout)
        except Exception as e:  # noqa: BLE001 - the store raises RuntimeError / DistStoreError
            missing = [r for r, k in zip(ranks, keys) if not self.store.check([k])]
            raise TransportError(f"rank {self.rank}: ranks {missing} did not report '{kind}' for step {step} "
                                 f"within {self.timeout.total_seconds():g}s: {str(e).splitlines()[0][:200]}") from e
        try:
            out = {r: json.loads(self.store.get(k)) for r, k in zip(ranks, keys)}
        except Exception as e:  # noqa: BLE001 - the store's host (rank 0) went away after the wait
            raise TransportError(f"rank {self.rank}: the store was lost while reading '{kind}' for step {step}: "
                                 f"{str(e).splitlines()[0][:200]}") from e
        if delete:
            self.forget(kind, step, ranks)
        return out
