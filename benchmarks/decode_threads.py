"""Decode throughput with several codec threads, P rank-like processes at once.

    python benchmarks/decode_threads.py --procs 4 --configs 1x1,1x4,4x4,4x1 --json benchmarks/results/decode_threads.json

Each config ``TxC`` starts ``--procs`` processes at the same time, each with torch intra-op threads
T (OMP_NUM_THREADS and torch.set_num_threads) and lowbit codec threads C (LOWBIT_CODEC_THREADS);
each decodes 3-bit gradient frames of 2M values into one buffer (as a parameter server's sum does)
and reports its best wall time per 8M values. Printed: per config the median and the slowest
process, and the speedup of the slowest against config 1x1. Needs procs x C cores to mean anything.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, print_table, write_json  # noqa: E402

CHILD = """
import time, torch
torch.set_num_threads(int(__import__('os').environ['OMP_NUM_THREADS']))
from lowbit.codec import Frame, StochasticGradCodec, decode_frame
N = 2 << 20
fr = [Frame.from_bytes(StochasticGradCodec(3).encode(torch.randn(N), key=i, generator=torch.Generator().manual_seed(i)).to_bytes()) for i in range(4)]
out = torch.zeros(N)
best = 1e9
for _ in range({reps}):
    t = time.perf_counter()
    for f in fr:
        decode_frame(f, out=out, accumulate=True)
    best = min(best, time.perf_counter() - t)
print(best)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--configs", default="1x1,1x4,4x4,4x1", help="TxC: torch threads x codec threads")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=str(RESULTS / "decode_threads.json"))
    args = ap.parse_args(argv)
    configs = []
    for c in args.configs.split(","):
        t, _, k = c.partition("x")
        if not (t.isdigit() and k.isdigit() and int(t) >= 1 and int(k) >= 1):
            raise SystemExit(f"config {c!r}: expected TxC with positive integers, e.g. 1x4")
        configs.append((int(t), int(k)))
    recs = []
    for t, k in configs:
        env = dict(os.environ, OMP_NUM_THREADS=str(t), LOWBIT_CODEC_THREADS=str(k),
                   PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
        procs = [subprocess.Popen([sys.executable, "-c", CHILD.format(reps=args.reps)], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(args.procs)]
        times = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                raise SystemExit(f"config {t}x{k}: a process failed with exit code {p.returncode}")
            times.append(float(out.strip().splitlines()[-1]))
        recs.append({"torch_threads": t, "codec_threads": k, "procs": args.procs,
                     "ms_per_8M_median": 1e3 * statistics.median(times), "ms_per_8M_slowest": 1e3 * max(times),
                     "ms_per_8M": [1e3 * x for x in times]})
    base = next((r for r in recs if r["torch_threads"] == 1 and r["codec_threads"] == 1), None)
    for r in recs:
        r["speedup_slowest_vs_1x1"] = base["ms_per_8M_slowest"] / r["ms_per_8M_slowest"] if base else None
    print_table(recs, ["torch_threads", "codec_threads", "procs", "ms_per_8M_median", "ms_per_8M_slowest",
                       "speedup_slowest_vs_1x1"],
                {"ms_per_8M_median": "{:.1f}", "ms_per_8M_slowest": "{:.1f}", "speedup_slowest_vs_1x1": "{:.2f}"})
    write_json(args.json, recs, {"command": "python benchmarks/decode_threads.py " + " ".join(argv or sys.argv[1:]),
                                 "cpu_count": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
