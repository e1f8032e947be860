"""The alpha-beta cost model (lowbit.net.costmodel) next to the shaped-link measurements, and its
extrapolation to the paper's cluster (16 nodes x 4 GPUs) and to 256 nodes, for BERT-base.

    python benchmarks/comm_costmodel.py                      # reads benchmarks/results/comm_bandwidth.json
    python benchmarks/comm_costmodel.py --measurements other.json --json out.json --plot out.png
    python benchmarks/comm_costmodel.py --measurements benchmarks/results/comm_bandwidth_16cores.json \
        --exclude-from-fit ddp_powersgd4 --no-gamma-1proc  # the 16-core fit; PowerSGD predicted, not fitted

``--measurements`` (alias ``--measured``) picks the comm_bandwidth.py JSON to fit on.
``--exclude-from-fit PATTERNS`` (comma-separated fnmatch patterns on method names) keeps records out
of the fit; they are still predicted and reported (``in_fit`` false). With records at two or more
link rates the fit is also checked out of sample: for each rate, α and η are refitted on the other
rates' records and that rate's records are predicted (``heldout_predicted_s``, ``heldout_rel_err``;
lowbit.net.costmodel.holdout). The standard errors of α and 1/η (weighted least squares) say how
well the data determine them.

Fit: T = α·M + V·8/(η·B) + codec, with (M, V) from lowbit.net.costmodel.terms for each measured
method (PS as S servers + W workers, p = W). α and η are least-squares fitted (relative error) on the
shaped records, with the codec part of the lowbit records as a known offset (targets: baselines
``step_s``, lowbit ``step_total_s``; every record weighted by 1/measured). The codec part is not
fitted but *measured*, at two rates because LAQ weight quantization is over an order of magnitude
slower per byte than the streaming passes and its share (1/S of the weights) changes with the
cluster size::

    codec = γ_stream · 4n·(2 + W/S)  +  γ_laq · 4n/S
            (grad encode, weight decode, W/S grad decodes)   (quantize the owned 1/S of the weights)

Predictions are compared with ``step_total_s`` (lowbit) / ``step_s`` (baselines). The baselines'
CPU work (gloo's summation, fp16 casts, PowerSGD's matmuls) is not in the model, which is why they
are mispredicted when the link is fast. Unshaped records have no rate and are not fitted.

Extrapolation (lowbit.net.costmodel.extrapolate): one endpoint per node (p = nodes), the
inter-node link is the bottleneck, intra-node reduction among the 4 GPUs is free; lowbit PS there
is co-located (every node a worker and the server of 1/p, the ring's volume). ``step_s_gpu_codec``
is communication only (a GPU codec is negligible next to the link); ``step_s_alpha0`` is the same
with α = 0 (the bandwidth term alone, a lower bound); ``step_s`` adds the codec at
this CPU's single-process speed (γ of the real codecs timed here: one core per node). The w8/g8
codec time is extrapolated with the w2/g3 rates (payload-size effects on the codec are ignored).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path


from lowbit.benchmarks._comm_common import parse_method  # noqa: E402
from lowbit.benchmarks._common import RESULTS, print_table, write_json  # noqa: E402

from lowbit.errors import ConfigError  # noqa: E402
from lowbit.net.costmodel import BERT_BASE_N, Method, bert_param_shapes, extrapolate, fit, holdout  # noqa: E402


def cost_method(rec: dict, shapes=None) -> tuple[Method, int]:
    """(costmodel Method, p for the model) of a measured record."""
    info = parse_method(rec["method"])
    name, p = rec["method"], int(rec["p"])
    if info["family"] != "lowbit":
        if info["transport"] == "powersgd4":
            sh = tuple(map(tuple, shapes)) if shapes else None
            return Method(name, "powersgd", rank=4, shapes=sh), p
        return Method(name, "allreduce", g_bits=info["g_bits"]), p
    kind = info["transport"]
    if kind == "ps":
        S = int(rec["ps_servers"])
        return Method(name, "ps", g_bits=info["g_bits"], w_bits=info["w_bits"], servers=S), p - S
    return Method(name, kind, g_bits=info["g_bits"], w_bits=info["w_bits"]), p


def gamma_1proc(n: int = 1 << 20, reps: int = 3) -> dict:
    """Seconds per fp32 byte of the real codecs in one process, one thread, per pass (process CPU
    time, best of ``reps``, so that other load on the machine inflates it little)."""
    import torch

    from lowbit.codec.codecs import StochasticGradCodec, WeightCodec
    from lowbit.codec.decode import decode_frame
    from lowbit.codec.frame import Frame

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).view(1024, -1)
    d = torch.rand(x.shape, generator=g) + 0.1
    gc3, wc2 = StochasticGradCodec(3), WeightCodec("laq-linear", 2)

    def best(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.process_time()
            fn()
            ts.append(time.process_time() - t0)
        return min(ts) / (4.0 * n)

    gb = gc3.encode(x, generator=g).to_bytes()
    wb = wc2.encode(x, d=d).to_bytes()
    out = {"grad_encode_g3": best(lambda: gc3.encode(x, generator=g).to_bytes()),
           "grad_decode_g3": best(lambda: decode_frame(Frame.from_bytes(gb))),
           "weight_quant_laq_w2": best(lambda: wc2.encode(x, d=d).to_bytes()),
           "weight_decode_w2": best(lambda: decode_frame(Frame.from_bytes(wb)))}
    # weights of the passes of one ring step on p = 4 ranks: C = 4n(3 + 1/p)
    # (grad encode 1, weight decode 1, grad decode p/p = 1, weight quantization 1/p)
    p = 4
    w = {"grad_encode_g3": 1, "weight_decode_w2": 1, "grad_decode_g3": 1, "weight_quant_laq_w2": 1 / p}
    out["per_pass_ring_p4"] = sum(out[k] * w[k] for k in w) / sum(w.values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measurements", "--measured", dest="measured", default=str(RESULTS / "comm_bandwidth.json"),
                    help="comm_bandwidth.py JSON to fit on (default: the first full run, comm_bandwidth.json)")
    ap.add_argument("--exclude-from-fit", default="",
                    help="comma-separated fnmatch patterns of methods kept out of the fit (still predicted)")
    ap.add_argument("--json", default=str(RESULTS / "comm_costmodel.json"))
    ap.add_argument("--plot", default=str(RESULTS / "comm_costmodel.png"))
    ap.add_argument("--nodes", default="16,256")
    ap.add_argument("--gpus-per-node", type=int, default=4)
    ap.add_argument("--no-gamma-1proc", action="store_true", help="skip the single-process codec timing")
    args = ap.parse_args(argv)
    excluded = [x.strip() for x in args.exclude_from_fit.split(",") if x.strip()]

    path = Path(args.measured)
    if not path.exists():
        print(f"comm_costmodel: {path} not found; run benchmarks/comm_bandwidth.py first")
        return 0
    doc = json.loads(path.read_text())
    shapes_of = doc.get("models", {})
    measured = [r for r in doc["records"] if r.get("step_s")]
    shaped = [r for r in measured if r.get("rate_mbit")]
    if len(shaped) < 2:
        print("comm_costmodel: fewer than 2 shaped records, nothing to fit")
        return 0

    # Codec cost, measured, in two rates (the laq weight quantizer is over an order of magnitude
    # slower per byte than the streaming passes, and its share, 1/S of the weights, changes with the cluster size):
    #   γ_stream = (grad encode + decodes) / (4n·(2 + W/S))     γ_laq = weight quantization / (4n/S)
    # in-run values (all ranks sharing this machine's cores) for the fit, single-process ones for
    # the extrapolation (every node has its own cores).
    gs, gl = [], []
    for r in measured:
        if r.get("family") == "lowbit":
            n = int(r["n_params"])
            S = int(r["ps_servers"]) if r["transport"] == "ps" else int(r["p"])
            W = int(r["p"]) - S if r["transport"] == "ps" else int(r["p"])
            gs.append((r["grad_encode_s"] + r["decode_est_s"]) / (4.0 * n * (2 + W / S)))
            gl.append(r["weight_quant_s"] / (4.0 * n / S))
    gamma_run = {"stream": statistics.median(gs) if gs else 0.0, "laq": statistics.median(gl) if gl else 0.0}
    g1 = {} if args.no_gamma_1proc else gamma_1proc()
    gamma_node = {"stream": (g1["grad_encode_g3"] + g1["grad_decode_g3"] + g1["weight_decode_w2"]) / 3,
                  "laq": g1["weight_quant_laq_w2"]} if g1 else gamma_run

    def codec_s(kind: str, n: int, p: int, servers: int | None, gam: dict) -> float:
        """Codec seconds on the critical path of one lowbit step (0 for the baselines)."""
        if kind not in ("ps", "ring", "tree"):
            return 0.0
        S = servers or p
        W = p
        return gam["stream"] * 4.0 * n * (2 + W / S) + gam["laq"] * 4.0 * n / S

    # α, η fitted with the measured codec time as a known per-record offset: each lowbit Method gets
    # codec_passes such that γ_ref·C equals the codec model above, so fit() solves
    # (measured − codec) = α·M + (1/η)·V·8/B with every record weighted by 1/measured.
    g_ref = 1e-9
    fit_recs = []
    for r in shaped:
        m, p = cost_method(r, shapes_of.get(r["model"]))
        n = int(r["n_params"])
        lowbit = r.get("family") == "lowbit"
        codec = codec_s(m.kind, n, p, m.servers, gamma_run)
        if lowbit:
            m = replace(m, codec_passes=codec / (4.0 * n * g_ref))
        fit_recs.append({"method": m, "p": p, "n": n, "rate_bps": float(r["rate_mbit"]) * 1e6,
                         "step_s": float(r["step_total_s"] if lowbit else r["step_s"]), "_rec": r, "_codec": codec,
                         "_in_fit": not any(fnmatch.fnmatchcase(r["method"], pat) for pat in excluded)})

    def clean(fs):
        return [{k: v for k, v in f.items() if not k.startswith("_")} for f in fs]

    used = [f for f in fit_recs if f["_in_fit"]]
    if len(used) < 2:
        print(f"comm_costmodel: {len(used)} shaped records left after --exclude-from-fit, nothing to fit")
        return 0
    res = fit(clean(used), gamma_s_per_byte=g_ref)
    # out of sample: leave one link rate out, fit on the others, predict it
    held: dict[int, dict] = {}
    if len({f["rate_bps"] for f in used}) >= 2:
        try:
            for f, h in zip(used, holdout(clean(used), gamma_s_per_byte=g_ref)):
                held[id(f)] = h
        except ConfigError as e:
            print(f"comm_costmodel: no held-out check ({e})")
    rows = []
    for f in fit_recs:
        r = f["_rec"]
        pred = res.predict(f["method"], f["p"], f["n"], f["rate_bps"])
        h = held.get(id(f))
        rows.append({"model": r["model"], "bandwidth": r["bandwidth"], "method": r["method"], "in_fit": f["_in_fit"],
                     "target": "step_total_s" if r.get("family") == "lowbit" else "step_s",
                     "measured_s": f["step_s"], "predicted_s": pred, "predicted_comm_s": pred - f["_codec"],
                     "predicted_codec_s": f["_codec"], "rel_err": (pred - f["step_s"]) / f["step_s"],
                     "heldout_predicted_s": h["predicted_s"] if h else None,
                     "heldout_rel_err": h["rel_err"] if h else None,
                     "heldout_alpha_s": h["alpha_s"] if h else None,
                     "heldout_efficiency": h["efficiency"] if h else None})
    res = replace(res, gamma_s_per_byte=0.0)  # for extrapolation: communication only, codec added below
    errs = [abs(r["rel_err"]) for r in rows if r["in_fit"]]
    max_err, med_err = max(errs), statistics.median(errs)
    herrs = [abs(r["heldout_rel_err"]) for r in rows if r["heldout_rel_err"] is not None]
    out_errs = [abs(r["rel_err"]) for r in rows if not r["in_fit"]]
    se = res.stderr
    se_txt = (f" (standard error {se['alpha_s'] * 1e3:.1f} ms; 1/eta = {1 / res.efficiency:.3f} +- "
              f"{se['inv_efficiency']:.3f})") if se else ""
    print(f"\n## cost model fit on {len(used)} of {len(rows)} shaped records ({path.name}"
          + (f", excluded from the fit: {', '.join(excluded)}" if excluded else "") + f"): "
          f"alpha = {res.alpha_s * 1e3:.2f} ms/message{se_txt}, efficiency eta = {res.efficiency:.3f}; "
          f"codec measured in-run: gamma_stream = {gamma_run['stream'] * 1e9:.2f} ns/B, "
          f"gamma_laq = {gamma_run['laq'] * 1e9:.1f} ns/B; in-sample |rel err| median {med_err:.2f}, max {max_err:.2f}"
          + (f"; held-out-rate |rel err| median {statistics.median(herrs):.2f}, max {max(herrs):.2f}" if herrs else "")
          + (f"; excluded records |rel err| max {max(out_errs):.2f}" if out_errs else ""))
    if g1:
        print("single-process codec cost (process CPU time), ns per fp32 byte: " +
              ", ".join(f"{k} {v * 1e9:.2f}" for k, v in g1.items()))
    print_table(rows, ["model", "bandwidth", "method", "in_fit", "target", "measured_s", "predicted_s",
                       "predicted_comm_s", "predicted_codec_s", "rel_err", "heldout_predicted_s", "heldout_rel_err"],
                {"measured_s": "{:.4f}", "predicted_s": "{:.4f}", "predicted_comm_s": "{:.4f}",
                 "predicted_codec_s": "{:.4f}", "rel_err": "{:+.2f}", "heldout_predicted_s": "{:.4f}",
                 "heldout_rel_err": "{:+.2f}"})
    folds = sorted({(r["bandwidth"], r["heldout_alpha_s"], r["heldout_efficiency"]) for r in rows
                    if r["heldout_alpha_s"] is not None})
    for bw, a_h, e_h in folds:
        print(f"  fit without {bw}: alpha = {a_h * 1e3:.2f} ms/message, eta = {e_h:.3f}")

    # goal check at 1 Gbit/s, for each transport at w2/g3
    goal = []
    for model in sorted({r["model"] for r in measured}):
        at = {r["method"]: r for r in measured if r["model"] == model and r.get("rate_mbit") == 1000}
        fp, ps = at.get("fp32_allreduce"), at.get("ddp_powersgd4")
        for method in ("lowbit_ps_w2g3", "lowbit_ring_w2g3", "lowbit_tree_w2g3"):
            lb = at.get(method)
            if lb and fp:
                goal.append({"model": model, "method": method, "speedup_vs_fp32": fp["step_s"] / lb["step_s"],
                             "speedup_total_vs_fp32": fp["step_s"] / lb["step_total_s"],
                             "step_over_ideal": lb["step_s"] / lb["ideal_s"],
                             "vs_powersgd": (ps["step_s"] / lb["step_s"]) if ps else None,
                             "vs_powersgd_total": (ps["step_s"] / lb["step_total_s"]) if ps else None})
    if goal:
        print("\n## goal at 1 Gbit/s (w2/g3): >= 8x faster than fp32 all_reduce, <= 1.3x its ideal")
        print_table(goal, ["model", "method", "speedup_vs_fp32", "speedup_total_vs_fp32", "step_over_ideal",
                           "vs_powersgd", "vs_powersgd_total"],
                    {k: "{:.2f}" for k in ("speedup_vs_fp32", "speedup_total_vs_fp32", "step_over_ideal",
                                           "vs_powersgd", "vs_powersgd_total")})

    # extrapolation: BERT-base, p = nodes
    nodes = [int(x) for x in args.nodes.split(",")]
    meths = [Method("fp32_allreduce", "allreduce", g_bits=32), Method("ddp_fp16", "allreduce", g_bits=16),
             Method("ddp_powersgd4", "powersgd", rank=4, shapes=bert_param_shapes())]
    low = []
    for t in ("ring", "tree", "ps"):
        for c, (w, g) in (("w2g3", (2, 3)), ("w4g3", (4, 3)), ("w8g8", (8, 8))):
            low.append(Method(f"lowbit_{t}_{c}", t, g_bits=g, w_bits=w))
    ext = extrapolate(res, meths + low, nodes=nodes, gpus_per_node=args.gpus_per_node, n=BERT_BASE_N)
    # the same with alpha = 0: the bandwidth term alone, a lower bound that does not lean on alpha
    ext0 = extrapolate(replace(res, alpha_s=0.0), meths + low, nodes=nodes, gpus_per_node=args.gpus_per_node,
                       n=BERT_BASE_N)
    fp32 = {(e["nodes"], e["rate_bps"]): e["step_s"] for e in ext if e["method"] == "fp32_allreduce"}
    fp32_0 = {(e["nodes"], e["rate_bps"]): e["step_s"] for e in ext0 if e["method"] == "fp32_allreduce"}
    for e, e0 in zip(ext, ext0):
        e["step_s_gpu_codec"] = e["step_s"]  # communication only (codec on a GPU: negligible)
        e["step_s_alpha0"] = e0["step_s"]
        e["speedup_vs_fp32_alpha0"] = fp32_0[(e["nodes"], e["rate_bps"])] / e0["step_s"]
        e["codec_s_cpu"] = codec_s(e["kind"], e["n"], e["p"], None, gamma_node)
        e["step_s"] = e["step_s_gpu_codec"] + e["codec_s_cpu"]
        e["speedup_vs_fp32"] = fp32[(e["nodes"], e["rate_bps"])] / e["step_s"]
        e["speedup_vs_fp32_gpu_codec"] = fp32[(e["nodes"], e["rate_bps"])] / e["step_s_gpu_codec"]
        e["bandwidth"] = f"{e['rate_bps'] / 1e9:g}Gbit"
        e["cluster"] = f"{e['nodes']}x{e['gpus_per_node']}"
    print(f"\n## extrapolation, BERT-base ({BERT_BASE_N / 1e6:.1f}M), one endpoint per node, "
          f"alpha/eta fitted here; step_s adds the codec at this CPU's single-process speed "
          f"(one core per node), step_s_gpu_codec is communication only")
    print_table(ext, ["cluster", "bandwidth", "method", "bytes_per_node", "codec_s_cpu", "step_s", "speedup_vs_fp32",
                      "step_s_gpu_codec", "speedup_vs_fp32_gpu_codec", "step_s_alpha0", "speedup_vs_fp32_alpha0"],
                {"bytes_per_node": "{:.3e}", "codec_s_cpu": "{:.3f}", "step_s": "{:.3f}", "speedup_vs_fp32": "{:.2f}",
                 "step_s_gpu_codec": "{:.3f}", "speedup_vs_fp32_gpu_codec": "{:.2f}", "step_s_alpha0": "{:.3f}",
                 "speedup_vs_fp32_alpha0": "{:.2f}"})

    fit_doc = {"alpha_s": res.alpha_s, "efficiency": res.efficiency, "stderr": res.stderr,
               "gamma_run_s_per_byte": gamma_run, "gamma_node_s_per_byte": gamma_node, "gamma_1proc": g1,
               "header_bytes_per_msg": res.header_bytes_per_msg, "r2_comm": res.r2,
               "n_fitted": len(used), "excluded_from_fit": excluded,
               "median_abs_rel_err": med_err, "max_abs_rel_err": max_err,
               "heldout_median_abs_rel_err": statistics.median(herrs) if herrs else None,
               "heldout_max_abs_rel_err": max(herrs) if herrs else None,
               "heldout_folds": [{"held_out": bw, "alpha_s": a_h, "efficiency": e_h} for bw, a_h, e_h in folds],
               "excluded_max_abs_rel_err": max(out_errs) if out_errs else None}
    write_json(args.json, ext, {"measured": str(path), "argv": list(sys.argv[1:] if argv is None else argv),
                                "fit": fit_doc, "fit_records": rows, "goal_1gbit": goal,
                                "assumption": ext[0]["assumption"] if ext else None})
    plot(rows, ext, Path(args.plot), res, gamma_run)
    return 0


def plot(rows, ext, path: Path, res, gamma) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5.5))
    for model, mk in zip(sorted({r["model"] for r in rows}), "os^v"):
        rs = [r for r in rows if r["model"] == model and r.get("in_fit", True)]
        a.scatter([r["measured_s"] for r in rs], [r["predicted_s"] for r in rs], marker=mk, s=18,
                  label=f"{model} (fitted)")
        rs = [r for r in rows if r["model"] == model and not r.get("in_fit", True)]
        if rs:
            a.scatter([r["measured_s"] for r in rs], [r["predicted_s"] for r in rs], marker=mk, s=30,
                      facecolors="none", edgecolors="k", label=f"{model} (not fitted: " +
                      ", ".join(sorted({r["method"] for r in rs})) + ")")
        rs = [r for r in rows if r["model"] == model and r.get("heldout_predicted_s") is not None]
        if rs:
            a.scatter([r["measured_s"] for r in rs], [r["heldout_predicted_s"] for r in rs], marker="x", s=30,
                      label=f"{model}, its link rate held out of the fit")
    preds = [r["predicted_s"] for r in rows] + [r["heldout_predicted_s"] for r in rows
                                                 if r.get("heldout_predicted_s") is not None]
    lo = min(min(r["measured_s"] for r in rows), min(preds))
    hi = max(max(r["measured_s"] for r in rows), max(preds))
    a.plot([lo, hi], [lo, hi], "k--", lw=1)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("measured s/step")
    a.set_ylabel("predicted s/step")
    se = f" +- {res.stderr['alpha_s'] * 1e3:.0f}" if res.stderr else ""
    a.set_title(f"fit: alpha={res.alpha_s * 1e3:.1f}{se} ms, eta={res.efficiency:.2f}; codec measured "
                f"({gamma['stream'] * 1e9:.1f} / {gamma['laq'] * 1e9:.0f} ns/B)", fontsize=10)
    a.legend(fontsize=7)
    a.grid(True, which="both", alpha=0.3)
    settings = sorted({(e["nodes"], e["rate_bps"]) for e in ext})
    methods = list(dict.fromkeys(e["method"] for e in ext))
    width = 0.8 / len(settings)
    for j, (nd, rate) in enumerate(settings):
        ys = [next(e["step_s_gpu_codec"] for e in ext if e["method"] == m and e["nodes"] == nd and e["rate_bps"] == rate)
              for m in methods]
        b.bar([i + j * width for i in range(len(methods))], ys, width, label=f"{nd} nodes, {rate / 1e9:g} Gbit/s")
        y0 = [next(e.get("step_s_alpha0") for e in ext if e["method"] == m and e["nodes"] == nd and e["rate_bps"] == rate)
              for m in methods]
        if all(v is not None for v in y0):
            b.scatter([i + j * width for i in range(len(methods))], y0, marker="_", s=40, c="k",
                      label="alpha = 0 (bandwidth term only)" if j == 0 else None, zorder=3)
    b.set_yscale("log")
    b.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))])
    b.set_xticklabels(methods, rotation=60, ha="right", fontsize=7)
    b.set_ylabel("predicted communication s/step (gamma = 0)")
    b.set_title("BERT-base extrapolated (one endpoint per node)")
    b.legend(fontsize=8)
    b.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
