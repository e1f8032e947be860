"""Rank-side machinery of the communication benchmarks (shared by comm_bandwidth.py and any
loopback variant): method names, parameter shapes, the per-rank measurement loop, byte formulas.

One rank process runs ``python benchmarks/_comm_common.py --rank-spec SPEC.json`` with RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and GLOO_SOCKET_IFNAME) in its environment; it measures every
(model, method) of the spec in sequence over one gloo process group, and rank 0 writes the records
to ``spec["out"]`` after each method (so a crash keeps what was measured).

What is timed (per step; every rank starts after a barrier, a step's time is the slowest rank's):

* ``fp32_allreduce``: ``dist.all_reduce`` of the gradient as a flat fp32 buffer split into
  ``bucket_mb`` buckets (DDP's default 25 MB), all issued async then waited, after ``div_(p)``.
* ``ddp_fp16`` / ``ddp_powersgd4`` / ``ddp_fp32``: ``loss.backward()`` of a DDP over a module whose
  parameters have the model's shapes, with the trivial loss ``Σ_p p.sum()`` (forward not timed),
  minus the median ``backward()`` of the same DDP with a no-op hook (the local autograd work); the
  raw backward time is kept as ``backward_s``. PowerSGD: rank 4, error feedback and warm start on,
  ``start_powerSGD_iter = 2`` whose two vanilla iterations are run as no-op (communication-free)
  iterations, then one compressed warm-up iteration, then the timed ones (all compressed). The
  PowerSGD future is waited inside the hook (buckets one after another; see ``_switch_hook``).
* ``lowbit_{ps,ring,tree}_w{W}g{G}``: one ``Transport.step`` (gradient frames up, weight frames
  down) with *precomputed* frames: gradients encoded with ``StochasticGradCodec(G)`` once; the
  owner is a stand-in whose ``weight_frames`` returns precomputed W-bit frames of exactly the size
  of ``WeightCodec("laq-linear", W)`` frames (per-tensor scale, symmetric grid). The step therefore
  includes the wire, framing, CRC checks, decoding + fp32 summing of the received gradients (into
  the transport's reused accumulator buffers) and decoding of all received weights (into
  persistent per-key tensors, as a training worker decodes into its parameters), but not the
  encoding. Encoding is timed separately on every rank at the same time (4 ranks share the machine's cores, as in the step): ``grad_encode_s``
  (StochasticGradCodec over all parameters) and ``weight_quant_s`` (real WeightCodec laq-linear
  with a D matrix, timed on a 1M-element sample and scaled to the owned shard, because it is far
  slower per byte than the other codec passes and would dominate the run; warm-started from the
  previous step's scale as the training server runs it; ``weight_quant_cold_s`` without the warm
  start). ``step_total_s = step_s + grad_encode_s + weight_quant_s``.
  ``decode_est_s`` is the part of ``step_s`` spent decoding (rates measured on a sample, scaled to
  what each rank decodes per step).
  With ``codec_device: "cuda"`` in the spec (``comm_bandwidth.py --codec-device cuda``) lowbit's
  codec runs on the GPU, as it would next to a GPU's gradients: gradients are encoded from GPU
  tensors, the transports decode and sum into GPU buffers (``Transport(device="cuda")``; the
  payload bytes still travel through gloo on the CPU) and weights land in GPU tensors; every timed
  region ends with ``torch.cuda.synchronize()``. The baselines (all_reduce, DDP hooks) stay on CPU
  tensors over gloo either way.

CPU per step (every method; over each rank's timed window, divided by the reps):
``cpu_per_rank`` = each rank process's user and system seconds (all its threads, getrusage) and
context switches, voluntary and not; ``cpu_host_core_s`` = the whole machine's core-seconds by kind
(/proc/stat: user, system, softirq (the kernel's network stack), idle, ...) as rank 0 saw them, and
``cpu_host_busy`` = the busy share of them. A step whose ``cpu_host_busy`` is near 1 waits for the
CPU, not for the link.

Bytes: ``bytes_per_rank`` = payload bytes the busiest rank sends per step (lowbit: the transport's
ByteCounter; all_reduce / DDP: the ring formula 2(p−1)/p·P, PowerSGD from its P, Q and
uncompressed sizes); ``wire_bytes_per_rank`` = max over ranks of max(tx, rx) bytes of the rank's
interface per step (``/proc/net/dev`` inside its namespace: TCP/IP headers and acks included).
"""
from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import math
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lowbit.testing import FrameOwner

