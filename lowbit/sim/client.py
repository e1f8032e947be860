"""A client's round: decode the global model, E local optimizer steps on its examples, encode the
delta (with its error-feedback residual) for the uplink."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lowbit.quant.grads import ErrorFeedback
from lowbit.sim.config import FedConfig, Stream, mix_seed, seeded
from lowbit.sim.links import decode_tensors, encode_tensors, make_link_plan
from lowbit.sim.model import batch_of, build_model, set_params, trainable
from lowbit.sim.partition import client_drops

__all__ = ["local_batch_indices", "make_local_optimizer", "ClientResult", "ClientRunner"]


def local_batch_indices(n: int, steps: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Positions (into a client's n examples) of each local step's mini-batch: epochs of a seeded
    permutation, read in consecutive chunks of ``min(batch, n)`` (a chunk never straddles epochs)."""
    b = min(batch, n)
    per_epoch = n // b
    out: list[torch.Tensor] = []
    perm = None
    for s in range(steps):
        j = s % per_epoch
        if j == 0:
            perm = torch.randperm(n, generator=generator)
        out.append(perm[j * b:(j + 1) * b])
    return out


def make_local_optimizer(params, cfg: FedConfig) -> torch.optim.Optimizer:
    """A fresh client optimizer (its state lives for one round only): SGD with ``local_momentum``,
    or Adam with default betas/eps and no weight decay."""
    if cfg.local_optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.local_lr)
    return torch.optim.SGD(params, lr=cfg.local_lr, momentum=cfg.local_momentum)


@dataclass
class ClientResult:
    client: int
    n: int                  # the client's weight in the average (ClientRunner.weight)
    up: bytes | None        # uplink frames; None when the client dropped out
    loss: float = float("nan")  # mean local training loss

    @property
    def dropped(self) -> bool:
        return self.up is None


class ClientRunner:
    """Runs the local updates of any number of clients. Holds one model (re-loaded from the
    downlink bytes for each client), the clients' data and their error-feedback residuals.
    Used as is by the sequential pool and as a Ray actor (calls receive and return bytes)."""

    def __init__(self, cfg: FedConfig, train: dict[str, torch.Tensor], splits: Sequence[torch.Tensor]):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.train = train
        self.splits = [torch.as_tensor(s, dtype=torch.long) for s in splits]
        self.model = build_model(cfg)
        self.plan = make_link_plan(self.model, cfg)
        self.ef: dict[int, ErrorFeedback] = {}

    def local_steps(self, cid: int) -> int:
        n = len(self.splits[cid])
        return self.cfg.local_epochs * math.ceil(n / self.cfg.local_batch) if self.cfg.local_epochs else self.cfg.local_steps

    def weight(self, cid: int) -> int:
        """Client ``cid``'s weight in the average: its examples, or (``weight="seen"``) the
        examples its local steps process in a round."""
        n = len(self.splits[cid])
        return n if self.cfg.weight == "data" else self.local_steps(cid) * min(self.cfg.local_batch, n)

    def local_update(self, start: Sequence[torch.Tensor], cid: int, rnd: int) -> tuple[list[torch.Tensor], float]:
        """E local optimizer steps from ``start`` on client ``cid``'s data: (Δ = w_local − start, mean loss)."""
        cfg = self.cfg
        idx = self.splits[cid]
        n = len(idx)
        steps = self.local_steps(cid)
        set_params(self.model, start)
        self.model.train()
        torch.manual_seed(mix_seed(cfg.seed, Stream.TORCH, rnd, cid))  # dropout masks
        params = [p for _, p in trainable(self.model)]
        opt = make_local_optimizer(params, cfg)
        losses = []
        for pos in local_batch_indices(n, steps, cfg.local_batch, seeded(cfg.seed, Stream.BATCH, rnd, cid)):
            opt.zero_grad(set_to_none=True)
            out = self.model(**batch_of(self.train, idx[pos]))
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
        with torch.no_grad():
            delta = [p.detach() - s for p, s in zip(params, start)]
        return delta, float(np.mean(losses))

    def run(self, global_bytes: bytes, clients: Sequence[int], rnd: int) -> list[ClientResult]:
        start = decode_tensors(self.plan, global_bytes, "down")
        results = []
        for cid in clients:
            n = self.weight(cid)
            if client_drops(self.cfg, rnd, cid):
                results.append(ClientResult(cid, n, None))
                continue
            delta, loss = self.local_update(start, cid, rnd)
            ef = self.ef.setdefault(cid, ErrorFeedback()) if self.cfg.error_feedback else None
            up = encode_tensors(self.plan, delta, "up", step=rnd, ef=ef,
                                generator=seeded(self.cfg.seed, Stream.QUANT, rnd, cid))
            results.append(ClientResult(cid, n, up, loss))
        return results
