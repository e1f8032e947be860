"""The server: fp32 global weights, the downlink encoder, and the aggregation as a strategy class
(FedAvg, FedAdam) applied to the clients' weighted mean delta."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lowbit.sim.client import ClientResult
from lowbit.sim.config import FedConfig
from lowbit.sim.links import decode_tensors, encode_tensors, make_link_plan
from lowbit.sim.model import evaluate, set_params, trainable

__all__ = ["FedAvg", "FedAdam", "make_strategy", "FedServer"]


class FedAvg:
    """w ← w + η·Δ (McMahan et al. 2017; η = 1 is plain model averaging)."""

    def __init__(self, lr: float = 1.0):
        self.lr = lr

    def apply(self, weights: list[torch.Tensor], delta: list[torch.Tensor]) -> None:
        for w, d in zip(weights, delta):
            w.add_(d, alpha=self.lr)


class FedAdam:
    """m ← β₁m + (1−β₁)Δ, v ← β₂v + (1−β₂)Δ², w ← w + η·m/(√v + τ) (Reddi et al. 2021); the
    moments start at zero on the first round that has a delta."""

    def __init__(self, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99), tau: float = 1e-3):
        self.lr, self.betas, self.tau = lr, betas, tau
        self.m: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None

    def apply(self, weights: list[torch.Tensor], delta: list[torch.Tensor]) -> None:
        b1, b2 = self.betas
        if self.m is None:
            self.m = [torch.zeros_like(w) for w in weights]
            self.v = [torch.zeros_like(w) for w in weights]
        for w, d, m, v in zip(weights, delta, self.m, self.v):
            m.mul_(b1).add_(d, alpha=1 - b1)
            v.mul_(b2).addcmul_(d, d, value=1 - b2)
            w.addcdiv_(m, v.sqrt().add_(self.tau), value=self.lr)


def make_strategy(cfg: FedConfig):
    if cfg.aggregator == "fedavg":
        return FedAvg(cfg.lr_server)
    return FedAdam(cfg.lr_server, tuple(cfg.server_betas), cfg.server_tau)


class FedServer:
    """fp32 global weights, the strategy and its state, the downlink encoder."""

    def __init__(self, cfg: FedConfig, model: nn.Module):
        self.cfg = cfg
        self.model = model
        self.plan = make_link_plan(model, cfg)
        self.weights = [p.detach().clone().float() for _, p in trainable(model)]
        self.strategy = make_strategy(cfg)

    def broadcast(self, rnd: int) -> bytes:
        return encode_tensors(self.plan, self.weights, "down", step=rnd)

    def aggregate(self, results: Sequence[ClientResult]) -> int:
        """Apply the reported deltas (in the given order); returns how many reported. A round where
        no client reported leaves the model (and the strategy's state) unchanged."""
        rep = [r for r in results if not r.dropped]
        if not rep:
            return 0
        total = float(sum(r.n for r in rep))
        avg = [torch.zeros_like(w) for w in self.weights]
        for r in rep:
            for a, d in zip(avg, decode_tensors(self.plan, r.up, "up")):
                a.add_(d, alpha=r.n / total)
        self.strategy.apply(self.weights, avg)
        return len(rep)

    def evaluate(self, data: dict[str, torch.Tensor]) -> dict[str, float]:
        set_params(self.model, self.weights)
        return evaluate(self.model, data, self.cfg.eval_batch)