LOWBIT_CONFIGS = {"w2g3": (2, 3), "w4g3": (4, 3), "w8g8": (8, 8)}  # name -> (w_bits, g_bits)
TRANSPORTS = ("ps", "ring", "tree")
BASELINES = ("fp32_allreduce", "ddp_fp16", "ddp_powersgd4")
LOWBIT_METHODS = tuple(f"lowbit_{t}_{c}" for c in LOWBIT_CONFIGS for t in TRANSPORTS)
DEFAULT_METHODS = BASELINES + LOWBIT_METHODS
ALL_METHODS = DEFAULT_METHODS + ("ddp_fp32",)

# transformers BertConfig overrides; all-MiniLM-L6-v2 = 6 layers, hidden 384 (22.7M parameters)
MODEL_CONFIGS = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": {},
}
BUCKET_MB = 25


# ---------------------------------------------------------------------------------------------- names
def select_methods(spec: str) -> list[str]:
    """Comma-separated names or fnmatch patterns (``lowbit_*_w2g3``, ``all``, ``default``)."""
    out: list[str] = []
    for pat in (s.strip() for s in spec.split(",") if s.strip()):
        names = {"all": ALL_METHODS, "default": DEFAULT_METHODS}.get(pat)
        if names is None:
            names = [m for m in ALL_METHODS if fnmatch.fnmatchcase(m, pat)]
        if not names:
            raise SystemExit(f"--methods: {pat!r} matches none of {', '.join(ALL_METHODS)}")
        out += [m for m in names if m not in out]
    return out


def parse_method(name: str) -> dict:
    """family (allreduce | ddp | lowbit), transport, g_bits, w_bits of a method name."""
    if name == "fp32_allreduce":
        return {"family": "allreduce", "transport": "allreduce", "g_bits": 32, "w_bits": None}
    if name.startswith("ddp_"):
        g = {"ddp_fp16": 16, "ddp_fp32": 32, "ddp_powersgd4": None}[name]
        return {"family": "ddp", "transport": name[4:], "g_bits": g, "w_bits": None}
    _, t, c = name.split("_")
    w, g = LOWBIT_CONFIGS[c]
    return {"family": "lowbit", "transport": t, "g_bits": g, "w_bits": w}


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes: ``minilm`` / ``bert-base`` from a meta-device transformers BertModel (no
    weights are allocated), or ``tiny:AxB+C`` for tests."""
    if name.startswith("tiny:"):
        return [tuple(int(d) for d in s.split("x")) for s in name[5:].split("+")]
    if name not in MODEL_CONFIGS:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODEL_CONFIGS)} or tiny:AxB+C")
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig(**MODEL_CONFIGS[name]))
    return [tuple(p.shape) for p in model.parameters()]


# ---------------------------------------------------------------------------------------------- bytes
def frame_sizes(shapes: list[tuple], bits: int) -> dict[int, int]:
    """Exact frame bytes per key of a per-tensor-scale symmetric frame (StochasticGradCodec(bits)
    and WeightCodec('laq-linear', bits) frames have this size)."""
    from lowbit.codec.frame import frame_nbytes
    return {k: frame_nbytes("sym", bits, tuple(s), 1) for k, s in enumerate(shapes)}


MAX_PIECE_NUMEL = 2_097_152  # as lowbit.train's default: large matrices travel as blocks of rows


def lowbit_pieces(shapes: list[tuple]) -> list[tuple]:
    """The shapes lowbit actually moves: training splits matrices above MAX_PIECE_NUMEL into row
    blocks (lowbit.train.plan.row_blocks) so no single owner gets a whole embedding table."""
    from lowbit.train.plan import row_blocks
    out = []
    for s in shapes:
        for rows in row_blocks(tuple(s), MAX_PIECE_NUMEL):
            out.append(tuple(s) if rows is None else (rows[1] - rows[0],) + tuple(s[1:]))
    return out


def lowbit_expected(method: str, shapes: list[tuple], p: int, ps_servers: int) -> list[dict]:
    """Per-rank byte counts of one step from the transports' frame formulas."""
    shapes = lowbit_pieces(shapes)
    from lowbit.comm.collective import ring_expected_bytes, tree_expected_bytes
    from lowbit.comm.ps import expected_bytes as ps_expected_bytes
    m = parse_method(method)
    sh = {k: tuple(s) for k, s in enumerate(shapes)}
    g, w = frame_sizes(shapes, m["g_bits"]), frame_sizes(shapes, m["w_bits"])
    if m["transport"] == "ring":
        return [ring_expected_bytes(r, p, sh, g, w) for r in range(p)]
    if m["transport"] == "tree":
        return [tree_expected_bytes(r, p, sh, g, w) for r in range(p)]
    return [ps_expected_bytes(r, p, ps_servers, sh, g, w) for r in range(p)]


