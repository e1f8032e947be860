"""Who holds which examples (IID or Dirichlet-over-labels splits, label skew) and who takes part in a
round (sampling and drop-outs)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from lowbit.errors import ConfigError
from lowbit.sim.config import FedConfig, Stream, mix_seed, seeded

__all__ = ["sample_clients", "client_drops", "iid_split", "dirichlet_split", "label_skew", "make_splits", "as_labels"]


def sample_clients(cfg: FedConfig, rnd: int) -> list[int]:
    """The clients of round ``rnd`` (sorted ids), drawn without replacement with (seed, rnd)."""
    perm = torch.randperm(cfg.clients, generator=seeded(cfg.seed, Stream.SAMPLE, rnd))
    return sorted(perm[:cfg.clients_per_round].tolist())


def client_drops(cfg: FedConfig, rnd: int, cid: int) -> bool:
    """Whether client ``cid`` drops out mid-round ``rnd`` (Bernoulli(dropout_prob), seeded)."""
    if cfg.dropout_prob <= 0:
        return False
    return bool(torch.rand((), generator=seeded(cfg.seed, Stream.DROP, rnd, cid)) < cfg.dropout_prob)


def as_labels(labels) -> np.ndarray:
    return np.asarray(labels.tolist() if isinstance(labels, torch.Tensor) else list(labels), dtype=np.int64)


def iid_split(n: int, clients: int, seed: int = 0) -> list[torch.Tensor]:
    """A seeded random permutation of range(n) cut into ``clients`` parts of sizes differing by ≤ 1."""
    if n < clients:
        raise ConfigError(f"{n} examples cannot give each of {clients} clients one")
    perm = torch.randperm(n, generator=seeded(seed, Stream.IID))
    return [torch.sort(p).values for p in torch.tensor_split(perm, clients)]


def dirichlet_split(labels, clients: int, alpha: float, seed: int = 0) -> list[torch.Tensor]:
    """Non-IID split (Hsu et al. 2019): for each label c, proportions p_c ~ Dir(alpha·1_K) and the
    examples of c are dealt to the K clients in those proportions. Small alpha: each client sees
    few labels; large alpha: close to IID. Every client gets at least one example (an empty client
    takes one from the currently largest client). Returns sorted index tensors."""
    y = as_labels(labels)
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ConfigError(f"alpha must be > 0, got {alpha!r}")
    if len(y) < clients:
        raise ConfigError(f"{len(y)} examples cannot give each of {clients} clients one")
    rng = np.random.default_rng(mix_seed(seed, Stream.DIRICHLET))
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(clients, float(alpha)))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    for k in range(clients):
        if not parts[k]:
            donor = max(range(clients), key=lambda j: (len(parts[j]), -j))
            parts[k].append(parts[donor].pop())
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def label_skew(splits: Sequence[torch.Tensor], labels) -> float:
    """Mean over clients of the total-variation distance ½‖p_client − p_global‖₁ between a client's
    label distribution and the global one: 0 for identical distributions, → 1 − max p_global as each
    client holds a single label."""
    y = as_labels(labels)
    classes = np.unique(y)
    glob = np.array([(y == c).mean() for c in classes])
    tv = []
    for s in splits:
        ys = y[np.asarray(s.tolist(), dtype=np.int64)]
        if len(ys) == 0:
            continue
        p = np.array([(ys == c).mean() for c in classes])
        tv.append(0.5 * np.abs(p - glob).sum())
    return float(np.mean(tv))


def make_splits(cfg: FedConfig, labels) -> list[torch.Tensor]:
    n = len(labels)
    if cfg.alpha is None:
        return iid_split(n, cfg.clients, cfg.seed)
    return dirichlet_split(labels, cfg.clients, cfg.alpha, cfg.seed)
