"""Federated-style simulation with quantized links (FedAvg, McMahan et al. AISTATS 2017; FedAdam,
Reddi et al. ICLR 2021 "Adaptive federated optimization").

One round, as data::

    server (fp32 global w)                                  client i (of the sampled m = ⌈fraction·K⌉)
      ŵ frames = downlink codec(w)  ==== bytes ====>  start = decode(ŵ frames)
                                                       E local steps (SGD or Adam) on its examples -> w_i
                                                       Δ_i = w_i − start   (+ e_i, error feedback)
      Δ_i = decode(frames)          <=== bytes =====  frames = uplink codec(Δ_i + e_i),  e_i ← Δ_i + e_i − decode
      FedAvg:  w ← w + η·Σ n_i Δ_i / Σ n_i                        (n_i = client i's examples, η = 1)
      FedAdam: Δ = Σ n_i Δ_i / Σ n_i,  m ← β₁m + (1−β₁)Δ,  v ← β₂v + (1−β₂)Δ²,  w ← w + η·m/(√v + τ)

Downlink: LAQ weights (``WeightCodec("laq-linear", down_bits)``) for matrices, fp32 for 1-D tensors
(LayerNorm, biases); ``down_bits=32`` sends fp32 everywhere. Uplink: clipped stochastic m-bit
(``StochasticGradCodec(up_bits, clip)``) of the model delta for matrices, fp32 for 1-D tensors;
``up_bits=32`` sends fp32. Bytes are the lengths of the real frames.

Determinism: everything a client does is a pure function of (global frame bytes, client id, round,
seed) and its own error-feedback residual, which lives with the client (on the actor that always
serves it), so the sequential and the Ray execution give identical results.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lowbit.codec.codecs import RawCodec, StochasticGradCodec, WeightCodec
from lowbit.codec.feedback import with_feedback
from lowbit.codec.frame import split_frames
from lowbit.errors import ConfigError, FrameError
from lowbit.quant.grads import ErrorFeedback

__all__ = [
    "FedConfig", "iid_split", "dirichlet_split", "label_skew", "sample_clients", "client_drops",
    "local_batch_indices", "LinkSpec", "link_spec", "make_link_plan", "encode_tensors", "decode_tensors",
    "link_nbytes", "build_model", "ClientResult", "ClientRunner", "FedServer", "SequentialPool",
    "RayPool", "simulate", "plot_accuracy_vs_bytes", "main", "load_task_data", "rounds_to_target",
    "evaluate", "make_splits", "mix_seed", "make_local_optimizer", "trainable",
]

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


# --------------------------------------------------------------------------- seeds


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing): pure, order-sensitive."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _gen(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


_SAMPLE, _DROP, _BATCH, _QUANT, _TORCH = 1, 2, 3, 4, 5


def sample_clients(cfg: FedConfig, rnd: int) -> list[int]:
    """The clients of round ``rnd`` (sorted ids), drawn without replacement with (seed, rnd)."""
    perm = torch.randperm(cfg.clients, generator=_gen(cfg.seed, _SAMPLE, rnd))
    return sorted(perm[:cfg.clients_per_round].tolist())


def client_drops(cfg: FedConfig, rnd: int, cid: int) -> bool:
    """Whether client ``cid`` drops out mid-round ``rnd`` (Bernoulli(dropout_prob), seeded)."""
    if cfg.dropout_prob <= 0:
        return False
    return bool(torch.rand((), generator=_gen(cfg.seed, _DROP, rnd, cid)) < cfg.dropout_prob)


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


# --------------------------------------------------------------------------- splits


def _as_labels(labels) -> np.ndarray:
    return np.asarray(labels.tolist() if isinstance(labels, torch.Tensor) else list(labels), dtype=np.int64)


def iid_split(n: int, clients: int, seed: int = 0) -> list[torch.Tensor]:
    """A seeded random permutation of range(n) cut into ``clients`` parts of sizes differing by ≤ 1."""
    if n < clients:
        raise ConfigError(f"{n} examples cannot give each of {clients} clients one")
    perm = torch.randperm(n, generator=_gen(seed, 11))
    return [torch.sort(p).values for p in torch.tensor_split(perm, clients)]


def dirichlet_split(labels, clients: int, alpha: float, seed: int = 0) -> list[torch.Tensor]:
    """Non-IID split (Hsu et al. 2019): for each label c, proportions p_c ~ Dir(alpha·1_K) and the
    examples of c are dealt to the K clients in those proportions. Small alpha: each client sees
    few labels; large alpha: close to IID. Every client gets at least one example (an empty client
    takes one from the currently largest client). Returns sorted index tensors."""
    y = _as_labels(labels)
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ConfigError(f"alpha must be > 0, got {alpha!r}")
    if len(y) < clients:
        raise ConfigError(f"{len(y)} examples cannot give each of {clients} clients one")
    rng = np.random.default_rng(mix_seed(seed, 12))
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
    y = _as_labels(labels)
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


# --------------------------------------------------------------------------- links


@dataclass(frozen=True)
class LinkSpec:
    key: int
    name: str
    shape: tuple[int, ...]
    down: object  # codec of the global model -> client
    up: object    # codec of the model delta client -> server


def link_spec(key: int, name: str, shape: Sequence[int], *, up_bits: int, down_bits: int,
              clip: float | None = 3.0, per_row: bool = False) -> LinkSpec:
    """One tensor's codecs on both links: a matrix goes down as LAQ weights and up as clipped
    stochastic codes of its delta; a 1-D tensor (LayerNorm, bias) and any 32-bit link go fp32."""
    small = len(shape) < 2
    down = RawCodec(torch.float32, "weight") if small or down_bits == 32 else \
        WeightCodec("laq-linear", down_bits, per_row=per_row)
    up = RawCodec(torch.float32, "grad") if small or up_bits == 32 else StochasticGradCodec(up_bits, clip)
    return LinkSpec(key, name, tuple(shape), down, up)


def make_link_plan(model: nn.Module, cfg: FedConfig) -> list[LinkSpec]:
    """A :func:`link_spec` per trainable parameter; frozen parameters (``cfg.freeze``) are not on
    the links."""
    return [link_spec(key, name, p.shape, up_bits=cfg.up_bits, down_bits=cfg.down_bits, clip=cfg.clip,
                      per_row=cfg.per_row)
            for key, (name, p) in enumerate(trainable(model))]


def link_nbytes(plan: list[LinkSpec]) -> dict[str, int]:
    """Exact bytes of one model on each link (codec formula) and of the fp32 equivalent."""
    raw = RawCodec()
    return {"down": sum(s.down.frame_nbytes(s.shape) for s in plan),
            "up": sum(s.up.frame_nbytes(s.shape) for s in plan),
            "fp32": sum(raw.frame_nbytes(s.shape) for s in plan),
            "numel": sum(math.prod(s.shape) for s in plan)}


def encode_tensors(plan: list[LinkSpec], tensors: Sequence[torch.Tensor], link: str, step: int = 0,
                   generator: torch.Generator | None = None, ef: ErrorFeedback | None = None) -> bytes:
    """All tensors through the ``link`` ("down" | "up") codecs, as one bundle of frames. With ``ef``,
    quantized uplink tensors carry the residual: send Q(x + e), keep e ← x + e − deQ(...)."""
    frames = []
    for spec, x in zip(plan, tensors):
        f = with_feedback(getattr(spec, link), ef).encode(x, key=spec.key, step=step, generator=generator,
                                                          name=spec.name)
        if f is None:
            raise FrameError(f"{link}link codec dropped {spec.name} (non-finite values)")
        frames.append(f.to_bytes())
    return b"".join(frames)


def decode_tensors(plan: list[LinkSpec], buf: bytes, link: str) -> list[torch.Tensor]:
    """A bundle back to float32 tensors, checking keys and shapes against the plan."""
    out = []
    frames = split_frames(buf)
    for spec in plan:
        f = next(frames, None)
        if f is None:
            raise FrameError(f"{link}link bundle ends before {spec.name} (key {spec.key})")
        if f.key != spec.key or tuple(f.shape) != spec.shape:
            raise FrameError(f"{link}link frame key {f.key} shape {tuple(f.shape)} does not match "
                             f"{spec.name}: key {spec.key} shape {spec.shape}")
        out.append(getattr(spec, link).decode(f))
    if next(frames, None) is not None:
        raise FrameError(f"{link}link bundle holds more frames than the model's {len(plan)} tensors")
    return out


# --------------------------------------------------------------------------- model and data


def build_model(cfg: FedConfig) -> nn.Module:
    """The preset's model, or a random-init BERT from ``cfg.model_config``. Whatever is randomly
    initialized (all of it, or a pretrained preset's new classifier head) is seeded by cfg.seed, so
    every call gives the same model. Parameters under ``cfg.freeze`` get ``requires_grad=False``."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(mix_seed(cfg.seed, 13))
        if cfg.model_config:
            from transformers import BertConfig, BertForSequenceClassification

            model = BertForSequenceClassification(BertConfig(num_labels=cfg.num_labels, **cfg.model_config))
        else:
            from lowbit.models.presets import load_preset

            model = load_preset(cfg.model, num_labels=cfg.num_labels)[0]
    finally:
        torch.random.set_rng_state(state)
    prefixes = tuple(cfg.freeze)
    if prefixes:
        names = [n for n, _ in model.named_parameters()]
        for pre in prefixes:
            if not any(n.startswith(pre) for n in names):
                raise ConfigError(f"freeze prefix {pre!r} matches no parameter of the model")
        for n, p in model.named_parameters():
            if n.startswith(prefixes):
                p.requires_grad_(False)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"freeze {prefixes!r} leaves no parameter to train")
    return model


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the parameters that train and cross the links, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def load_task_data(cfg: FedConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Tokenized (train subset, dev subset) of ``cfg.task``."""
    from lowbit.train.data import encode, load_glue_tsv, subset

    if cfg.model_config:
        from transformers import AutoTokenizer

        from lowbit.models.presets import minilm_path
        tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    else:
        from lowbit.models.presets import load_preset
        tok = load_preset(cfg.model, num_labels=cfg.num_labels)[1]
    out = []
    for split, n in (("train", cfg.train_subset), ("dev", cfg.eval_subset)):
        sents, labels = load_glue_tsv(cfg.task, split)
        idx = subset(n, cfg.seed, len(sents))
        out.append(encode(tok, [sents[i] for i in idx], [labels[i] for i in idx], cfg.max_len))
    return out[0], out[1]


def _batch(data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in data.items()}


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor], batch: int = 128) -> dict[str, float]:
    model.eval()
    n = len(data["labels"])
    correct, loss = 0, 0.0
    for i in range(0, n, batch):
        b = {k: v[i:i + batch] for k, v in data.items()}
        out = model(**b)
        loss += float(out.loss) * len(b["labels"])
        correct += int((out.logits.argmax(-1) == b["labels"]).sum())
    return {"accuracy": correct / max(1, n), "eval_loss": loss / max(1, n)}


def _set_params(model: nn.Module, tensors: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for (_, p), t in zip(trainable(model), tensors):
            p.copy_(t.reshape(p.shape))


# --------------------------------------------------------------------------- client


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
        _set_params(self.model, start)
        self.model.train()
        torch.manual_seed(mix_seed(cfg.seed, _TORCH, rnd, cid))  # dropout masks
        params = [p for _, p in trainable(self.model)]
        opt = make_local_optimizer(params, cfg)
        losses = []
        for pos in local_batch_indices(n, steps, cfg.local_batch, _gen(cfg.seed, _BATCH, rnd, cid)):
            opt.zero_grad(set_to_none=True)
            out = self.model(**_batch(self.train, idx[pos]))
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
                                generator=_gen(self.cfg.seed, _QUANT, rnd, cid))
            results.append(ClientResult(cid, n, up, loss))
        return results


# --------------------------------------------------------------------------- server


class FedServer:
    """fp32 global weights, the aggregator's state, the downlink encoder."""

    def __init__(self, cfg: FedConfig, model: nn.Module):
        self.cfg = cfg
        self.model = model
        self.plan = make_link_plan(model, cfg)
        self.weights = [p.detach().clone().float() for _, p in trainable(model)]
        self.m: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None

    def broadcast(self, rnd: int) -> bytes:
        return encode_tensors(self.plan, self.weights, "down", step=rnd)

    def aggregate(self, results: Sequence[ClientResult]) -> int:
        """Apply the reported deltas (in the given order); returns how many reported. A round where
        no client reported leaves the model (and the FedAdam moments) unchanged."""
        rep = [r for r in results if not r.dropped]
        if not rep:
            return 0
        total = float(sum(r.n for r in rep))
        avg = [torch.zeros_like(w) for w in self.weights]
        for r in rep:
            for a, d in zip(avg, decode_tensors(self.plan, r.up, "up")):
                a.add_(d, alpha=r.n / total)
        lr = self.cfg.lr_server
        if self.cfg.aggregator == "fedavg":
            for w, a in zip(self.weights, avg):
                w.add_(a, alpha=lr)
        else:
            b1, b2 = self.cfg.server_betas
            if self.m is None:
                self.m = [torch.zeros_like(w) for w in self.weights]
                self.v = [torch.zeros_like(w) for w in self.weights]
            for w, a, m, v in zip(self.weights, avg, self.m, self.v):
                m.mul_(b1).add_(a, alpha=1 - b1)
                v.mul_(b2).addcmul_(a, a, value=1 - b2)
                w.addcdiv_(m, v.sqrt().add_(self.cfg.server_tau), value=lr)
        return len(rep)

    def evaluate(self, data: dict[str, torch.Tensor]) -> dict[str, float]:
        _set_params(self.model, self.weights)
        return evaluate(self.model, data, self.cfg.eval_batch)


# --------------------------------------------------------------------------- execution


class SequentialPool:
    """All clients in this process, one after the other."""

    def __init__(self, cfg: FedConfig, train, splits):
        self.runner = ClientRunner(cfg, train, splits)

    def run_round(self, global_bytes: bytes, clients: Sequence[int], rnd: int) -> list[ClientResult]:
        threads = torch.get_num_threads()
        try:
            return self.runner.run(global_bytes, clients, rnd)
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        pass


class _ActorRunner(ClientRunner):
    def __init__(self, cfg, train, splits):
        torch.set_num_threads(1)
        super().__init__(dataclasses.replace(cfg, threads=1), train, splits)

    def ping(self) -> int:
        return os.getpid()


class RayPool:
    """A few Ray actors, each serving a fixed set of clients (client id mod #actors), so a client's
    error-feedback residual stays where its updates are computed. Calls carry the downlink bytes
    (put in the object store once per round) and return uplink bytes."""

    def __init__(self, cfg: FedConfig, train, splits):
        import ray

        from lowbit.comm.ray import ray_session

        self._session = contextlib.ExitStack()
        self._session.enter_context(ray_session(
            cfg.ray_cpus, temp_dir=cfg.ray_temp_dir or None, address=cfg.address,
            object_store_memory=256 * 1024 * 1024, env_vars={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}))
        self.ray = ray
        n = cfg.ray_actors or cfg.ray_cpus
        actor = ray.remote(num_cpus=1)(_ActorRunner)
        train_ref = ray.put(train)
        self.actors = [actor.remote(cfg, train_ref, splits) for _ in range(n)]
        ray.get([a.ping.remote() for a in self.actors])

    def run_round(self, global_bytes: bytes, clients: Sequence[int], rnd: int) -> list[ClientResult]:
        ref = self.ray.put(global_bytes)
        groups: dict[int, list[int]] = {}
        for c in clients:
            groups.setdefault(c % len(self.actors), []).append(c)
        futs = [self.actors[a].run.remote(ref, cs, rnd) for a, cs in groups.items()]
        by_id = {r.client: r for rs in self.ray.get(futs) for r in rs}
        return [by_id[c] for c in clients]

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        self._session.close()


# --------------------------------------------------------------------------- driver


def simulate(cfg: FedConfig, train: dict[str, torch.Tensor] | None = None,
             eval_data: dict[str, torch.Tensor] | None = None, *, return_state: bool = False) -> dict:
    """Run ``cfg.rounds`` rounds. ``train``/``eval_data`` (dicts of tensors with ``labels``) default
    to the task's tokenized train/dev subsets. Returns the summary (with ``records``, one per round;
    ``weights`` the final fp32 global weights when ``return_state``) and writes
    ``<out>/rounds.jsonl``, ``<out>/summary.json`` and ``<out>/accuracy_vs_bytes.png`` when
    ``cfg.out`` is set."""
    cfg.validate()
    if cfg.address:
        cfg = dataclasses.replace(cfg, ray=True)
    if train is None or eval_data is None:
        t, e = load_task_data(cfg)
        train = t if train is None else train
        eval_data = e if eval_data is None else eval_data
    labels = train["labels"]
    splits = make_splits(cfg, labels)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    server = FedServer(cfg, build_model(cfg))
    sizes = link_nbytes(server.plan)
    out = Path(cfg.out) if cfg.out else None
    jsonl = None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        jsonl = (out / "rounds.jsonl").open("w")
    pool = (RayPool if cfg.ray else SequentialPool)(cfg, train, splits)
    records: list[dict] = []
    cum = cum32 = 0
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.rounds, desc=f"fed up{cfg.up_bits}/down{cfg.down_bits}", unit="round",
                   file=sys.stderr, dynamic_ncols=True)
    t0 = time.time()
    try:
        if cfg.eval_every:
            rec = {"round": 0, **server.evaluate(eval_data), "cum_bytes": 0, "cum_fp32_bytes": 0}
            records.append(rec)
            if jsonl:
                jsonl.write(json.dumps(rec) + "\n")
        for rnd in range(1, cfg.rounds + 1):
            tr = time.time()
            clients = sample_clients(cfg, rnd)
            gbytes = server.broadcast(rnd)
            results = pool.run_round(gbytes, clients, rnd)
            reported = server.aggregate(results)
            ups = [len(r.up) for r in results if not r.dropped]
            down = len(gbytes) * len(clients)
            up = sum(ups)
            fp32 = sizes["fp32"] * (len(clients) + reported)
            cum += up + down
            cum32 += fp32
            losses = [r.loss for r in results if not r.dropped]
            rec = {"round": rnd, "clients": clients, "reported": reported, "dropped": len(clients) - reported,
                   "down_bytes_per_client": len(gbytes), "up_bytes_per_client": (up // reported) if reported else 0,
                   "down_bytes": down, "up_bytes": up, "bytes": up + down,
                   "fp32_bytes": fp32, "cum_bytes": cum, "cum_fp32_bytes": cum32,
                   "train_loss": float(np.mean(losses)) if losses else None}
            if (cfg.eval_every and rnd % cfg.eval_every == 0) or rnd == cfg.rounds:
                rec.update(server.evaluate(eval_data))
            rec["time_s"] = round(time.time() - tr, 3)
            records.append(rec)
            if jsonl:
                jsonl.write(json.dumps(rec) + "\n")
                jsonl.flush()
            if bar is not None:
                post = {"MB": f"{cum / 1e6:.1f}"}
                if "accuracy" in rec:
                    post["acc"] = f"{rec['accuracy']:.3f}"
                bar.set_postfix(post)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if jsonl:
            jsonl.close()
        pool.close()
        torch.set_num_threads(threads)
    evals = [r for r in records if "accuracy" in r]
    summary = {"config": cfg.to_dict(), "link_nbytes": sizes,
               "label_skew": label_skew(splits, labels), "client_sizes": [len(s) for s in splits],
               "final_accuracy": evals[-1]["accuracy"] if evals else None,
               "best_accuracy": max(r["accuracy"] for r in evals) if evals else None,
               "total_bytes": cum, "total_fp32_bytes": cum32, "wall_s": round(time.time() - t0, 2)}
    if out:
        (out / "summary.json").write_text(json.dumps({**summary, "records": records}, indent=1))
        plot_accuracy_vs_bytes({f"up {cfg.up_bits}b / down {cfg.down_bits}b": records},
                               out / "accuracy_vs_bytes.png")
    summary["records"] = records
    if return_state:
        summary["weights"] = [w.clone() for w in server.weights]
    return summary


def rounds_to_target(records: Sequence[dict], target: float) -> dict | None:
    """The first evaluated round whose accuracy reaches ``target`` (its round and cumulative bytes)."""
    for r in records:
        if r.get("accuracy") is not None and r["accuracy"] >= target:
            return {"round": r["round"], "cum_bytes": r["cum_bytes"], "cum_fp32_bytes": r["cum_fp32_bytes"]}
    return None


def plot_accuracy_vs_bytes(runs: dict[str, Sequence[dict]], path: str | Path, target: float | None = None,
                           title: str = "accuracy vs cumulative bytes (up + down)") -> Path:
    """One line per run: held-out accuracy against cumulative link bytes (MB, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, recs in runs.items():
        pts = [(max(r["cum_bytes"], 1) / 1e6, r["accuracy"]) for r in recs if r.get("accuracy") is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, label=label)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes on the links (MB)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI


def _alpha(s: str) -> float | None:
    return None if s.lower() in ("iid", "none") else float(s)


def build_parser() -> argparse.ArgumentParser:
    d = FedConfig()
    p = argparse.ArgumentParser(prog="lowbit simulate",
                                description="Federated simulation with quantized links (FedAvg / FedAdam).")
    a = p.add_argument
    a("--clients", type=int, default=d.clients, help="K clients")
    a("--fraction", type=float, default=d.fraction, help="fraction of clients sampled per round")
    a("--rounds", type=int, default=d.rounds)
    a("--local-steps", type=int, default=d.local_steps, help="E local optimizer steps")
    a("--local-epochs", type=int, default=d.local_epochs, help="> 0: local epochs instead of steps")
    a("--local-batch", type=int, default=d.local_batch)
    a("--local-lr", type=float, default=d.local_lr)
    a("--local-momentum", type=float, default=d.local_momentum)
    a("--local-optimizer", choices=LOCAL_OPTIMIZERS, default=d.local_optimizer,
      help="client optimizer (state reset every round)")
    a("--alpha", type=_alpha, default=d.alpha, help="Dirichlet alpha over labels, or 'iid'")
    a("--up-bits", type=int, default=d.up_bits, help="uplink bits: 2..8 or 32")
    a("--down-bits", type=int, default=d.down_bits, help="downlink bits: 2..8 or 32")
    a("--per-row", action="store_true", help="downlink: one scale per row")
    a("--clip", type=float, default=d.clip, help="uplink clip factor c (0 = no clipping)")
    a("--error-feedback", action="store_true", help="per-client uplink error feedback")
    a("--aggregator", choices=AGGREGATORS, default=d.aggregator)
    a("--weight", choices=WEIGHTS, default=d.weight,
      help="a client's weight in the average: its examples, or the examples it trained on this round")
    a("--server-lr", type=float, default=None)
    a("--server-betas", type=float, nargs=2, default=list(d.server_betas))
    a("--server-tau", type=float, default=d.server_tau)
    a("--dropout-prob", type=float, default=d.dropout_prob, help="client drop-out probability per round")
    a("--seed", type=int, default=d.seed)
    a("--model", default=d.model, help="model preset")
    a("--model-config", type=json.loads, default=None,
      help="JSON BertConfig kwargs for a random-init BERT instead of the preset")
    a("--freeze", nargs="+", default=list(d.freeze), metavar="PREFIX",
      help="parameter-name prefixes kept at their initial values (not trained, not sent)")
    a("--task", default=d.task)
    a("--max-len", type=int, default=d.max_len)
    a("--train-subset", type=int, default=d.train_subset)
    a("--eval-subset", type=int, default=d.eval_subset)
    a("--eval-every", type=int, default=d.eval_every)
    a("--threads", type=int, default=d.threads, help="torch threads for client compute (0 = torch default)")
    a("--ray", action="store_true", help="run clients on Ray actors (a local cluster)")
    a("--address", default=None, help="an existing Ray cluster (implies --ray)")
    a("--ray-cpus", type=int, default=d.ray_cpus)
    a("--ray-actors", type=int, default=d.ray_actors)
    a("--out", default=d.out)
    a("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(args: argparse.Namespace) -> FedConfig:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(FedConfig) if hasattr(args, f.name)}
    kw["server_betas"] = tuple(kw["server_betas"])
    kw["freeze"] = tuple(kw["freeze"])
    if kw["clip"] is not None and kw["clip"] == 0:
        kw["clip"] = None
    return FedConfig(**kw).validate()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        summary = simulate(cfg)
    except ConfigError as e:
        print(f"lowbit simulate: {e}", file=sys.stderr)
        return 2
    brief = {k: v for k, v in summary.items() if k not in ("records", "client_sizes", "config")}
    print(json.dumps(brief, indent=1))
    if cfg.out:
        print(f"wrote {cfg.out}/rounds.jsonl, summary.json, accuracy_vs_bytes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