def baseline_payload_bytes(method: str, shapes: list[tuple], p: int) -> float:
    """Bytes one rank sends (= receives) per step in a ring all-reduce of the method's payload."""
    from lowbit.net.costmodel import Method, terms
    n = sum(math.prod(s) for s in shapes)
    if method == "ddp_powersgd4":
        return terms(Method("powersgd4", "powersgd", rank=4, shapes=tuple(map(tuple, shapes))), p, n, 0).sent
    g = parse_method(method)["g_bits"]
    return 2 * (p - 1) / p * n * g / 8


def payload_bytes(method: str, shapes: list[tuple], p: int, ps_servers: int) -> tuple[float, float]:
    """(sent, received) payload bytes per step of the busiest rank, from the formulas."""
    if parse_method(method)["family"] == "lowbit":
        ex = lowbit_expected(method, shapes, p, ps_servers)
        return (max(e["up_sent"] + e["down_sent"] for e in ex), max(e["up_recv"] + e["down_recv"] for e in ex))
    b = baseline_payload_bytes(method, shapes, p)
    return b, b


def estimate_step_s(method: str, shapes: list[tuple], p: int, ps_servers: int, rate_mbit: float | None) -> float:
    """Ideal wire time of one step (busiest direction of the busiest rank at the link rate); for
    an unshaped link an assumed 8 Gbit/s. Used to pick how many repetitions fit the budget."""
    rate = (rate_mbit or 8000) * 1e6
    return max(payload_bytes(method, shapes, p, ps_servers)) * 8 / rate


def timeline_summary(timelines: list[dict]) -> dict:
    """Milestones of one PS step from every rank's StepTimeline (seconds after the earliest rank
    began; the ranks share one host's monotonic clock): first and last gradient chunk in at a
    server, last weight chunk posted by a server, last weight chunk in at and decoded by a worker,
    and the end of the slowest rank. ``tail_s`` = end − last gradient chunk in: what the step
    spends after its up-link half is over."""
    t0 = min(t["t0"] for t in timelines)

    def at(what, pick):
        ts = [t["t0"] - t0 + e[0] for t in timelines for e in t["events"] if e[1] == what]
        return pick(ts) if ts else None

    out = {"first_grads_in_s": at("grads_in", min), "grads_done_s": at("grads_in", max),
           "weights_posted_s": at("weights_posted", max), "weights_in_s": at("weights_in", max),
           "weights_decoded_s": at("weights_decoded", max), "end_s": at("end", max),
           "start_skew_s": max(t["t0"] for t in timelines) - t0}
    if out["end_s"] is not None and out["grads_done_s"] is not None:
        out["tail_s"] = out["end_s"] - out["grads_done_s"]
    return out


# ---------------------------------------------------------------------------------------------- rank side
def netdev(ifname: str) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of ``ifname`` in this process's network namespace (/proc/net/dev)."""
    with open("/proc/self/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == ifname:
                v = rest.split()
                return int(v[0]), int(v[8])
    return 0, 0


_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_HZ = os.sysconf("SC_CLK_TCK")


def host_cpu() -> list[int]:
    """The machine's CPU time so far, in clock ticks, per ``_STAT_FIELDS`` (/proc/stat's "cpu"
    line: all cores together; the same in every network namespace)."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:1 + len(_STAT_FIELDS)]]


class _Sampler:
    """Samples this namespace's interface counters every ``period`` seconds on a thread."""

    def __init__(self, ifname: str, period: float = 0.01) -> None:
        self.ifname, self.period = ifname, period
        self.rows: list[list[float]] = []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        rx, tx = netdev(self.ifname)
        self.rows.append([round(time.perf_counter() - self.t0, 4), rx, tx])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def stop(self) -> list[list[float]]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.rows


class _ParamModel(torch.nn.Module):
    """Parameters with the model's shapes (views of one flat buffer); forward = Σ_p p.sum()."""

    def __init__(self, flat: torch.Tensor, shapes) -> None:
        super().__init__()
        ps, a = [], 0
        for s in shapes:
            k = math.prod(s)
            ps.append(torch.nn.Parameter(flat[a:a + k].view(s)))
            a += k
        self.ps = torch.nn.ParameterList(ps)

    def forward(self):
        return torch.stack([p.sum() for p in self.ps]).sum()


class _HookSwitch:
    """One DDP comm hook whose behaviour is chosen per phase (one DDP per model, buckets built once)."""

    def __init__(self) -> None:
        from lowbit.comm.hooks import PowerSGDState
        self.mode = "noop"
        self.psgd = PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2,
                                  use_error_feedback=True, warm_start=True)


