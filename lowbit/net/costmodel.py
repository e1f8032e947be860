"""Alpha-beta (Hockney) cost model of the communication in one training step.

Notation: ``p`` ranks, ``n`` parameters, link rate ``B`` bit/s per direction (full duplex, every
endpoint has its own link to a non-blocking switch), ``α`` seconds per message (latency plus
per-message software overhead), ``γ`` seconds of codec work per byte of fp32 data passing through
an encoder or decoder, ``h`` header bytes per message, ``η`` link efficiency (fraction of ``B``
that reaches the application; 1 in the pure model, fitted by :func:`fit`).

Every method's time is linear in (α, 1/η, γ)::

    T = α · M  +  (V · 8 / B) / η  +  γ · C

with ``M`` messages on the critical path, ``V`` bytes over the busiest link on the critical path
and ``C`` codec bytes; :func:`terms` returns (M, V, C), :func:`predict` evaluates T.

Payloads: ``Pg = ceil(n · g_bits / 8)`` (quantized gradient), ``Pw = ceil(n · w_bits / 8)``
(quantized weights), ``L = log2 p`` (ceil for p not a power of two).

* ``allreduce`` (ring, fp32 g_bits=32 or fp16 hook g_bits=16, payload ``P = n·g_bits/8``):
  ``T = 2(p−1)α + 2(p−1)/p · (P + h·p)·8/B``  (reduce-scatter + all-gather, chunks of P/p).
* ``powersgd`` rank r over 2-D shapes (m_i, k_i) plus 1-D params (u elements, fp32):
  three fp32 ring all_reduces (P matrices ``4·r·Σm_i`` bytes, Q matrices ``4·r·Σk_i`` bytes,
  uncompressed 1-D params ``4u`` bytes), each ``2(p−1)α + 2(p−1)/p·bytes·8/B``.
  Without shapes, n is treated as one square sqrt(n)×sqrt(n) matrix.
* ``ps`` with S separate servers, W workers (shard of 1/S per server). Two phases, each limited by
  its busiest NIC::

      up   = max(worker sends Pg + S·h,   server receives W·(Pg/S + h))
      down = max(worker receives Pw + S·h, server sends   W·(Pw/S + h))
      T = 2·max(W, S)·α + (up + down)·8/B + γ·C

  Co-located (``servers=None``: every one of the p ranks is a worker and the server of 1/p of
  the parameters; its own shard stays local)::

      T = 2(p−1)α + (p−1)/p·(Pg + Pw)·8/B + 2(p−1)·h·8/B + γ·C

  which is the ring volume: co-located PS and the ring differ in message scheduling, not bytes.
* ``ring`` (shifted all-to-all of gradient payloads, p−1 steps, then ring all-gather of weight
  payloads, p−1 steps): ``T = 2(p−1)α + (p−1)/p·(Pg + Pw)·8/B + 2(p−1)·h·8/B + γ·C``.
* ``tree`` (recursive-halving all-to-all of gradients: L steps, each forwarding half of what it
  holds, L/2·Pg in all; recursive-doubling all-gather of weights, (p−1)/p·Pw):
  ``T = 2Lα + (L/2·Pg + (p−1)/p·Pw)·8/B + 2L·h·8/B + γ·C``.

Codec bytes ``C`` for the lowbit kinds: the worker encodes its gradient (4n) and decodes the
weights (4n); a server of a 1/S shard decodes W gradient shards (4n·W/S) and encodes its weight
shard (4n/S): ``C = 4n·(2 + (W+1)/S)`` (= ``4n·(3 + 1/p)`` when W = S = p). The fp32/fp16/PowerSGD
baselines have ``C = 0`` by default (a cast is memory bound; PowerSGD's matmuls are compute,
not per-byte codec work); ``Method.codec_passes`` overrides it (C = codec_passes·4n).

Extrapolation to clusters (:func:`extrapolate`) assumes the inter-node link is the only
bottleneck: each node is one endpoint (p = nodes) and the reduction among the GPUs inside a
node is free (NVLink/PCIe ≫ network); gpus_per_node is reported, not modelled.

Pure Python + numpy; no scipy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import numpy as np

from lowbit.errors import ConfigError

__all__ = [
    "DEFAULT_HEADER_BYTES",
    "FitResult",
    "METHODS",
    "Method",
    "Terms",
    "bert_param_shapes",
    "bytes_per_rank",
    "extrapolate",
    "fit",
    "holdout",
    "measure_gamma",
    "measure_gamma_numpy",
    "predict",
    "terms",
]

DEFAULT_HEADER_BYTES = 64
KINDS = ("allreduce", "powersgd", "ps", "ring", "tree")


@dataclass(frozen=True)
class Method:
    """A way to communicate one step.

    kind: one of ``allreduce`` (fp32/fp16 ring all_reduce, g_bits = 32/16), ``powersgd``,
    ``ps``, ``ring``, ``tree``. ``g_bits``/``w_bits``: bits per gradient / weight element on the
    wire (w_bits unused by allreduce/powersgd, which send no weights). ``servers``: PS server
    count, None = co-located with the p workers. ``shapes``: parameter shapes (PowerSGD needs the
    2-D ones). ``codec_passes``: override of C/(4n).
    """

    name: str
    kind: str
    g_bits: float = 32
    w_bits: float = 32
    rank: int = 4
    servers: int | None = None
    shapes: tuple[tuple[int, ...], ...] | None = None
    codec_passes: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"Method.kind must be one of {KINDS}, got {self.kind!r}")
        if not (0 < self.g_bits <= 32 and 0 < self.w_bits <= 32):
            raise ConfigError(f"bits must be in (0, 32], got g_bits={self.g_bits} w_bits={self.w_bits}")
        if self.rank < 1:
            raise ConfigError(f"PowerSGD rank must be >= 1, got {self.rank}")
        if self.servers is not None and self.servers < 1:
            raise ConfigError(f"servers must be >= 1 or None, got {self.servers}")


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fp32", "allreduce", g_bits=32),
        Method("fp16", "allreduce", g_bits=16),
        Method("powersgd4", "powersgd", rank=4),
        Method("lowbit_ps", "ps", g_bits=2, w_bits=2),
        Method("lowbit_ring", "ring", g_bits=2, w_bits=2),
        Method("lowbit_tree", "tree", g_bits=2, w_bits=2),
    )
}


@dataclass(frozen=True)
class Terms:
    """Coefficients of T = α·messages + (wire_bytes·8/B)/η + γ·codec_bytes; ``sent``/``received``
    are one (worker) rank's bytes per step including headers."""

    messages: float
    wire_bytes: float
    codec_bytes: float
    sent: float
    received: float


