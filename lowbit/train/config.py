"""Configuration: one dataclass per concern (codec, transport, optim, run), loadable from YAML,
overridable from the CLI, validated before any process starts (:func:`lowbit.train.preflight.preflight`
adds the checks that read files: the task's data, the model, the output folder, the checkpoint)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import ConfigError

TRANSPORTS = ("ps", "ring", "tree", "ray")
W_SCHEMES = ("laq-linear", "laq-log", "lat", "lat2", "twn", "binary")
SCHEMES = ("none", "ternarybert", "q8bert")  # model wrappers a run can train with
GRAD_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)
G_SCHEMES = ("stochastic", "threshold")
WEIGHT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
FAULT_KINDS = ("kill-rank", "kill-worker", "kill-server")


@dataclass(frozen=True)
class Fault:
    """An injected fault: rank ``rank`` dies abruptly (``os._exit``, no cleanup, like a SIGKILL) in the
    middle of step ``step`` (1-based), after computing its gradients and before sending anything.
    Ranks are numbered as in the parameter server (servers 0..S-1, then the workers) for the ray
    transport too, where Ray replaces the killed worker actor."""

    kind: str
    rank: int
    step: int


def parse_fault(spec: str) -> Fault | None:
    """``kill-worker:R@S`` / ``kill-server:R@S`` / ``kill-rank:R@S`` (see :class:`Fault`); "" is none."""
    if not spec:
        return None
    kind, _, where = spec.partition(":")
    who, _, at = where.partition("@")
    if kind not in FAULT_KINDS or not who.isdigit() or not at.isdigit() or int(at) < 1:
        raise ConfigError(f"fault must look like kill-worker:RANK@STEP (kinds {', '.join(FAULT_KINDS)}, "
                          f"STEP >= 1), got {spec!r}")
    return Fault(kind, int(who), int(at))


def _finite(name: str, v, lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {v!r}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ConfigError(f"{name} must be {'<' if hi_open else '<='} {hi:g}, got {v!r}")


def _at_least(name: str, v: int, lo: int) -> None:
    if v < lo:
        raise ConfigError(f"{name} must be >= {lo}, got {v!r}")


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
    delta_weights: bool = True  # weights down as the codes that changed since the last step (exact)
    sparse_embeddings: bool = True  # embedding gradients without their all-zero rows (exact)
    scale_hold: float = 0.0  # LAQ keeps last step's scale while the new one is within this relative distance
    g_scheme: str = "stochastic"  # stochastic (clipped, unbiased) | threshold (ternary, needs error feedback)
    g_threshold: float = 1.5  # threshold: gradients above g_threshold * rms(g) are sent
    entropy_grads: bool = False  # matrix gradients' codes rANS-coded (exact; costs the receiver CPU)
    keyframe_every: int = 100   # with delta_weights, whole weight frames every N steps (0 = only when needed)
    scheme: str = "none"  # ternarybert | q8bert: workers run the wrapped model; the scheme sets the widths

    def validate(self) -> None:
        for name in ("w_bits", "embed_bits", "head_bits", "small_bits"):
            v = getattr(self, name)
            if v not in WEIGHT_BITS:
                raise ConfigError(f"{name} must be one of {WEIGHT_BITS}, got {v!r}")
        for name in ("g_bits", "small_g_bits"):
            v = getattr(self, name)
            if v not in GRAD_BITS:
                raise ConfigError(f"{name} must be one of {GRAD_BITS}, got {v!r}")
        _finite("scale_hold", self.scale_hold, 0, 1, hi_open=True)
        if self.g_scheme not in G_SCHEMES:
            raise ConfigError(f"g_scheme must be one of {G_SCHEMES}, got {self.g_scheme!r}")
        if self.g_scheme == "threshold":
            if self.g_bits != 2:
                raise ConfigError(f"threshold gradients are ternary: g_bits must be 2, got {self.g_bits}")
            if not self.error_feedback:
                raise ConfigError("threshold gradients are biased: they need error feedback (--error-feedback)")
            _finite("g_threshold", self.g_threshold, 0)
        if self.w_scheme not in W_SCHEMES:
            raise ConfigError(f"w_scheme must be one of {W_SCHEMES}, got {self.w_scheme!r}")
        if self.w_scheme in ("lat", "lat2", "twn") and self.w_bits not in (2, 16, 32):
            raise ConfigError(f"w_scheme {self.w_scheme!r} is ternary: w_bits must be 2, got {self.w_bits}")
        _finite("clip", self.clip, 0, lo_open=True)
        if self.nonfinite not in ("error", "skip", "zero"):
            raise ConfigError(f"nonfinite must be error|skip|zero, got {self.nonfinite!r}")
        _at_least("max_piece_numel", self.max_piece_numel, 0)
        _at_least("keyframe_every", self.keyframe_every, 0)
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")


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
        _at_least("workers", self.workers, 1)
        if self.kind in ("ps", "ray"):
            _at_least("servers", self.servers, 1)
        if self.kind == "tree" and self.workers & (self.workers - 1):
            raise ConfigError(f"tree transport needs a power-of-two number of ranks, got {self.workers}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"backend must be auto|gloo|nccl, got {self.backend!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535 (0 = a free one), got {self.port}")
        _finite("timeout_s", self.timeout_s, 0, lo_open=True)
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
    def n_servers(self) -> int:
        """Server ranks (0..S-1) of the parameter-server layout; 0 where every rank owns a shard."""
        return self.servers if self.kind in ("ps", "ray") else 0

    @property
    def world_size(self) -> int:
        return self.workers + self.n_servers


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
        _finite("lr", self.lr, 0, lo_open=True)
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers, got {self.betas!r}")
        for i, b in enumerate(self.betas):
            _finite(f"betas[{i}]", b, 0, 1, hi_open=True)
        _finite("eps", self.eps, 0, lo_open=True)
        _finite("momentum", self.momentum, 0, 1)
        _finite("weight_decay", self.weight_decay, 0)
        _at_least("warmup_steps", self.warmup_steps, 0)
        _finite("laq_eps", self.laq_eps, 0, lo_open=True)


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
    keep_checkpoints: int = 3  # newest checkpoints kept (the one resumed from is never removed by its run)
    seed: int = 0
    out: str = "runs/latest"
    resume: bool = False
    progress: bool = True
    threads_per_rank: int = 0  # 0 = cores / ranks
    dropout: float | None = None  # override the model's dropout (0 for exact-equivalence tests)
    fault: str = ""  # fault injection, e.g. "kill-worker:1@5"
    teacher: str = ""  # distill from this model folder or lowbit run folder ("" = train on the labels)
    distill: str = "workers"  # workers: the teacher runs on every worker | logits: its logits cached once
    distill_weights: str = "logits=1,hidden=1,attention=1,label=0"  # TernaryBERT's terms
    distill_temperature: float = 1.0

    def validate(self) -> None:
        _at_least("steps", self.steps, 1)
        _at_least("batch_size", self.batch_size, 1)
        if not 8 <= self.max_len <= 4096:
            raise ConfigError(f"max_len must be in 8..4096, got {self.max_len}")
        for name in ("train_subset", "eval_subset", "eval_every", "checkpoint_every", "seed", "threads_per_rank"):
            _at_least(name, getattr(self, name), 0)
        _at_least("log_every", self.log_every, 1)
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)
        if self.dropout is not None:
            _finite("dropout", self.dropout, 0, 1, hi_open=True)
        if not self.out:
            raise ConfigError("out must name a folder")
        parse_fault(self.fault)
        if self.distill not in ("workers", "logits"):
            raise ConfigError(f"distill must be workers|logits, got {self.distill!r}")
        _finite("distill_temperature", self.distill_temperature, 0, lo_open=True)
        if self.teacher:
            parse_weights(self.distill_weights, self.distill)


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _check_type(section: str, f: dataclasses.Field, v: Any) -> Any:
    """``v`` as the field's declared type (an int where a float is declared is taken as a float); a
    value of another type (a string for an int, a bool for a number) raises ConfigError."""
    ann = str(f.type).replace(" ", "")
    optional = ann.endswith("|None")
    base = ann.removesuffix("|None")
    if v is None:
        if optional:
            return None
        raise ConfigError(f"{section}.{f.name} must be given (got null)")
    if base == "tuple[float,float]":
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return tuple(float(x) for x in v)
        raise ConfigError(f"{section}.{f.name} must be two numbers, got {v!r}")
    typ = _SCALARS.get(base)
    if typ is None:  # pragma: no cover - every field has one of the types above
        return v
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, bool) and typ is not bool or not isinstance(v, typ):
        raise ConfigError(f"{section}.{f.name} must be {'a number' if typ in (int, float) else 'a ' + base}"
                          f"{' (an integer)' if typ is int else ''}, got {v!r}")
    return v


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
        fault = parse_fault(self.run.fault)
        if fault is not None:
            S, world = self.transport.n_servers, self.transport.world_size
            ranks = {"kill-rank": range(world), "kill-worker": range(S, world), "kill-server": range(S)}[fault.kind]
            if fault.rank not in ranks:
                raise ConfigError(f"fault {self.run.fault!r}: rank {fault.rank} is not a "
                                  f"{fault.kind.removeprefix('kill-')} rank of this run (those are "
                                  f"{list(ranks) or 'none'})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"a config holds sections codec|transport|optim|run, got {type(d).__name__}")
        out = cls()
        for section, values in d.items():
            if section not in ("codec", "transport", "optim", "run"):
                raise ConfigError(f"unknown config section {section!r}; expected codec|transport|optim|run")
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must map options to values, got {values!r}")
            out.override(section, values or {})
        return out

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} is not a file")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(p)!r} cannot be read: {e}") from None
        return cls.from_dict(data or {})

    def override(self, section: str, values: dict[str, Any]) -> "Config":
        obj = getattr(self, section)
        names = {f.name: f for f in dataclasses.fields(obj)}
        for k, v in values.items():
            if k not in names:
                raise ConfigError(f"unknown option {section}.{k}; known: {sorted(names)}")
            setattr(obj, k, _check_type(section, names[k], v))
        return self


__all__ = ["Config", "CodecConfig", "TransportConfig", "OptimConfig", "RunConfig", "Fault", "parse_fault",
           "TRANSPORTS", "W_SCHEMES", "SCHEMES", "parse_weights", "DISTILL_TERMS", "GRAD_BITS", "WEIGHT_BITS", "FAULT_KINDS"]


DISTILL_TERMS = ("logits", "hidden", "attention", "label")


def parse_weights(spec: str, mode: str) -> dict[str, float]:
    """``"logits=1,hidden=1,attention=1,label=0"`` -> {term: weight}; unnamed terms are 0. The
    ``logits`` mode has no teacher on the workers: hidden and attention must be 0."""
    out = dict.fromkeys(DISTILL_TERMS, 0.0)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name.strip() not in DISTILL_TERMS:
            raise ConfigError(f"distill_weights: {part!r} is not TERM=WEIGHT with TERM one of {DISTILL_TERMS}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"distill_weights: {value!r} is not a number") from None
    if mode == "logits" and (out["hidden"] or out["attention"]):
        raise ConfigError("--distill logits caches the teacher's logits only: hidden and attention weights must be 0")
    if not any(out.values()):
        raise ConfigError("distill_weights: every term is 0")
    return out