def _switch_hook(st: _HookSwitch, bucket):
    from lowbit.comm.hooks import allreduce_hook, fp16_hook, powerSGD_hook
    if st.mode == "fp16":
        return fp16_hook(None, bucket)
    if st.mode == "fp32":
        return allreduce_hook(None, bucket)
    if st.mode == "powersgd" and st.psgd.iter >= st.psgd.start_powerSGD_iter:
        # Waited here: PowerSGD chains its all_reduces (P, then Q) in future callbacks that run on
        # gloo's threads; with several buckets in flight those calls interleave differently on
        # different ranks (a collective mismatch). Waiting serializes the buckets.
        fut = powerSGD_hook(st.psgd, bucket)
        fut.wait()
        return fut
    if st.mode == "powersgd":  # PowerSGD's vanilla iterations, without their all_reduce
        st.psgd.maybe_increase_iter(bucket)
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _cpu_safe_cuda_synchronize() -> None:
    """PyTorch's PowerSGD hook calls ``torch.cuda.synchronize(tensor.device)`` whenever CUDA is
    available, which raises for the CPU tensors the baselines use; where the GPU is visible (the
    codec runs there) such a call is made a no-op, as it is on a machine without CUDA."""
    real = torch.cuda.synchronize
    if getattr(real, "_lowbit_cpu_safe", False):
        return

    def synchronize(device=None):
        if isinstance(device, torch.device) and device.type == "cpu":
            return None
        return real(device)

    synchronize._lowbit_cpu_safe = True
    torch.cuda.synchronize = synchronize


