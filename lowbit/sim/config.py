"""One federated run's settings (:class:`FedConfig`, validated once) and the seeds everything random
is drawn from: every draw is a pure function of (seed, stream, round, client), so runs repeat
exactly and sequential and Ray execution agree."""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import ConfigError

__all__ = ["FedConfig", "LINK_BITS", "AGGREGATORS", "WEIGHTS", "LOCAL_OPTIMIZERS", "mix_seed", "seeded", "Stream"]

LINK_BITS = (2, 3, 4, 5, 6, 7, 8, 32)
AGGREGATORS = ("fedavg", "fedadam")
WEIGHTS = ("data", "seen")
LOCAL_OPTIMIZERS = ("sgd", "adam")


@dataclass
class FedConfig:
    """One federated run. ``alpha`` None = IID split; otherwise Dirichlet(alpha) over labels."""

    clients: int = 100             # K
    fraction: float = 0.1          # clients sampled per round: max(1, round(fraction·K))
    rounds: int = 20
    local_steps: int = 5           # E local optimizer steps per client per round
    local_epochs: int = 0          # > 0: E = local_epochs·⌈n_i/local_batch⌉ instead of local_steps
    local_batch: int = 16
    local_lr: float = 0.05
    local_momentum: float = 0.0    # client SGD momentum (state reset every round)
    local_optimizer: str = "sgd"   # sgd | adam (client Adam, betas (0.9, 0.999); state reset every round)
    alpha: float | None = None     # Dirichlet concentration over labels; None = IID
    up_bits: int = 32              # 2..8 clipped stochastic, 32 fp32
    down_bits: int = 32            # 2..8 LAQ linear weights, 32 fp32
    per_row: bool = False          # downlink: one LAQ scale per output row
    clip: float | None = 3.0       # uplink clip at c·σ (None: no clipping)
    error_feedback: bool = False   # per-client uplink residual kept across rounds
    aggregator: str = "fedavg"     # fedavg | fedadam
    weight: str = "data"           # a client's weight in the average: its examples (data) or the
                                   # examples its local steps processed this round (seen)
    server_lr: float | None = None  # None: 1.0 for fedavg, 1e-2 for fedadam
    server_betas: tuple[float, float] = (0.9, 0.99)
    server_tau: float = 1e-3
    dropout_prob: float = 0.0      # probability a sampled client drops mid-round (does not report)
    seed: int = 0
    model: str = "tiny-bert"       # a lowbit.models.presets name
    model_config: dict | None = None  # BertConfig kwargs: random-init BERT instead of the preset
    freeze: tuple[str, ...] = ()   # parameter-name prefixes kept at their initial values: not trained,
                                   # never sent (every client holds the same initial model)
    num_labels: int = 2
    task: str = "SST-2"
    max_len: int = 64
    train_subset: int = 0          # 0 = all of train
    eval_subset: int = 0           # 0 = all of dev
    eval_every: int = 1            # 0 = only after the last round
    eval_batch: int = 128
    threads: int = 1               # torch threads for client compute (1 in Ray actors; same = same bits)
    ray: bool = False
    address: str | None = None     # an existing Ray cluster (implies ray)
    ray_cpus: int = 2              # local cluster size
    ray_temp_dir: str = ""         # a local cluster's session files ("" = lowbit.comm.ray.default_temp_dir())
    ray_actors: int = 0            # 0 = ray_cpus
    out: str | None = "runs/federated"
    progress: bool = True

    def validate(self) -> "FedConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.clients) and self.clients >= 1, f"clients must be an integer >= 1, got {self.clients!r}")
        need(isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1,
             f"fraction must be in (0, 1], got {self.fraction!r}")
        need(is_int(self.rounds) and self.rounds >= 1, f"rounds must be >= 1, got {self.rounds!r}")
        need(is_int(self.local_steps) and self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps!r}")
        need(is_int(self.local_epochs) and self.local_epochs >= 0, f"local_epochs must be >= 0, got {self.local_epochs!r}")
        need(is_int(self.local_batch) and self.local_batch >= 1, f"local_batch must be >= 1, got {self.local_batch!r}")
        need(isinstance(self.local_lr, (int, float)) and self.local_lr > 0, f"local_lr must be > 0, got {self.local_lr!r}")
        need(0 <= self.local_momentum < 1, f"local_momentum must be in [0, 1), got {self.local_momentum!r}")
        need(self.local_optimizer in LOCAL_OPTIMIZERS,
             f"local_optimizer must be one of {LOCAL_OPTIMIZERS}, got {self.local_optimizer!r}")
        need(self.local_optimizer == "sgd" or self.local_momentum == 0,
             "local_momentum applies to local_optimizer 'sgd' only")
        need(self.alpha is None or (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)),
             f"alpha must be > 0 (or None for IID), got {self.alpha!r}")
        need(self.up_bits in LINK_BITS, f"up_bits must be one of {LINK_BITS}, got {self.up_bits!r}")
        need(self.down_bits in LINK_BITS, f"down_bits must be one of {LINK_BITS}, got {self.down_bits!r}")
        need(self.clip is None or (isinstance(self.clip, (int, float)) and self.clip > 0),
             f"clip must be > 0 or None, got {self.clip!r}")
        need(self.aggregator in AGGREGATORS, f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        need(self.weight in WEIGHTS, f"weight must be one of {WEIGHTS}, got {self.weight!r}")
        need(self.server_lr is None or self.server_lr > 0, f"server_lr must be > 0, got {self.server_lr!r}")
        b1, b2 = self.server_betas
        need(0 <= b1 < 1 and 0 <= b2 < 1, f"server_betas must be in [0, 1), got {self.server_betas!r}")
        need(self.server_tau > 0, f"server_tau must be > 0, got {self.server_tau!r}")
        need(isinstance(self.dropout_prob, (int, float)) and 0 <= self.dropout_prob <= 1,
             f"dropout_prob must be in [0, 1], got {self.dropout_prob!r}")
        need(self.max_len >= 8, f"max_len must be >= 8, got {self.max_len!r}")
        need(self.train_subset >= 0 and self.eval_subset >= 0, "train_subset and eval_subset must be >= 0")
        need(self.train_subset == 0 or self.train_subset >= self.clients,
             f"train_subset {self.train_subset} leaves some of the {self.clients} clients without data")
        need(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every!r}")
        need(self.eval_batch >= 1, f"eval_batch must be >= 1, got {self.eval_batch!r}")
        need(is_int(self.threads) and self.threads >= 0, f"threads must be >= 0, got {self.threads!r}")
        need(self.ray_cpus >= 1 and self.ray_actors >= 0, "ray_cpus must be >= 1 and ray_actors >= 0")
        need(self.num_labels >= 2, f"num_labels must be >= 2, got {self.num_labels!r}")
        need(isinstance(self.freeze, (tuple, list)) and all(isinstance(f, str) and f for f in self.freeze),
             f"freeze must be a sequence of parameter-name prefixes, got {self.freeze!r}")
        return self

    @property
    def clients_per_round(self) -> int:
        return max(1, min(self.clients, round(self.fraction * self.clients)))

    @property
    def lr_server(self) -> float:
        if self.server_lr is not None:
            return float(self.server_lr)
        return 1.0 if self.aggregator == "fedavg" else 1e-2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing): pure, order-sensitive."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def seeded(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


class Stream(enum.IntEnum):
    """Which random stream a draw belongs to (the second part of its seed)."""

    SAMPLE = 1   # the clients of a round
    DROP = 2     # which sampled clients drop out
    BATCH = 3    # a client's local mini-batches
    QUANT = 4    # stochastic rounding of a client's uplink
    TORCH = 5    # dropout masks during local steps
    IID = 11     # the IID split
    DIRICHLET = 12  # the Dirichlet split
