"""Decode speed per CPU decode chunk (lowbit.codec.codecs.CHUNK) in one process, settings interleaved.

    python benchmarks/decode_chunk_ab.py --json benchmarks/results/decode_chunk_ab.json

One thread. For each repetition every chunk size decodes the same 2-bit and 3-bit gradient frames
into a warm buffer ("into", as a worker decodes weights) and adds them to it ("add", as a server sums
gradients); per setting the best of the repetitions in CPU time (other jobs on the cores do not
count), in millions of values per second. Interleaving keeps slow drifts of a shared machine out of
the comparison, which separate runs of codec_throughput.py do not.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, write_json  # noqa: E402

import lowbit.codec.codecs as codecs_module  # noqa: E402
from lowbit.codec import Frame, StochasticGradCodec, decode_frame  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=16 << 20)
    ap.add_argument("--chunks", default="32768,65536,131072,262144", help="payload bytes per chunk")
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--json", default=str(RESULTS / "decode_chunk_ab.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    chunks = [int(c) for c in args.chunks.split(",")]
    if min(chunks) < 8:
        raise SystemExit("chunk sizes must be >= 8 bytes")
    bits = [int(b) for b in args.bits.split(",")]
    frames = {b: Frame.from_bytes(StochasticGradCodec(b).encode(
        torch.randn(args.numel), generator=torch.Generator().manual_seed(0)).to_bytes()) for b in bits}
    out = torch.zeros(args.numel)
    default = codecs_module.CHUNK
    best: dict[tuple, float] = {}
    try:
        for _ in range(args.reps):
            for ch in chunks:
                codecs_module.CHUNK = ch
                for b in bits:
                    for acc in (False, True):
                        t = time.process_time()
                        decode_frame(frames[b], out=out, accumulate=acc)
                        dt = time.process_time() - t
                        best[(b, acc, ch)] = min(best.get((b, acc, ch), float("inf")), dt)
    finally:
        codecs_module.CHUNK = default
    recs = []
    for b in bits:
        for acc in (False, True):
            base = best[(b, acc, chunks[0])]
            for ch in chunks:
                dt = best[(b, acc, ch)]
                recs.append({"bits": b, "mode": "add" if acc else "into", "chunk_bytes": ch,
                             "default": ch == default, "mvalues_per_s": args.numel / dt / 1e6,
                             "vs_first": base / dt})
    print_table(recs, ["bits", "mode", "chunk_bytes", "default", "mvalues_per_s", "vs_first"],
                {"mvalues_per_s": "{:.0f}", "vs_first": "{:.2f}"})
    write_json(args.json, recs, {"command": "python benchmarks/decode_chunk_ab.py " + " ".join(argv or sys.argv[1:]),
                                 "numel": args.numel, "reps": args.reps, "timer": "process_time, best of reps"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
