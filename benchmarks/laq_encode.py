"""The server's LAQ weight encode on one shard: seconds, rounds of the alternation, quality.

    python benchmarks/laq_encode.py --n 11350000 --bits 2,4,8 --json benchmarks/results/laq_encode.json

For each bit width: ``WeightCodec('laq-linear', bits).encode(w, d=d, alpha=...)`` of an ``--n``
element shard (Gaussian weights, D = uniform(0.1, 1.1) as Adam's √v̂ + ε) warm-started as the
training server runs it (alpha = the scale of the previous step's weights, which an optimizer step
moved by 0.1% of their mean magnitude) and cold (no alpha), best of ``--reps`` in one thread; the
number of rounds the alternation ran (calls of the compiled round); and the D-weighted objective
‖w − α b‖²_D of the result relative to the best over a dense search of α (the search's codes
b = Π_Q(w/α) with their exact α* = Σdwb / Σdb²), on the first ``--search-n`` elements.
``PYTHONPATH=<worktree>`` runs another version's code (to compare two versions).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, print_table, write_json  # noqa: E402


def search_objective(w: torch.Tensor, d: torch.Tensor, bits: int, points: int = 4000) -> float:
    """The smallest Σ d (w − α* b)² over a grid of α in [0.02, 1] max|w| (linear grid)."""
    k = 2 ** (bits - 1) - 1
    amax, best = float(w.abs().max()), float("inf")
    wd, energy = w.double(), float((d.double() * w.double() ** 2).sum())
    for alphas in torch.linspace(0.02 * amax, amax, points, dtype=torch.float64).split(100):
        b = torch.round(torch.clamp(wd / alphas[:, None] * k, -k, k)) / k
        num, den = (d * wd * b).sum(1), (d * b * b).sum(1)
        best = min(best, float((energy - num ** 2 / den.clamp_min(1e-300)).min()))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=11_350_000, help="elements of the shard (default: a MiniLM server's)")
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--search-n", type=int, default=200_000)
    ap.add_argument("--json", default=str(RESULTS / "laq_encode.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from lowbit.codec.codecs import WeightCodec
    from lowbit.quant import weights as W
    from lowbit.quant.weights import weight_objective

    g = torch.Generator().manual_seed(0)
    n = args.n // 1024 * 1024
    w = (torch.randn(n, generator=g) * 0.05).view(1024, -1)
    d = torch.rand(w.shape, generator=g) + 0.1
    moved = w + 1e-3 * w.abs().mean() * torch.randn(w.shape, generator=g)
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        codec = WeightCodec("laq-linear", bits)
        prev = codec.quantize(w, d).scale
        m = min(args.search_n, n)
        ws, dsub = moved.reshape(-1)[:m], d.reshape(-1)[:m]
        best = search_objective(ws, dsub, bits)
        for start, alpha in (("warm", prev), ("cold", None)):
            calls, real = [0], (W._laq.round if W._laq is not None else None)
            ts = []
            for rep in range(args.reps):
                if real is not None and rep == 0:
                    def counting(*a, _r=real):
                        calls[0] += 1
                        return _r(*a)
                    W._laq.round = counting
                try:
                    t0 = time.perf_counter()
                    codec.encode(moved, key=0, step=0, d=d, alpha=alpha).to_bytes()
                    ts.append(time.perf_counter() - t0)
                finally:
                    if real is not None:
                        W._laq.round = real
            q = W.laq_project(ws, d=dsub, bits=bits, alpha=None if alpha is None else float(alpha))
            rows.append({"bits": bits, "start": start, "n": n, "ms": 1e3 * min(ts), "ns_per_elem": 1e9 * min(ts) / n,
                         "rounds": calls[0] if real is not None else None,
                         "objective_vs_search": float(weight_objective(ws, q, dsub)) / best - 1})
    print_table(rows, ["bits", "start", "n", "ms", "ns_per_elem", "rounds", "objective_vs_search"],
                {"ms": "{:.1f}", "ns_per_elem": "{:.2f}", "objective_vs_search": "{:+.1e}"})
    write_json(args.json, rows, {"command": "python " + " ".join([sys.argv[0]] + sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
