"""Communication per training step over real shaped links: 4 ranks, each in its own network
namespace behind a tc-tbf-shaped veth (lowbit.net.netns.Testbed), gloo over those interfaces.

    python benchmarks/comm_bandwidth.py                      # full default run (~20 min on 2 cores)
    python benchmarks/comm_bandwidth.py --quick              # MiniLM, 100 Mbit/s + 1 Gbit/s, w2/g3
    lowbit bench comm --models minilm --rates 1000 --methods 'fp32_allreduce,lowbit_*_w2g3'

Methods: fp32_allreduce (dist.all_reduce of 25 MB fp32 buckets), ddp_fp16 / ddp_powersgd4 (DDP
with PyTorch's fp16-compress / PowerSGD rank-4 hooks; ddp_fp32 on request) and
lowbit_{ps,ring,tree}_w{2,4,8}g{3,8} (gradient frames up, weight frames down). Exactly what is
timed for each is in benchmarks/_comm_common.py. One testbed per link rate; the ranks are started
once per rate and run every model and method in sequence.

Shaping: tbf rate R in each direction on every host link (bridge with unlimited backplane); no
sch_netem is used, so no delay is emulated: latency is that of veth + bridge (tens of µs),
and the latency-bound regime of real Ethernet (50-500 µs per hop, more across racks) is absent.

Output: a table per rate on stdout, progress on stderr, --json (records: method, bandwidth, model,
step_s, step_enc_s (lowbit: the step with the workers' gradient encode inside it, pipelined by the
PS), step_total_s (step_s + encode + weight quantization, one after the other), bytes_per_rank, recv_per_rank, wire_bytes_per_rank, speedup_vs_fp32, ideal_s,
efficiency, cpu_per_rank, cpu_host_core_s, cpu_host_busy, ...; the table's wire_ratio = interface
bytes / payload bytes of the busiest direction, cpu_core_s = all ranks' CPU seconds per step; a note
under the table names the steps that kept the machine's cores >= 90% busy: CPU-bound, not link-bound), a log-log plot of step time against bandwidth (one line per method, a panel per model),
then the cost model fit (benchmarks/comm_costmodel.py) unless --no-costmodel. ``--from-json PATH``
re-prints the tables and the plot of an earlier run without measuring.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from lowbit.benchmarks._comm_common import DEFAULT_METHODS, model_shapes, parse_method, select_methods  # noqa: E402
from lowbit.benchmarks._common import RESULTS, print_table, write_json  # noqa: E402

QUICK = {"models": "minilm", "rates": "100,1000", "methods": "fp32_allreduce,ddp_fp16,ddp_powersgd4,lowbit_*_w2g3",
         "reps": 2}


def bandwidth_label(rate_mbit: float | None) -> str:
    if rate_mbit is None:
        return "unshaped"
    return f"{rate_mbit / 1000:g}Gbit" if rate_mbit >= 1000 else f"{rate_mbit:g}Mbit"


def parse_rates(s: str) -> list[float | None]:
    out = []
    for x in s.split(","):
        x = x.strip().lower()
        if not x:
            continue
        out.append(None if x in ("none", "unshaped", "inf", "0") else float(x))
    return out


def run_rate(rate_mbit: float | None, models: list[dict], methods: list[str], *, ranks: int = 4, reps: int = 3,
             budget_s: float = 20.0, warmup_max_s: float = 5.0, ps_servers: int = 2, timeout_s: float = 600.0,
             prefix: str = "lbcb", port: int = 29500, threads: int = 1,
             codec_threads: int | None = None, codec_device: str = "cpu", ps_chunks: int | None = None,
             weights_channel: bool = True, trace: bool = False, ps_window: int | None = None) -> list[dict]:
    """Build one testbed at ``rate_mbit`` (None = unshaped), run ``ranks`` rank processes in it over
    every (model, method), tear everything down, return rank 0's records (speedups filled in).

    ``models``: ``[{"name", "shapes", "n"}]``; ``threads``: torch's intra-op threads per rank (1 =
    one core per rank); ``codec_threads``: lowbit's decode threads per rank (``LOWBIT_CODEC_THREADS``,
    default ``threads``); ``codec_device``: where lowbit encodes and decodes ("cpu", or "cuda": every
    rank shares the GPU); ``ps_chunks``: key groups of the pipelined PS step (default: the
    transport's); ``ps_window``: the PS servers' receive window (default: the transport's);
    ``weights_channel``: the PS sends weights on connections of their own; ``trace``:
    each record gets every rank's interface counters sampled every 10 ms of its last step. Raises RuntimeError when a rank fails (the records measured before the failure are
    attached as ``err.records``)."""
    from lowbit.net.netns import LinkSpec, Testbed

    label = bandwidth_label(rate_mbit)
    with tempfile.TemporaryDirectory(prefix="lbcomm") as tmp:
        out = Path(tmp) / "records.json"
        spec = {"bandwidth": label, "rate_mbit": rate_mbit, "models": models, "methods": methods, "reps": reps,
                "budget_s": budget_s, "warmup_max_s": warmup_max_s, "ps_servers": ps_servers,
                "timeout_s": timeout_s, "out": str(out), "threads": threads, "codec_threads": codec_threads or threads,
                "ps_chunks": ps_chunks, "ps_window": ps_window, "weights_channel": weights_channel, "trace": trace,
                "codec_device": codec_device}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        t_start = time.monotonic()
        with Testbed(ranks, LinkSpec(rate_mbit), prefix=prefix) as tb:
            procs = []
            for i in range(ranks):
                env = dict(os.environ, RANK=str(i), WORLD_SIZE=str(ranks), MASTER_ADDR=tb.addr(0),
                           MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=tb.ifname(i), OMP_NUM_THREADS=str(threads),
                           LOWBIT_CODEC_THREADS=str(codec_threads or threads),
                           **({} if codec_device == "cuda" else {
                               # CPU tensors over gloo: hide GPUs, or PyTorch's PowerSGD hook calls
                               # torch.cuda.synchronize() on a CPU device and fails where a GPU exists
                               "CUDA_VISIBLE_DEVICES": ""}))
                procs.append(tb.run(i, [sys.executable, "-m", "lowbit.benchmarks._comm_common", "--rank-spec", str(spec_path)],
                                    env=env, stdout=subprocess.DEVNULL))
            failed = None
            deadline = t_start + timeout_s * max(4, 3 * len(models) * len(methods))
            while True:
                codes = [p.poll() for p in procs]
                if any(c not in (None, 0) for c in codes):
                    failed = f"rank exit codes {codes}"
                    break
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    failed = f"timed out after {time.monotonic() - t_start:.0f}s"
                    break
                time.sleep(0.2)
        records = json.loads(out.read_text()) if out.exists() else []
    add_speedups(records)
    if failed:
        err = RuntimeError(f"{label}: {failed}")
        err.records = records
        raise err
    return records


def add_speedups(records: list[dict]) -> None:
    """speedup_vs_fp32 = fp32 all_reduce step / step (same model and link); also on step_total_s."""
    ref = {(r["model"], r["bandwidth"]): r for r in records if r["method"] == "fp32_allreduce"}
    for r in records:
        f = ref.get((r["model"], r["bandwidth"]))
        r["speedup_vs_fp32"] = f["step_s"] / r["step_s"] if f and r["step_s"] > 0 else None
        r["speedup_total_vs_fp32"] = f["step_s"] / r["step_total_s"] if f and r["step_total_s"] > 0 else None


COLS = ["model", "bandwidth", "method", "reps", "step_s", "step_enc_s", "step_total_s", "bytes_per_rank", "wire_ratio",
        "speedup_vs_fp32", "speedup_total_vs_fp32", "ideal_s", "efficiency", "decode_est_s", "grad_encode_s",
        "weight_quant_s", "cpu_core_s", "cpu_host_busy"]
FMT = {"step_s": "{:.4f}", "step_enc_s": "{:.4f}", "step_total_s": "{:.4f}", "bytes_per_rank": "{:.3e}", "wire_ratio": "{:.3f}",
       "speedup_vs_fp32": "{:.2f}", "speedup_total_vs_fp32": "{:.2f}", "ideal_s": "{:.4f}", "efficiency": "{:.2f}",
       "decode_est_s": "{:.3f}", "grad_encode_s": "{:.3f}", "weight_quant_s": "{:.3f}", "cpu_core_s": "{:.3f}",
       "cpu_host_busy": "{:.2f}"}


def table(records: list[dict]) -> str:
    rows = []
    for r in records:
        row = dict(r)
        busiest = max(r.get("bytes_per_rank") or 0, r.get("recv_per_rank") or 0)
        row["wire_ratio"] = r["wire_bytes_per_rank"] / busiest if busiest else None
        # CPU per step of all ranks' processes together (core-seconds; the machine has os.cpu_count())
        row["cpu_core_s"] = sum(r["cpu_process_s_per_rank"]) if r.get("cpu_process_s_per_rank") else None
        rows.append(row)
    return print_table(rows, COLS, FMT)


CPU_BOUND = 0.9  # the machine's busy share during a step from which the table flags it


def cpu_bound_note(records: list[dict], cpu_count: int | None = None) -> str | None:
    """A line naming the measurements whose step kept the machine's CPUs busy (``cpu_host_busy`` >=
    CPU_BOUND): their step time is the CPU's (the ranks share this machine's cores), not the link's,
    and says little about the same method on one machine per rank."""
    hot = [r for r in records if (r.get("cpu_host_busy") or 0) >= CPU_BOUND]
    if not hot:
        return None
    names = ", ".join(f"{r['model']} {r['method']} ({r['cpu_host_busy']:.2f})" for r in hot)
    return (f"CPU-bound (the machine's {cpu_count or os.cpu_count()} cores >= {CPU_BOUND:.0%} busy during the step, shared by "
            f"every rank): {names}. Their step time is this machine's CPU, not the link.")


def report(records: list[dict], cpu_count: int | None = None) -> None:
    """One rate's table, and under it the note naming its CPU-bound steps, if any."""
    table(records)
    note = cpu_bound_note(records, cpu_count)
    if note:
        print(note)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def plot(records: list[dict], path: Path) -> Path | None:
    """Step time against link rate, one line per method, a panel per model; None (and a message)
    when there is nothing to plot, e.g. every rate of the run failed."""
    if not records:
        print("comm_bandwidth: no measurements: no plot", file=sys.stderr)
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot", file=sys.stderr)
        return None
    models = sorted({r["model"] for r in records}, key=lambda m: min(r["n_params"] for r in records if r["model"] == m))
    rates = [r["rate_mbit"] for r in records if r["rate_mbit"]]
    unshaped_x = max(rates) * 4 if rates else 40000
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        recs = [r for r in records if r["model"] == model]
        for m in [m for m in DEFAULT_METHODS + ("ddp_fp32",) if any(r["method"] == m for r in recs)]:
            pts = sorted(((r["rate_mbit"] or unshaped_x), r["step_s"]) for r in recs if r["method"] == m)
            info = parse_method(m)
            style = "-" if info["family"] != "lowbit" else {"ring": "--", "tree": ":", "ps": "-."}[info["transport"]]
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", ms=3, label=m,
                    lw=2.2 if m in ("fp32_allreduce", "ddp_powersgd4", "lowbit_ring_w2g3") else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"link rate, Mbit/s (unshaped plotted at {unshaped_x:g})")
        ax.set_ylabel("communication per step, s (median)")
        ax.set_title(f"{model}: {recs[0]['n_params'] / 1e6:.1f}M params, {recs[0]['p']} ranks, netns + tc tbf")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