def _log2(p: int) -> int:
    return max(0, math.ceil(math.log2(p))) if p > 1 else 0


def _powersgd_sizes(method: Method, n: int) -> tuple[list[float], int]:
    """Byte sizes of PowerSGD's all_reduces (P, Q, uncompressed) and the element count."""
    shapes = method.shapes
    if shapes is None:
        side = math.sqrt(n)
        shapes = ((side, side),)
    r = method.rank
    ones = sum(math.prod(s) for s in shapes if len(s) < 2)
    # a matrix whose rank-r factors would be larger than itself is sent uncompressed (as PowerSGD does)
    p_b, q_b, u_b = 0.0, 0.0, 4.0 * ones
    for s in shapes:
        if len(s) < 2:
            continue
        m, k = s[0], math.prod(s[1:])
        if r * (m + k) < m * k:
            p_b += 4.0 * r * m
            q_b += 4.0 * r * k
        else:
            u_b += 4.0 * m * k
    return [b for b in (p_b, q_b, u_b) if b > 0], int(round(sum(math.prod(s) for s in shapes)))


def terms(method: Method, p: int, n: int, header_bytes_per_msg: int = DEFAULT_HEADER_BYTES) -> Terms:
    """(M, V, C) of :data:`module docstring <lowbit.net.costmodel>` for ``method`` on p ranks."""
    if p < 1:
        raise ConfigError(f"p must be >= 1, got {p}")
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    h = float(header_bytes_per_msg)
    k = method.kind
    if p == 1 and k in ("allreduce", "powersgd"):
        return Terms(0, 0, 0, 0, 0)
    Pg = math.ceil(n * method.g_bits / 8)
    Pw = math.ceil(n * method.w_bits / 8)
    if k == "allreduce":
        m = 2 * (p - 1)
        v = 2 * (p - 1) / p * (Pg + h * p)
        t = Terms(m, v, 0.0, v, v)
    elif k == "powersgd":
        sizes, _ = _powersgd_sizes(method, n)
        m = 2 * (p - 1) * len(sizes)
        v = sum(2 * (p - 1) / p * (b + h * p) for b in sizes)
        t = Terms(m, v, 0.0, v, v)
    elif k == "ps" and method.servers is not None:
        S, W = method.servers, p
        up_worker, up_server = Pg + S * h, W * (Pg / S + h)
        dn_worker, dn_server = Pw + S * h, W * (Pw / S + h)
        v = max(up_worker, up_server) + max(dn_worker, dn_server)
        t = Terms(2 * max(W, S), v, 4.0 * n * (2 + (W + 1) / S), up_worker, dn_worker)
    elif k in ("ps", "ring"):  # co-located PS has the ring's volume
        m = 2 * (p - 1)
        v = (p - 1) / p * (Pg + Pw) + m * h
        t = Terms(m, v, 4.0 * n * (3 + 1 / p), v, v)
    else:  # tree
        L = _log2(p)
        m = 2 * L
        v = L / 2 * Pg + (p - 1) / p * Pw + m * h
        t = Terms(m, v, 4.0 * n * (3 + 1 / p), v, v)
    if method.codec_passes is not None:
        t = replace(t, codec_bytes=4.0 * n * method.codec_passes)
    return t


