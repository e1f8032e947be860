"""The compiled decode loops against each other, interleaved in one process (one core, best of
--reps, wall time): a 4M-value gradient frame decoded into a warm buffer, and the mean of two such
frames (a server's two workers), three ways:

* ``table``: ``_native.decode``, the byte / 12-bit-group table loop with tables scaled by torch ops
  (one frame per call; the mean of two as decode, add, ``div_``);
* ``scalar``: ``_native.decode_sum`` with its AVX2 path off (``_native.simd(0)``: what a CPU without
  AVX2 runs), one pass over the output in 2048-value blocks;
* ``avx2``: ``_native.decode_sum`` as it runs by default on an AVX2 CPU.

Every result is checked bit for bit against ``table``. ``--numel 384`` (a LayerNorm weight) shows
what a small frame costs per call, where scaling the tables by torch ops dominates.

    python benchmarks/decode_sum_ab.py --json benchmarks/results/decode_sum_ab.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import lowbit.codec.codecs as cc  # noqa: E402
from lowbit.codec import Frame, StochasticGradCodec, native  # noqa: E402

sys.path.insert(0, str(HERE))
from _common import print_table, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not native.native_codec_available():
        print("lowbit.codec._native was not built: nothing to compare", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    lib, n, cpu = native.lib, args.numel, torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    has_simd = lib.simd(-1)
    recs = []
    for bits in (int(b) for b in args.bits.split(",")):
        frames = [Frame.from_bytes(StochasticGradCodec(bits).encode(torch.randn(n, generator=gen), generator=gen)
                                   .to_bytes()) for _ in range(2)]
        ref, out = torch.empty(n), torch.empty(n)
        width = 12 if bits == 3 else 8

        def table(f, acc):
            s = f.scales.reshape(())
            one = cc._value_table(f, bits, s, torch.float32, cpu, wide=False)[0]
            tab = cc._value_table(f, width, s, torch.float32, cpu, wide=False)[0]
            lib.decode(f.payload.data_ptr(), f.payload.numel(), ref.data_ptr(), n, bits, tab.data_ptr(),
                       one.data_ptr(), cc._bad_entries(bits, width).data_ptr(), acc)

        ways = {"table": {1: lambda: table(frames[0], False),
                          2: lambda: (table(frames[0], False), table(frames[1], True), ref.div_(2))}}
        for name, on in (("scalar", 0), ("avx2", 1)):
            if on and not has_simd:
                continue
            ways[name] = {1: (lambda on=on: (lib.simd(on), cc._native_sum(frames[:1], out, 1, False))),
                          2: (lambda on=on: (lib.simd(on), cc._native_sum(frames, out, 2, False)))}
        best = {(w, k): float("inf") for w in ways for k in (1, 2)}
        for _ in range(args.reps):  # interleaved: every way once per rep
            for k in (1, 2):
                for w, fns in ways.items():
                    t0 = time.perf_counter()
                    fns[k]()
                    best[(w, k)] = min(best[(w, k)], time.perf_counter() - t0)
                    if w != "table":
                        assert torch.equal(out, ref), f"{w} {k} frames: bits differ from the table loop"
        lib.simd(1 if has_simd else 0)
        for k in (1, 2):
            rec = {"bits": bits, "frames": k, "numel": n}
            rec.update({f"{w}_gvals": n / best[(w, k)] / 1e9 for w in ways})
            rec.update({f"{w}_us": best[(w, k)] * 1e6 for w in ways})  # per call: what small frames pay
            recs.append(rec)
    ways_run = [w for w in ("table", "scalar", "avx2") if f"{w}_gvals" in recs[0]]
    cols = ["bits", "frames", "numel"] + [f"{w}_gvals" for w in ways_run] + [f"{w}_us" for w in ways_run]
    print_table(recs, cols, {c: "{:.2f}" if c.endswith("gvals") else "{:.1f}" for c in cols[3:]})
    if args.json:
        write_json(args.json, recs, {"command": "python benchmarks/decode_sum_ab.py " + " ".join(argv or sys.argv[1:]),
                                     "unit": "G output values per second (best of reps, wall time, one thread)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
