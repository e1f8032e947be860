"""The codec against another git revision of it, in one process, runs interleaved.

    python benchmarks/codec_ab.py --rev HEAD~1 --json benchmarks/results/codec_ab.json

``lowbit/codec/codecs.py`` as it was at ``--rev`` (read with ``git show``) is loaded as a second
module next to the working tree's; its imports (pack, frame, quantizers) resolve to the working
tree, so this compares that one file. One thread. For each repetition both versions encode the
same gradient and decode its frame into a warm buffer ("into": a worker decoding weights) and add
it to one ("add": a server summing gradients), and decodes the frames of every tensor of
``--model`` one by one ("model-into" / "model-add": as transports do, small LayerNorm and bias
frames included, where a fixed cost per frame shows); per cell the best of the repetitions in CPU time
(other jobs on the cores do not count), in millions of values per second. Interleaving keeps slow
drifts of a shared machine out of the comparison, which separate runs do not.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, write_json  # noqa: E402

import lowbit.codec.codecs as new  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_revision(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:lowbit/codec/codecs.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("lowbit.codec._codecs_ab", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    exec(compile(src, f"{rev}:lowbit/codec/codecs.py", "exec"), mod.__dict__)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="git revision of lowbit/codec/codecs.py to compare with")
    ap.add_argument("--numel", type=int, default=16 << 20)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--model", default="minilm", help="tensor shapes for the model-* rows (as comm_bandwidth.py)")
    ap.add_argument("--json", default=str(RESULTS / "codec_ab.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    old = load_revision(args.rev)
    bits = [int(b) for b in args.bits.split(",")]
    g = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    out = torch.zeros(args.numel)
    from _comm_common import lowbit_pieces, model_shapes
    pieces = [torch.randn(s, generator=torch.Generator().manual_seed(2)) * 1e-2
              for s in lowbit_pieces(model_shapes(args.model))]
    n_model = sum(t.numel() for t in pieces)
    bufs = [torch.zeros(t.numel()) for t in pieces]
    best: dict[tuple, float] = {}

    def timed(key, fn) -> None:
        t = time.process_time()
        fn()
        best[key] = min(best.get(key, float("inf")), time.process_time() - t)

    for _ in range(args.reps):
        for b in bits:
            for name, mod in (("old", old), ("new", new)):
                codec = mod.StochasticGradCodec(b)
                f = codec.encode(g, generator=torch.Generator().manual_seed(1))
                timed((b, "encode", name), lambda: codec.encode(g, generator=torch.Generator().manual_seed(1)))
                timed((b, "into", name), lambda: mod.decode_frame(f, out=out))
                timed((b, "add", name), lambda: mod.decode_frame(f, out=out, accumulate=True))
                frames = [codec.encode(t, generator=torch.Generator().manual_seed(1)) for t in pieces]
                timed((b, "model-into", name), lambda: [mod.decode_frame(fr, out=o) for fr, o in zip(frames, bufs)])
                timed((b, "model-add", name),
                      lambda: [mod.decode_frame(fr, out=o, accumulate=True) for fr, o in zip(frames, bufs)])
    # the two versions must agree bit for bit
    for b in bits:
        fo = old.StochasticGradCodec(b).encode(g, generator=torch.Generator().manual_seed(1))
        fn = new.StochasticGradCodec(b).encode(g, generator=torch.Generator().manual_seed(1))
        if not (torch.equal(fo.payload, fn.payload) and torch.equal(old.decode_frame(fo), new.decode_frame(fn))):
            raise SystemExit(f"{b}-bit: the two revisions encode or decode differently")
    def values(op):
        return n_model if op.startswith("model") else args.numel

    recs = [{"bits": b, "op": op, "old_mvalues_per_s": values(op) / best[(b, op, "old")] / 1e6,
             "new_mvalues_per_s": values(op) / best[(b, op, "new")] / 1e6,
             "speedup": best[(b, op, "old")] / best[(b, op, "new")]}
            for b in bits for op in ("encode", "into", "add", "model-into", "model-add")]
    print_table(recs, ["bits", "op", "old_mvalues_per_s", "new_mvalues_per_s", "speedup"],
                {"old_mvalues_per_s": "{:.0f}", "new_mvalues_per_s": "{:.0f}", "speedup": "{:.2f}"})
    write_json(args.json, recs, {"command": "python benchmarks/codec_ab.py " + " ".join(argv or sys.argv[1:]),
                                 "rev": args.rev, "numel": args.numel, "reps": args.reps, "model": args.model,
                                 "model_tensors": len(pieces), "model_values": n_model,
                                 "timer": "process_time, best of reps, one thread"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