def predict(method: Method, p: int, n: int, rate_bps: float, alpha_s: float = 0.0,
            gamma_s_per_byte: float = 0.0, header_bytes_per_msg: int = DEFAULT_HEADER_BYTES,
            efficiency: float = 1.0, t0_s: float = 0.0) -> float:
    """Seconds of communication (+ codec) for one step: ``t0 + α·M + V·8/(η·B) + γ·C``."""
    if not rate_bps > 0:
        raise ConfigError(f"rate_bps must be > 0, got {rate_bps}")
    if not efficiency > 0:
        raise ConfigError(f"efficiency must be > 0, got {efficiency}")
    t = terms(method, p, n, header_bytes_per_msg)
    return t0_s + alpha_s * t.messages + t.wire_bytes * 8 / (rate_bps * efficiency) + gamma_s_per_byte * t.codec_bytes


def bytes_per_rank(method: Method, p: int, n: int, header_bytes_per_msg: int = DEFAULT_HEADER_BYTES) -> int:
    """Bytes one (worker) rank sends per step, headers included (``Terms.sent``, rounded up)."""
    return int(math.ceil(terms(method, p, n, header_bytes_per_msg).sent - 1e-9))


# ----------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """α, η (and γ, t0 when fitted) from :func:`fit`, with goodness of fit on the records used.

    ``stderr``: standard errors of the fitted coefficients (``alpha_s``, ``inv_efficiency``, and
    ``gamma_s_per_byte`` / ``t0_s`` when fitted) from the weighted least-squares covariance
    ``s²·(AᵀA)⁻¹``, ``s² = RSS/(N − k)``; empty when N = k (no residual degrees of freedom) or the
    design is singular. A standard error as large as the value means the data do not determine it.
    """

    alpha_s: float
    efficiency: float
    gamma_s_per_byte: float
    t0_s: float
    header_bytes_per_msg: int
    r2: float
    rel_err: list[float] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    stderr: dict[str, float] = field(default_factory=dict)

    def predict(self, method: Method | str, p: int, n: int, rate_bps: float) -> float:
        return predict(_method(method), p, n, rate_bps, self.alpha_s, self.gamma_s_per_byte,
                       self.header_bytes_per_msg, self.efficiency, self.t0_s)

    @property
    def max_rel_err(self) -> float:
        return max((abs(e) for e in self.rel_err), default=0.0)


def _method(m: Method | str) -> Method:
    if isinstance(m, Method):
        return m
    if m not in METHODS:
        raise ConfigError(f"unknown method {m!r}; known: {sorted(METHODS)} (or pass a Method)")
    return METHODS[m]


def fit(measurements: Sequence[dict], gamma_s_per_byte: float | None = 0.0, intercept: bool = False,
        header_bytes_per_msg: int = DEFAULT_HEADER_BYTES) -> FitResult:
    """Least-squares fit of α and η (and γ when ``gamma_s_per_byte is None``, and a constant
    ``t0`` when ``intercept``) to records ``{method, p, n, rate_bps, step_s}``.

    The model is linear: ``step_s − γ·C = α·M + (1/η)·(V·8/B) [+ t0]``; solved with
    ``numpy.linalg.lstsq`` on rows scaled by 1/step_s, so every record weighs by its relative
    error. ``method`` is a :class:`Method` or a name in :data:`METHODS`.
    """
    if not measurements:
        raise ConfigError("fit needs at least one measurement")
    rows, y = [], []
    gamma_fixed = gamma_s_per_byte
    for rec in measurements:
        for key in ("method", "p", "n", "rate_bps", "step_s"):
            if key not in rec:
                raise ConfigError(f"measurement {rec!r} lacks {key!r}")
        t = terms(_method(rec["method"]), int(rec["p"]), int(rec["n"]), header_bytes_per_msg)
        row = [t.messages, t.wire_bytes * 8 / float(rec["rate_bps"])]
        target = float(rec["step_s"])
        if gamma_fixed is None:
            row.append(t.codec_bytes)
        else:
            target -= gamma_fixed * t.codec_bytes
        if intercept:
            row.append(1.0)
        w = 1.0 / max(float(rec["step_s"]), 1e-12)
        rows.append([c * w for c in row])
        y.append(target * w)
    A, b = np.asarray(rows, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(y) < A.shape[1]:
        raise ConfigError(f"fit needs at least {A.shape[1]} measurements, got {len(y)}")
    coef, *_ = np.linalg.lstsq(A, b, rcond=None)
    names = ["alpha_s", "inv_efficiency"] + (["gamma_s_per_byte"] if gamma_fixed is None else []) + (
        ["t0_s"] if intercept else [])
    stderr: dict[str, float] = {}
    dof = len(y) - A.shape[1]
    if dof > 0 and np.linalg.matrix_rank(A) == A.shape[1]:
        s2 = float(np.sum((A @ coef - b) ** 2)) / dof
        cov = s2 * np.linalg.inv(A.T @ A)
        stderr = {k: float(math.sqrt(max(cov[i, i], 0.0))) for i, k in enumerate(names)}
    alpha, inv_eta = float(coef[0]), float(coef[1])
    i = 2
    gamma = gamma_fixed if gamma_fixed is not None else float(coef[i])
    i += gamma_fixed is None
    t0 = float(coef[i]) if intercept else 0.0
    eta = 1.0 / inv_eta if inv_eta > 0 else float("inf")
    res = FitResult(alpha, eta, gamma, t0, header_bytes_per_msg, r2=0.0, records=list(measurements), stderr=stderr)
    pred = np.array([res.predict(r["method"], int(r["p"]), int(r["n"]), float(r["rate_bps"])) for r in measurements])
    obs = np.array([float(r["step_s"]) for r in measurements])
    ss_res = float(np.sum((obs - pred) ** 2))
    ss_tot = float(np.sum((obs - obs.mean()) ** 2))
    res.r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    res.rel_err = [float((pr - ob) / ob) for pr, ob in zip(pred, obs)]
    return res


def holdout(measurements: Sequence[dict], group: Callable[[dict], object] = lambda rec: rec["rate_bps"],
            **fit_kwargs) -> list[dict]:
    """Leave-one-group-out check of :func:`fit`: for every value ``g`` of ``group(rec)`` (by default
    the link rate), fit on the records of the other groups and predict the records of ``g``.

    Returns one dict per measurement, in input order: ``{"group", "measured_s", "predicted_s",
    "rel_err", "alpha_s", "efficiency"}`` (the last two from the fit that did not see the record).
    ``fit_kwargs`` go to :func:`fit` (``gamma_s_per_byte``, ``intercept``, ``header_bytes_per_msg``).
    Needs at least two groups; a fold with fewer records than coefficients raises ConfigError.
    """
    keys = [group(rec) for rec in measurements]
    groups = list(dict.fromkeys(keys))
    if len(groups) < 2:
        raise ConfigError(f"holdout needs at least 2 groups, got {groups}")
    out: list[dict | None] = [None] * len(measurements)
    for g in groups:
        train = [rec for rec, k in zip(measurements, keys) if k != g]
        res = fit(train, **fit_kwargs)
        for i, (rec, k) in enumerate(zip(measurements, keys)):
            if k != g:
                continue
            pred = res.predict(rec["method"], int(rec["p"]), int(rec["n"]), float(rec["rate_bps"]))
            obs = float(rec["step_s"])
            out[i] = {"group": g, "measured_s": obs, "predicted_s": pred, "rel_err": (pred - obs) / obs,
                      "alpha_s": res.alpha_s, "efficiency": res.efficiency}
    return [o for o in out if o is not None]


# ----------------------------------------------------------------------------------------------
def bert_param_shapes(layers: int = 12, hidden: int = 768, intermediate: int = 3072, vocab: int = 30522,
                      max_positions: int = 512, type_vocab: int = 2) -> tuple[tuple[int, ...], ...]:
    """Parameter shapes of a BERT encoder (BERT-base by default, ~109M parameters)."""
    s: list[tuple[int, ...]] = [(vocab, hidden), (max_positions, hidden), (type_vocab, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(4):  # q, k, v, attention output
            s += [(hidden, hidden), (hidden,)]
        s += [(hidden,), (hidden,)]  # attention LayerNorm
        s += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,)]
        s += [(hidden,), (hidden,)]  # output LayerNorm
    s += [(hidden, hidden), (hidden,)]  # pooler
    return tuple(s)


BERT_BASE_N = sum(math.prod(s) for s in bert_param_shapes())


def extrapolate(fit_result: FitResult, methods: Iterable[Method | str], nodes: Sequence[int] = (16, 256),
                gpus_per_node: int = 4, rates: Sequence[float] = (1e9, 1e10), n: int = BERT_BASE_N) -> list[dict]:
    """Predicted step communication time for every (method, nodes, rate).

    Assumption (stated in every record): the inter-node link is the bottleneck; each node is one
    endpoint (p = nodes) and intra-node reduction among its ``gpus_per_node`` GPUs is free.
    """
    out = []
    for m in methods:
        meth = _method(m)
        if meth.kind == "powersgd" and meth.shapes is None and n == BERT_BASE_N:
            meth = replace(meth, shapes=bert_param_shapes())
        for nd in nodes:
            for rate in rates:
                t = terms(meth, int(nd), int(n), fit_result.header_bytes_per_msg)
                out.append({
                    "method": meth.name, "kind": meth.kind, "nodes": int(nd), "gpus_per_node": int(gpus_per_node),
                    "gpus": int(nd) * int(gpus_per_node), "p": int(nd), "rate_bps": float(rate), "n": int(n),
                    "step_s": fit_result.predict(meth, int(nd), int(n), float(rate)),
                    "bytes_per_node": bytes_per_rank(meth, int(nd), int(n), fit_result.header_bytes_per_msg),
                    "messages": t.messages,
                    "assumption": "inter-node link is the bottleneck; one endpoint per node; intra-node reduction free",
                })
    return out


# ----------------------------------------------------------------------------------------------
def measure_gamma(encode_decode: Callable[[np.ndarray], object], n: int = 1 << 20, repeats: int = 5) -> float:
    """γ in s/byte: best-of-``repeats`` time of ``encode_decode(x)`` on ``n`` fp32 values, / 4n.

    Pass the real codec (e.g. a closure over lowbit.codec's encode+decode) from a layer above.
    """
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    encode_decode(x)  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        encode_decode(x)
        best = min(best, time.perf_counter() - t0)
    return best / (4.0 * n)


def measure_gamma_numpy(bits: int = 2, n: int = 1 << 20, repeats: int = 5) -> float:
    """γ of a plain-numpy stand-in codec: clip at 2.5σ, stochastic ``bits``-bit rounding, pack
    into bytes, unpack, dequantize. A lower bound for what a real codec costs on this machine."""
    if bits not in (1, 2, 4, 8):
        raise ConfigError(f"measure_gamma_numpy supports bits in (1, 2, 4, 8), got {bits}")
    levels = (1 << bits) - 1
    per = 8 // bits
    rng = np.random.default_rng(1)

    def enc_dec(x: np.ndarray) -> np.ndarray:
        c = 2.5 * float(x.std()) + 1e-12
        u = (np.clip(x, -c, c) + c) * (levels / (2 * c))
        codes = np.floor(u + rng.random(x.shape, dtype=np.float32)).astype(np.uint8)
        codes = np.minimum(codes, levels).reshape(-1, per)
        packed = np.zeros(codes.shape[0], dtype=np.uint8)
        for j in range(per):
            packed |= codes[:, j] << (bits * j)
        back = np.stack([(packed >> (bits * j)) & levels for j in range(per)], axis=1).reshape(-1)
        return back.astype(np.float32) * (2 * c / levels) - c

    return measure_gamma(enc_dec, n=n - n % 8 or 8, repeats=repeats)
