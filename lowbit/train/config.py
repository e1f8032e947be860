"""Configuration: one dataclass per concern, loadable from YAML, overridable from the CLI, validated
before any process starts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import ConfigError

TRANSPORTS = ("ps", "ring", "tree", "ray")
W_SCHEMES = ("laq-linear", "laq-log", "lat", "lat2", "twn", "binary")
GRAD_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)
WEIGHT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)


def parse_fault(spec: str) -> tuple[str, int, int] | None:
    """``kill-worker:R@S`` / ``kill-server:R@S`` / ``kill-rank:R@S``: rank R dies abruptly (os._exit,
    no cleanup, like a SIGKILL) in the middle of step S (1-based), after computing its gradients and
    before sending anything."""
    if not spec:
        return None
    kind, _, where = spec.partition(":")
    who, _, at = where.partition("@")
    if kind not in ("kill-rank", "kill-worker", "kill-server") or not who.isdigit() or not at.isdigit():
        raise ConfigError(f"fault spec must look like kill-worker:RANK@STEP, got {spec!r}")
    return kind, int(who), int(at)



@dataclass
class CodecConfig:
    """What goes on the wire. ``w_bits`` applies to Transformer weight matrices, ``embed_bits`` to
    embedding tables, ``head_bits`` to the classifier/pooler, ``small_bits`` to 1-D tensors
    (LayerNorm, biases). Gradients of 2-D tensors use ``g_bits`` (clipped stochastic, 32 = fp32,
    16 = fp16); gradients of 1-D tensors use ``small_g_bits``."""

    w_bits: int = 2
    g_bits: int = 3
    w_scheme: str = "laq-linear"
    per_row: bool = False
    embed_bits: int = 8
    head_bits: int = 8
    small_bits: int = 32
    small_g_bits: int = 32
    clip: float = 3.0
    error_feedback: bool = False
    nonfinite: str = "error"  # error | skip | zero
    max_piece_numel: int = 2_097_152  # larger matrices travel (and are owned) as blocks of rows; 0 = never

    def validate(self) -> None:
        for name in ("w_bits", "embed_bits", "head_bits", "small_bits"):
            v = getattr(self, name)
            if v not in WEIGHT_BITS:
                raise ConfigError(f"{name} must be one of {WEIGHT_BITS}, got {v!r}")
        for name in ("g_bits", "small_g_bits"):
            v = getattr(self, name)
            if v not in GRAD_BITS:
                raise ConfigError(f"{name} must be one of {GRAD_BITS}, got {v!r}")
        if self.w_scheme not in W_SCHEMES:
            raise ConfigError(f"w_scheme must be one of {W_SCHEMES}, got {self.w_scheme!r}")
        if self.w_scheme in ("lat", "lat2", "twn") and self.w_bits not in (2, 16, 32):
            raise ConfigError(f"w_scheme {self.w_scheme!r} is ternary: w_bits must be 2, got {self.w_bits}")
        if not self.clip > 0:
            raise ConfigError(f"clip must be > 0, got {self.clip!r}")
        if self.nonfinite not in ("error", "skip", "zero"):
            raise ConfigError(f"nonfinite must be error|skip|zero, got {self.nonfinite!r}")
        if self.max_piece_numel < 0:
            raise ConfigError(f"max_piece_numel must be >= 0, got {self.max_piece_numel}")


@dataclass
class TransportConfig:
    kind: str = "ring"
    workers: int = 4
    servers: int = 1  # ps only
    backend: str = "auto"  # auto | gloo | nccl
    addr: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    timeout_s: float = 300.0
    ray_address: str = ""  # ray only: "" = $LOWBIT_RAY_ADDRESS or a local cluster; "auto" or host:port
    ray_temp_dir: str = ""  # ray only: a local cluster's session files ("" = lowbit.comm.ray.default_temp_dir())
    on_worker_failure: str = "stop"  # stop | continue (ps: servers drop a dead worker and go on)
    chunks: int = 10  # ps: key groups per step (the last four halving), each decoded while the next arrives
    recv_window: int = 2  # ps: gradient chunks per worker a server has posted ahead (0 = all at once)
    weights_channel: bool = True  # ps: weights go down on connections of their own (see ParameterServerTransport)

    def validate(self) -> None:
        if self.kind not in TRANSPORTS:
            raise ConfigError(f"unknown transport {self.kind!r}; expected one of {TRANSPORTS}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.kind in ("ps", "ray"):
            if self.servers < 1:
                raise ConfigError(f"servers must be >= 1, got {self.servers}")
        if self.kind == "tree" and self.workers & (self.workers - 1):
            raise ConfigError(f"tree transport needs a power-of-two number of ranks, got {self.workers}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"backend must be auto|gloo|nccl, got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not 1 <= self.chunks <= 64:
            raise ConfigError(f"chunks must be in 1..64, got {self.chunks}")
        if not 0 <= self.recv_window <= 64:
            raise ConfigError(f"recv_window must be in 0..64 (0 = every receive posted at once), got {self.recv_window}")
        if self.on_worker_failure not in ("stop", "continue"):
            raise ConfigError(f"on_worker_failure must be stop|continue, got {self.on_worker_failure!r}")
        if self.on_worker_failure == "continue" and self.kind in ("ring", "tree"):
            raise ConfigError(f"on_worker_failure=continue needs the ps transport (or ray): in {self.kind} every "
                              "rank owns a shard, so a lost rank loses weights; use stop and --resume")

    @property
    def world_size(self) -> int:
        return self.workers + (self.servers if self.kind == "ps" else 0)


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 10
    laq_eps: float = 1e-8  # D = diag(sqrt(v_hat)) + laq_eps

    def validate(self) -> None:
        if self.name not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be adam|sgd, got {self.name!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class RunConfig:
    model: str = "minilm"  # pretrained: the defaults fine-tune something real (tiny-bert is for smoke runs)
    task: str = "SST-2"
    data_dir: str = ""  # folder holding glue/<TASK>/; "" = $LOWBIT_DATA, else the SST-2 copy in the package
    steps: int = 100
    batch_size: int = 8  # per worker
    max_len: int = 64
    train_subset: int = 0  # 0 = all
    eval_subset: int = 0   # 0 = all of dev
    eval_every: int = 0    # 0 = only at the end
    log_every: int = 1
    checkpoint_every: int = 0  # 0 = only at the end
    seed: int = 0
    out: str = "runs/latest"
    resume: bool = False
    progress: bool = True
    threads_per_rank: int = 0  # 0 = cores / ranks
    dropout: float | None = None  # override the model's dropout (0 for exact-equivalence tests)
    fault: str = ""  # fault injection, e.g. "kill-worker:1@5"

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_len < 8:
            raise ConfigError(f"max_len must be >= 8, got {self.max_len}")
        if self.fault:
            parse_fault(self.fault)


@dataclass
class Config:
    codec: CodecConfig = field(default_factory=CodecConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        self.codec.validate()
        self.transport.validate()
        self.optim.validate()
        self.run.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        out = cls()
        for section, values in (d or {}).items():
            if not hasattr(out, section):
                raise ConfigError(f"unknown config section {section!r}; expected codec|transport|optim|run")
            out.override(section, values or {})
        return out

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        with open(path) as fh:
            return cls.from_dict(yaml.safe_load(fh) or {})

    def override(self, section: str, values: dict[str, Any]) -> "Config":
        obj = getattr(self, section)
        names = {f.name: f for f in dataclasses.fields(obj)}
        for k, v in values.items():
            if k not in names:
                raise ConfigError(f"unknown option {section}.{k}; known: {sorted(names)}")
            if k == "betas" and v is not None:
                v = tuple(v)
            setattr(obj, k, v)
        return self