class RankBench:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.rank = int(os.environ["RANK"])
        self.p = int(os.environ["WORLD_SIZE"])
        self.ifname = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
        self.rate = spec.get("rate_mbit")
        self.records: list[dict] = []
        self.codec_device = torch.device(spec.get("codec_device", "cpu"))
        if self.codec_device.type == "cuda":
            _cpu_safe_cuda_synchronize()

    def sync(self) -> None:
        """Wait for the codec device's queued work (a no-op on CPU)."""
        if self.codec_device.type == "cuda":
            torch.cuda.synchronize(self.codec_device)

    # -------------------------------------------------------------- helpers
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[{self.spec['bandwidth']}] {msg}", file=sys.stderr, flush=True)

    def gather(self, obj):
        out = [None] * self.p
        dist.all_gather_object(out, obj)
        return out

    def reps_for(self, est_s: float) -> tuple[int, int]:
        """(timed reps, warm-up steps): as many of ``reps`` as fit ``budget_s`` (at least 1), and
        a warm-up step only when one step is expected to take at most ``warmup_max_s``."""
        reps, budget = int(self.spec["reps"]), float(self.spec["budget_s"])
        n = max(1, min(reps, int(budget // max(est_s, 1e-9))))
        return n, (1 if est_s <= float(self.spec["warmup_max_s"]) else 0)

    def timed(self, fn, reps: int, prep=None) -> tuple[list[float], tuple[int, int]]:
        """Per-rep seconds on this rank (each rep starts after a barrier) and the interface bytes
        (rx, tx) per rep over the timed reps. With ``spec["trace"]`` the last rep's interface
        counters are sampled every 10 ms (``self.last_trace``: [seconds, rx bytes, tx bytes] rows)."""
        dist.barrier()
        rx0, tx0 = netdev(self.ifname)
        ts, host = [], [0] * len(_STAT_FIELDS)
        ru = [0.0] * 4  # user s, system s, voluntary and involuntary context switches
        self.last_trace = None
        for i in range(reps):
            if prep is not None:
                prep()
            dist.barrier()
            sampler = _Sampler(self.ifname) if self.spec.get("trace") and i == reps - 1 else None
            h0, r0, t0 = host_cpu(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            ru = [a + getattr(r1, f) - getattr(r0, f) for a, f in zip(ru, ("ru_utime", "ru_stime", "ru_nvcsw", "ru_nivcsw"))]
            host = [a + b - c for a, b, c in zip(host, host_cpu(), h0)]
            if sampler is not None:
                self.last_trace = sampler.stop()
        dist.barrier()
        rx1, tx1 = netdev(self.ifname)
        # CPU per step: this process's (user + system, all its threads) and the whole machine's
        # (core-seconds by kind, over this rank's own timed window)
        self.last_cpu = {"process_s": (ru[0] + ru[1]) / reps, "user_s": ru[0] / reps, "system_s": ru[1] / reps,
                         "ctx_switches": ru[2] / reps, "involuntary_ctx_switches": ru[3] / reps,
                         "host_core_s": {k: v / _HZ / reps for k, v in zip(_STAT_FIELDS, host)}}
        return ts, ((rx1 - rx0) // reps, (tx1 - tx0) // reps)

    def emit(self, model: dict, method: str, per_rank: list[dict], extra: dict) -> None:
        traces = self.gather(getattr(self, "last_trace", None)) if self.spec.get("trace") else None
        cpus = self.gather(getattr(self, "last_cpu", None))
        if self.rank != 0:
            return
        p = self.p
        reps = len(per_rank[0]["times"])
        steps = [max(r["times"][i] for r in per_rank) for i in range(reps)]
        info = parse_method(method)
        sent, recv = payload_bytes(method, model["shapes"], p, self.spec["ps_servers"])
        rec = {
            "method": method, **info, "bandwidth": self.spec["bandwidth"], "rate_mbit": self.rate,
            "model": model["name"], "n_params": model["n"], "p": p, "threads": int(self.spec.get("threads", 1)),
            "codec_threads": int(self.spec.get("codec_threads", 1)),
            "codec_device": self.codec_device.type if info["family"] == "lowbit" else "cpu",
            "ps_servers": self.spec["ps_servers"] if info["transport"] == "ps" else None,
            "reps": reps, "step_s_reps": steps, "step_s": statistics.median(steps),
            "expected_bytes_per_rank": sent, "expected_recv_per_rank": recv,
            "bytes_per_rank": sent, "recv_per_rank": recv,
            "wire_bytes_per_rank": max(max(r["wire"]) for r in per_rank),
            "wire_rx_tx_per_rank": [list(r["wire"]) for r in per_rank],
        }
        rec.update(extra(steps) if callable(extra) else extra)
        rec.setdefault("step_total_s", rec["step_s"])
        if cpus[0] is not None:  # CPU per step: each rank's process, and the machine as rank 0 saw it
            host = cpus[0]["host_core_s"]
            rec["cpu_process_s_per_rank"] = [round(c["process_s"], 5) for c in cpus]
            rec["cpu_per_rank"] = [{k: round(v, 5) for k, v in c.items() if k != "host_core_s"} for c in cpus]
            rec["cpu_host_core_s"] = {k: round(v, 5) for k, v in host.items()}
            busy = sum(v for k, v in host.items() if k not in ("idle", "iowait"))
            rec["cpu_host_busy"] = busy / max(busy + host["idle"] + host["iowait"], 1e-9)
        if traces is not None:
            rec["trace"] = traces  # per rank: [seconds, rx bytes, tx bytes] every 10 ms of the last step
        if self.rate:
            rec["ideal_s"] = max(rec["bytes_per_rank"], rec["recv_per_rank"]) * 8 / (self.rate * 1e6)
            rec["efficiency"] = rec["ideal_s"] / rec["step_s"] if rec["step_s"] > 0 else None
        else:
            rec["ideal_s"] = rec["efficiency"] = None
        self.records.append(rec)
        Path(self.spec["out"]).write_text(json.dumps(self.records, indent=1))
        w = rec["wire_bytes_per_rank"] / max(rec["bytes_per_rank"], 1)
        self.log(f"{model['name']} {method}: step {rec['step_s']:.4f}s (reps {reps}), total "
                 f"{rec['step_total_s']:.4f}s, {rec['bytes_per_rank'] / 1e6:.2f} MB/rank payload, wire/payload {w:.3f}"
                 + (f", efficiency {rec['efficiency']:.2f}" if rec["efficiency"] else "")
                 + (f", CPU/step: ranks {sum(rec['cpu_process_s_per_rank']):.3f}s, host busy "
                    f"{rec['cpu_host_busy']:.2f} (softirq {rec['cpu_host_core_s']['softirq']:.3f} core-s)"
                    if "cpu_host_busy" in rec else "")
                 + (", timeline: gradients in {first_grads_in_s:.4f}..{grads_done_s:.4f}s, end {end_s:.4f}s "
                    "(tail {tail_s:.4f}s, start skew {start_skew_s:.4f}s)".format(**rec["timeline_summary"])
                    if rec.get("timeline_summary", {}).get("tail_s") is not None else ""))

    # -------------------------------------------------------------- methods
    def run_allreduce(self, model, flat, method):
        est = estimate_step_s(method, model["shapes"], self.p, self.spec["ps_servers"], self.rate)
        reps, warm = self.reps_for(est)
        buckets = list(flat.split(BUCKET_MB * 2**20 // 4))

        def fn():
            for b in buckets:
                b.div_(self.p)
            works = [dist.all_reduce(b, async_op=True) for b in buckets]
            for w in works:
                w.wait()

        for _ in range(warm):
            fn()
        ts, wire = self.timed(fn, reps)
        per_rank = self.gather({"times": ts, "wire": wire})
        self.emit(model, method, per_rank, {"warmup": warm, "buckets": len(buckets),
                                            "timed": f"dist.all_reduce of {len(buckets)} fp32 buckets of "
                                                     f"<= {BUCKET_MB} MB (async, then wait)"})

    def run_ddp(self, model, flat, methods):
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = _ParamModel(flat, model["shapes"])
        ddp = DDP(net, bucket_cap_mb=BUCKET_MB, gradient_as_bucket_view=True, init_sync=False)
        sw = _HookSwitch()
        ddp.register_comm_hook(sw, _switch_hook)
        box = {}

        def prep():
            box["loss"] = ddp()

        def fn():
            box["loss"].backward()

        # local autograd work (no communication): 2 warm-up iterations also let DDP rebuild buckets
        for _ in range(2):
            prep()
            fn()
        base_reps = max(3, int(self.spec["reps"]))
        ts, _ = self.timed(fn, base_reps, prep)
        base = self.gather(ts)
        noop_s = statistics.median(max(r[i] for r in base) for i in range(base_reps))
        self.log(f"{model['name']} DDP no-op hook backward (subtracted): {noop_s:.4f}s")
        for method in methods:
            mode = {"ddp_fp16": "fp16", "ddp_fp32": "fp32", "ddp_powersgd4": "powersgd"}[method]
            sw.mode = mode
            est = estimate_step_s(method, model["shapes"], self.p, self.spec["ps_servers"], self.rate)
            reps, warm = self.reps_for(est)
            if mode == "powersgd":
                warm = 3  # 2 communication-free vanilla iterations + 1 compressed (allocates P, Q, errors)
            for _ in range(warm):
                prep()
                fn()
            ts, wire = self.timed(fn, reps, prep)
            per_rank = self.gather({"times": ts, "wire": wire})
            self.emit(model, method, per_rank, lambda steps: {
                "warmup": warm, "backward_s": statistics.median(steps), "noop_backward_s": noop_s,
                "step_s": max(statistics.median(steps) - noop_s, 1e-6),
                "timed": "DDP loss.backward() (loss = sum of param sums) with the hook, minus the median "
                         "backward with a no-op hook"})
        del ddp, net, sw
        gc.collect()

    def run_lowbit(self, model, flat, methods):
        from lowbit.codec.codecs import StochasticGradCodec, WeightCodec
        from lowbit.codec.decode import decode_frame
        from lowbit.codec.frame import Frame
        from lowbit.comm.collective import RingTransport, TreeTransport
        from lowbit.comm.ps import DEFAULT_CHUNKS, ParameterServerTransport
        from lowbit.comm.transport import LazyFrames, StepTimeline

        shapes = {k: tuple(s) for k, s in enumerate(lowbit_pieces(model["shapes"]))}
        offs, a = {}, 0
        for k, s in shapes.items():
            offs[k] = (a, a + math.prod(s))
            a += math.prod(s)

        dev = self.codec_device
        gflat = flat.to(dev)

        def tensor(k):
            return gflat[offs[k][0]:offs[k][1]].view(shapes[k])

        gen = torch.Generator(dev).manual_seed(1000 + self.rank)
        grad_cache: dict[int, tuple[dict, float]] = {}

        def grad_frames(g_bits):
            if g_bits not in grad_cache:
                grad_cache.clear()
                gc.collect()
                codec = StochasticGradCodec(g_bits)
                dist.barrier()
                t0 = time.perf_counter()
                frames = {k: codec.encode(tensor(k), key=k, step=0, generator=gen).to_bytes() for k in shapes}
                self.sync()
                grad_cache[g_bits] = (frames, max(self.gather(time.perf_counter() - t0)))
            return grad_cache[g_bits]

        wq_cache: dict[int, float] = {}

        def laq_seconds_per_elem(w_bits):
            """Real WeightCodec('laq-linear') encode of a 1M-element sample with a D matrix, every rank
            at once, warm-started as the training server runs it (alpha = the scale of the previous
            step's weights, which an optimizer step moved a little): (warm, cold) seconds per element."""
            if w_bits not in wq_cache:
                m = min(flat.numel(), 1 << 20)
                x = gflat[:m - m % 1024].view(1024, -1)
                d = torch.rand(x.shape, generator=gen, device=dev) + 0.1
                codec = WeightCodec("laq-linear", w_bits)
                prev = codec.quantize(x, d).scale
                x = x + 1e-3 * x.abs().mean() * torch.randn(x.shape, generator=gen, device=dev)
                out = []
                for alpha in (prev, None):
                    dist.barrier()
                    t0 = time.perf_counter()
                    codec.encode(x, key=0, step=0, d=d, alpha=alpha).to_bytes()
                    self.sync()
                    out.append(max(self.gather((time.perf_counter() - t0) / x.numel())))
                wq_cache[w_bits] = tuple(out)
            return wq_cache[w_bits]

        def decode_rate(frames: dict[int, bytes], limit=1 << 21) -> float:
            """Seconds per element to validate + decode frames (a sample of up to ``limit`` elements)."""
            t0, n = time.perf_counter(), 0
            for b in frames.values():
                f = Frame.from_bytes(b)
                m = math.prod(f.shape)
                if m > scratch.numel():
                    break
                decode_frame(f, out=scratch[:m])  # into a reused buffer, as the transports do
                n += m
                if n >= limit:
                    break
            self.sync()
            return (time.perf_counter() - t0) / max(n, 1)

        scratch = torch.empty(max(math.prod(s) for s in shapes.values()), device=dev)
        S = int(self.spec["ps_servers"])
        for method in methods:
            info = parse_method(method)
            t, g_bits, w_bits = info["transport"], info["g_bits"], info["w_bits"]
            gframes, genc_s = grad_frames(g_bits)
            if t == "ps":
                tr = ParameterServerTransport(shapes, n_servers=S, timeout=float(self.spec["timeout_s"]), device=dev,
                                              chunks=int(self.spec.get("ps_chunks") or DEFAULT_CHUNKS),
                                              weights_channel=bool(self.spec.get("weights_channel", True)),
                                              timeline=StepTimeline() if self.spec.get("trace") else None,
                                              **({} if self.spec.get("ps_window") is None
                                                 else {"recv_window": int(self.spec["ps_window"])}))
                computes, owns = not tr.is_server, tr.is_server
            else:
                cls = RingTransport if t == "ring" else TreeTransport
                tr = cls(shapes, timeout=float(self.spec["timeout_s"]), device=dev)
                computes, owns = True, True
            mine = tr.owned_keys()
            wcodec = StochasticGradCodec(w_bits)  # same frame layout/size as WeightCodec laq-linear per tensor
            wframes = {k: replace(wcodec.encode(tensor(k), key=k, step=0, generator=gen), kind="weight").to_bytes()
                       for k in mine}
            owner = FrameOwner({k: wframes[k] for k in mine}) if owns else None
            grads = gframes if computes else None
            n_owned = sum(math.prod(shapes[k]) for k in mine)
            warm_per, cold_per = laq_seconds_per_elem(w_bits)
            wq_s = max(self.gather(warm_per * n_owned))
            wq_cold_s = max(self.gather(cold_per * n_owned))
            # what this rank decodes per step: gradients of its keys from every sender, all weights
            senders = (self.p - S) if t == "ps" else self.p
            g_dec = senders * n_owned if owns else 0
            w_dec = model["n"] if computes else 0
            own_g = {k: gframes[k] for k in (mine or list(shapes)[:4])}
            dec_s = g_dec * decode_rate(own_g) + w_dec * decode_rate(wframes or own_g)
            dec_s = max(self.gather(dec_s))

            # a worker decodes the weights into its model's parameters (Worker.weight_buffers)
            dest = {k: torch.empty(s, device=dev) for k, s in shapes.items()} if computes else None

            def fn():
                tr.step(0, grads, owner, out=dest)
                self.sync()

            est = estimate_step_s(method, model["shapes"], self.p, S, self.rate)
            reps, warm = self.reps_for(est)
            for _ in range(warm):
                fn()
            c0 = tr.counter.snapshot()
            ts, wire = self.timed(fn, reps)
            d = tr.counter.delta(c0)
            trace, cpu = self.last_trace, self.last_cpu
            timeline = tr.timeline.last() if t == "ps" and self.spec.get("trace") else None  # the last timed step

            def fn_enc():  # the workers' gradient encode inside the step: LazyFrames, group by group
                g = LazyFrames(shapes, lambda k: enc_codec.encode(tensor(k), key=k, step=0, generator=gen).to_bytes()
                               ) if computes else None
                tr.step(0, g, owner, out=dest)
                self.sync()

            enc_codec = StochasticGradCodec(g_bits)
            enc_ts, _ = self.timed(fn_enc, reps)
            self.last_trace, self.last_cpu = trace, cpu  # the plot and the CPU figures: the step with precomputed frames
            per_rank = self.gather({"times": ts, "wire": wire, "counter": {k: v // reps for k, v in d.items()},
                                    "enc_times": enc_ts, "timeline": timeline})
            timelines = [r["timeline"] for r in per_rank] if timeline is not None else None
            counters = [r["counter"] for r in per_rank]
            step_enc_s = statistics.median(max(r["enc_times"][i] for r in per_rank) for i in range(reps))
            self.emit(model, method, per_rank, lambda steps: {
                "warmup": warm, "counters": counters,
                "bytes_per_rank": max(c["sent"] for c in counters),
                "recv_per_rank": max(c["recv"] for c in counters),
                "grad_encode_s": genc_s, "weight_quant_s": wq_s, "weight_quant_cold_s": wq_cold_s,
                "decode_est_s": dec_s,
                "ps_chunks": tr.chunks if t == "ps" else None,
                "ps_recv_window": (tr.recv_window if tr.p2p.one_message else 0) if t == "ps" else None,
                "weights_channel": (tr.p2p.down_group is not None) if t == "ps" else None,
                "step_total_s": statistics.median(steps) + genc_s + wq_s,
                "step_enc_s": step_enc_s, "step_enc_total_s": step_enc_s + wq_s,
                **({"timeline": timelines, "timeline_summary": timeline_summary(timelines)} if timelines else {}),
                "timed": "Transport.step with precomputed gradient and weight frames (wire + framing + CRC + "
                         "decode/sum of gradients + decode of weights); encoding timed separately. step_enc_s: "
                         "the same step with the workers' gradient encode inside it (LazyFrames: the PS encodes "
                         "key group i + 1 while group i is on the wire; ring/tree encode as they read)"})
            del tr, owner, wframes, grads, dest
            gc.collect()
        del gflat

    # -------------------------------------------------------------- driver
    def run(self) -> None:
        spec = self.spec
        torch.set_num_threads(int(spec.get("threads", 1)))
        dist.init_process_group("gloo", rank=self.rank, world_size=self.p,
                                timeout=timedelta(seconds=float(spec["timeout_s"]) * 2))
        try:
            for model in spec["models"]:
                model = dict(model, shapes=[tuple(s) for s in model["shapes"]])
                methods = [m for m in spec["methods"]]
                flat = torch.empty(model["n"]).normal_(0.0, 1e-2, generator=torch.Generator().manual_seed(self.rank))
                for m in methods:
                    if m == "fp32_allreduce":
                        self.run_allreduce(model, flat, m)
                ddp = [m for m in methods if parse_method(m)["family"] == "ddp"]
                if ddp:
                    self.run_ddp(model, flat, ddp)
                low = [m for m in methods if parse_method(m)["family"] == "lowbit"]
                # group by gradient bits so each gradient encoding is done once
                low.sort(key=lambda m: (parse_method(m)["g_bits"], methods.index(m)))
                if low:
                    self.run_lowbit(model, flat, low)
                del flat
                gc.collect()
            dist.barrier()
        finally:
            dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="one rank of a communication benchmark (see module docstring)")
    ap.add_argument("--rank-spec", required=True)
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.rank_spec).read_text())
    RankBench(spec).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