TIMELINE_STYLE = {  # event -> (marker, size, label)
    "grads_posted": ("|", 40, "gradient chunk posted (worker)"),
    "grads_in": ("o", 18, "gradient chunk in (server)"),
    "group_averaged": ("x", 30, "group averaged (server)"),
    "weights_posted": ("^", 26, "weight chunk posted (server)"),
    "weights_in": ("v", 18, "weight chunk in (worker)"),
    "weights_decoded": (".", 22, "weight chunk decoded (worker)"),
    "end": ("s", 40, "end of step"),
}


def plot_traces(records: list[dict], path: Path) -> Path | None:
    """Receive and send rates of every rank over one step, a panel per traced record: where the
    bytes of a step go, and whether the up and down directions overlap. A PS record also gets its
    step timeline below (every rank's events, coloured by key group, on the shared clock) with the
    wire-time ideal marked: which chunk came late, and how long the step ran after its last
    gradients were in."""
    traced = [r for r in records if r.get("trace")]
    if not traced:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [p for r in traced for p in ([(r, "rates")] + ([(r, "timeline")] if r.get("timeline") else []))]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for ax, (r, kind) in zip(axes[:, 0], panels):
        if kind == "timeline":
            _plot_timeline(ax, r)
            continue
        for rank, rows in enumerate(r["trace"]):
            if not rows or len(rows) < 2:
                continue
            for col, style, what in ((1, "-", "rx"), (2, "--", "tx")):
                t = [(a[0] + b[0]) / 2 for a, b in zip(rows, rows[1:])]
                mbit = [(b[col] - a[col]) * 8 / max(b[0] - a[0], 1e-6) / 1e6 for a, b in zip(rows, rows[1:])]
                ax.plot(t, mbit, style, color=f"C{rank}", lw=1, label=f"rank {rank} {what}")
        if r.get("rate_mbit"):
            ax.axhline(r["rate_mbit"], color="k", lw=0.5, alpha=0.5)
        extra = f", weights channel {'on' if r.get('weights_channel') else 'off'}" if r.get("transport") == "ps" else ""
        ax.set_title(f"{r['model']} {r['method']} at {r['bandwidth']}: step {r['step_s']:.3f} s, "
                     f"ideal {r['ideal_s'] or 0:.3f} s{extra}", fontsize=9)
        ax.set_ylabel("Mbit/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=4, loc="upper right")
        ax.set_xlabel("seconds into the step (interface counters every 10 ms)", fontsize=8)
    return _save(fig, path)


def _plot_timeline(ax, r: dict) -> None:
    import matplotlib.pyplot as plt
    tls = r["timeline"]
    t0 = min(t["t0"] for t in tls)
    groups = max((e[3] for t in tls for e in t["events"] if e[3] is not None), default=0) + 1
    cmap = plt.get_cmap("viridis")
    seen = set()
    for rank, tl in enumerate(tls):
        for what, (marker, size, label) in TIMELINE_STYLE.items():
            ev = [e for e in tl["events"] if e[1] == what]
            if not ev:
                continue
            xs = [tl["t0"] - t0 + e[0] for e in ev]
            # servers' arrivals per worker and workers' per server on their own sub-rows
            ys = [rank + (0.0 if e[2] is None else 0.12 * ((e[2] % 4) - 1.5)) for e in ev]
            cs = [cmap(e[3] / max(groups - 1, 1)) if e[3] is not None else "k" for e in ev]
            ax.scatter(xs, ys, marker=marker, s=size, c=cs, label=None if what in seen else label, lw=1)
            seen.add(what)
    sm = r.get("timeline_summary", {})
    if r.get("ideal_s"):
        ax.axvline(r["ideal_s"], color="r", lw=0.8, ls="--", label=f"ideal {r['ideal_s']:.3f} s")
    if sm.get("grads_done_s") is not None:
        ax.axvline(sm["grads_done_s"], color="0.4", lw=0.8, ls=":",
                   label=f"last gradients in {sm['grads_done_s']:.3f} s")
    ax.set_yticks(range(len(tls)), [f"rank {i} ({'server' if i < (r.get('ps_servers') or 0) else 'worker'})"
                                    for i in range(len(tls))], fontsize=7)
    ax.set_ylim(-1.7, len(tls) - 0.4)  # the legend sits below the ranks' rows
    ax.set_title(f"timeline of the last timed step (colour = key group 0..{groups - 1}; tail after the last "
                 f"gradients {sm.get('tail_s') or 0:.3f} s)", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=6, ncol=5, loc="lower center")
    ax.set_xlabel("seconds since the first rank began the step", fontsize=8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,bert-base", help="minilm, bert-base, or tiny:AxB+C")
    ap.add_argument("--rates", default="100,1000,10000,none", help="Mbit/s per direction; none = unshaped")
    ap.add_argument("--methods", default="default", help="names or patterns, e.g. 'fp32_allreduce,lowbit_*_w2g3'; "
                                                          "'all' adds ddp_fp32")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per method (at most; see --budget-s)")
    ap.add_argument("--budget-s", type=float, default=20.0,
                    help="fewer reps (>= 1) when reps x the ideal step time exceeds this")
    ap.add_argument("--warmup-max-s", type=float, default=5.0,
                    help="one untimed warm-up step when the ideal step time is at most this")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--ps-servers", type=int, default=2, help="PS: ranks [0,S) serve, the others are workers")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads per rank (default 1: 4 ranks fit 2 cores; on a machine with "
                         ">= 4 x N cores, N gives each rank N cores as a cluster node would)")
    ap.add_argument("--codec-threads", type=int, default=None,
                    help="lowbit decode threads per rank (LOWBIT_CODEC_THREADS; default: --threads)")
    ap.add_argument("--ps-chunks", type=int, default=None,
                    help="key groups the PS pipelines a step in (ParameterServerTransport chunks; default 10, the last four halving)")
    ap.add_argument("--ps-window", type=int, default=None,
                    help="gradient chunks per worker a PS server posts ahead (ParameterServerTransport recv_window; "
                         "default 2, 0 = all at once)")
    ap.add_argument("--no-weights-channel", action="store_true",
                    help="PS: weights down on the gradients' connections (ParameterServerTransport "
                         "weights_channel=False; gloo then serializes up and down)")
    ap.add_argument("--trace", metavar="PNG", default=None,
                    help="sample every rank's interface counters every 10 ms of each method's last step "
                         "and record the PS step timeline (both kept in the JSON); plot receive/send "
                         "rates over the step, and the PS timeline, to PNG")
    ap.add_argument("--codec-device", default="cpu", choices=["cpu", "cuda"],
                    help="where lowbit's codec runs (cuda: the ranks share the GPU; payloads still go through "
                         "gloo on the CPU; baselines stay on CPU tensors)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per point-to-point wait")
    ap.add_argument("--quick", action="store_true", help=f"subset: {QUICK}")
    ap.add_argument("--json", default=str(RESULTS / "comm_bandwidth.json"))
    ap.add_argument("--plot", default=str(RESULTS / "comm_bandwidth.png"))
    ap.add_argument("--no-costmodel", action="store_true", help="skip the cost-model fit afterwards")
    ap.add_argument("--from-json", metavar="PATH", help="measure nothing: print the tables and plot from PATH")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        records = data["records"]
        for bw in dict.fromkeys(r["bandwidth"] for r in records):
            print(f"\n## {bw}")
            report([r for r in records if r["bandwidth"] == bw], data.get("machine", {}).get("cpu_count"))
        plot(records, Path(args.plot))
        if args.trace:
            plot_traces(records, Path(args.trace))
        return 0
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)

    from lowbit.net.netns import cleanup_stale, netns_available

    ok, why = netns_available()
    if not ok:
        print(f"comm_bandwidth: skipped: netns testbed not available: {why}")
        return 0
    cleanup_stale("lbcb")
    methods = select_methods(args.methods)
    if args.threads < 1 or (args.codec_threads is not None and args.codec_threads < 1):
        raise SystemExit("--threads and --codec-threads must be >= 1")
    if args.codec_device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--codec-device cuda: no CUDA device is visible to torch")
    if args.ranks & (args.ranks - 1) and any(parse_method(m)["transport"] == "tree" for m in methods):
        raise SystemExit("the tree transport needs a power-of-two --ranks")
    models = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        shapes = model_shapes(name)
        models.append({"name": name, "shapes": [list(s) for s in shapes], "n": sum(math.prod(s) for s in shapes)})
    load = os.getloadavg()
    print(f"comm_bandwidth: {args.ranks} ranks, models {[(m['name'], m['n']) for m in models]}, "
          f"methods {methods}, load average {load[0]:.1f} on {os.cpu_count()} cores", file=sys.stderr)
    records: list[dict] = []
    meta = {"models": {m["name"]: m["shapes"] for m in models}, "ranks": args.ranks, "ps_servers": args.ps_servers, "reps": args.reps, "budget_s": args.budget_s,
            "threads_per_rank": args.threads, "codec_threads_per_rank": args.codec_threads or args.threads, "cpu_count": os.cpu_count(), "codec_device": args.codec_device, "ps_chunks": args.ps_chunks, "ps_window": args.ps_window, "weights_channel": not args.no_weights_channel,
            "argv": sys.argv[1:] if argv is None else list(argv), "load_before": load,
            "shaping": "tc tbf both directions per host link, burst max(256kbit, 1ms at rate), latency 50ms; "
                       "no netem on this kernel: no delay emulated"}
    failures = []
    t0 = time.monotonic()
    for rate in parse_rates(args.rates):
        tr = time.monotonic()
        try:
            recs = run_rate(rate, models, methods, ranks=args.ranks, reps=args.reps, budget_s=args.budget_s,
                            warmup_max_s=args.warmup_max_s, ps_servers=args.ps_servers, timeout_s=args.timeout_s,
                            threads=args.threads, codec_threads=args.codec_threads, codec_device=args.codec_device,
                            ps_chunks=args.ps_chunks, weights_channel=not args.no_weights_channel,
                            trace=bool(args.trace), ps_window=args.ps_window)
        except RuntimeError as e:
            recs = getattr(e, "records", [])
            failures.append(str(e))
            print(f"comm_bandwidth: {e}", file=sys.stderr)
        records += recs
        print(f"\n## {bandwidth_label(rate)} ({time.monotonic() - tr:.0f}s, load {os.getloadavg()[0]:.1f})")
        if recs:
            report(recs)
        meta.update(load_after=os.getloadavg(), wall_s=time.monotonic() - t0, failures=failures)
        write_json(args.json, records, meta)
    plot(records, Path(args.plot))
    if args.trace:
        plot_traces(records, Path(args.trace))
    if not args.no_costmodel and records:
        import comm_costmodel
        comm_costmodel.main(["--measured", args.json])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
