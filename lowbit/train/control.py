"""The training run's control plane: small per-step numbers and checkpoint commits through the c10d
store that rendezvous already gave every rank (TCPStore for ``tcp://`` and ``env://`` launches).

Payload (gradient and weight frames) travels over the transport and is counted; what goes through
here is bookkeeping, not counted: a worker's loss before it sends its gradients, an owner's byte
counters after the step, "saved" marks of a checkpoint. Nothing in it is a collective, so a worker
that dies never blocks the others here: the leader only waits for ranks the transport still
counts as live, and waits with a timeout.

Keys (prefix ``lowbit/ctl``)::

    w/<step>/<rank>     worker: [loss, skipped gradients]     (set before its gradients go up)
    o/<step>/<rank>     owner:  [up bytes received, down bytes sent] since the loop started
    ck/<step>/<rank>    a rank has written its part of the step-<step> checkpoint
    end/<rank>          a rank is done with the store (the store's host waits for these)
"""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Iterable

from lowbit.errors import TransportError

PREFIX = "lowbit/ctl"


class Control:
    def __init__(self, store, rank: int, timeout: float):
        self.store = store
        self.rank = rank
        self.timeout = timedelta(seconds=timeout)

    def _key(self, kind: str, step: int | None, rank: int) -> str:
        return f"{PREFIX}/{kind}/{rank}" if step is None else f"{PREFIX}/{kind}/{step}/{rank}"

    def publish(self, kind: str, step: int | None, values: list[float] | None = None) -> None:
        self.store.set(self._key(kind, step, self.rank), json.dumps(values or []))

    def gather(self, kind: str, step: int | None, ranks: Iterable[int], *, delete: bool = True
               ) -> dict[int, list[float]]:
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
        out = {r: json.loads(self.store.get(k)) for r, k in zip(ranks, keys)}
        if delete:
            for k in keys:
                try:
                    self.store.delete_key(k)
                except Exception:  # noqa: BLE001 - cleanup only
                    pass
        return out
