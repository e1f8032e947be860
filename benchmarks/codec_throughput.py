"""Codec throughput against memcpy, on one core.

    python benchmarks/codec_throughput.py --json benchmarks/results/codec_throughput.json
    lowbit bench codec --json ...

For each size and codec: encode (quantize + pack + frame bytes) and decode (validate + CRC + unpack
+ dequantize) throughput in GB/s of fp32 input, next to a torch.clone of the same tensor measured in
the same run; payload bytes and the ratio to fp32. Decode three ways: into a new tensor
(``decode_gbps``), into a warm buffer as the transports' workers do (``decode_into_gbps``), and added
into a warm buffer as a server sums gradients (``decode_add_gbps``); and a server's whole op on two
workers' frames of a tensor, their mean into a warm buffer: ``decode_sum`` in one pass
(``mean2_gbps``) and the same as decode into, decode add, ``div_`` (``mean2_sequential_gbps``); GB/s
there count the fp32 output once. ``--codec-threads N`` decodes on
N threads (lowbit.codec.set_codec_threads); ``--decode-chunk BYTES`` overrides the decode chunk
(A/B of lowbit.codec.decode.CHUNK_BYTES in one run); ``--nt-stores BYTES`` sets the output size from
which the compiled decode writes with streaming stores (``off``: never; A/B of the default). The
bounds next to them: ``copy_into_gbps`` (read and write, a warm buffer) and ``fill_gbps`` (write
only: what a decode, which reads 1/16-1/4 of what it writes, is bound by).

The wire formats that send less than a whole frame get rows of their own (``--no-wire`` skips
them), with bits per value on the wire: delta-coded LAQ weights (``weight-2bit-delta``,
``weight-4bit-delta``: a MiniLM-sized matrix after one Adam-sized step, lr 1e-4; encode = the owner's
DeltaEncoder against the previous frame, decode = DeltaDecoder.apply and the decode into a warm
buffer) and a row-sparse embedding gradient (``grad-3bit-rowsparse``: MiniLM's 30,522 x 384 word
embedding with 384 rows touched, as one batch of 8 x 48 tokens does at most).

``--entropy`` evaluates entropy coders on the unpacked codes of a heavy-tailed (Student-t, 3 degrees
of freedom) gradient at 2, 3 and 4 bits: the empirical entropy, zlib-ng deflate, zstandard and
constriction's rANS with the codes' own categorical model (``pip install zstandard constriction``;
rows are skipped with a message where a package is missing): bits per value and M values/s.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from lowbit.benchmarks._common import RESULTS, print_table, write_json  # noqa: E402

import lowbit.codec.decode as decode_module  # noqa: E402
from lowbit.codec import (Frame, StochasticGradCodec, WeightCodec, decode_frame, decode_sum, native,  # noqa: E402
                          set_codec_threads)
from lowbit.testing import kept_settings  # noqa: E402


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(fn, reps: int, clock=time.perf_counter) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return min(ts)


def codecs():
    return [
        ("grad-2bit", 2, StochasticGradCodec(2), None),
        ("grad-3bit", 3, StochasticGradCodec(3), None),
        ("grad-4bit", 4, StochasticGradCodec(4), None),
        ("grad-8bit", 8, StochasticGradCodec(8), None),
        ("weight-ternary-laq", 2, WeightCodec("laq-linear", 2), "d"),
        ("weight-4bit-laq", 4, WeightCodec("laq-linear", 4), "d"),
    ]


def main(argv=None) -> int:
    """The benchmark; every process-wide setting it changes (threads, the codec switch, the decode
    chunk, the streaming-store threshold) is put back when it returns."""
    chunk = decode_module.CHUNK_BYTES
    with kept_settings():
        try:
            return _main(argv)
        finally:
            decode_module.CHUNK_BYTES = chunk


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,16M,64M")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS / "codec_throughput.json"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timer", choices=sorted(CLOCKS), default="wall",
                    help="wall: perf_counter; cpu: this process's CPU time (user+system, so page faults "
                         "count), robust when other jobs share the cores (CPU device only)")
    ap.add_argument("--codec-threads", type=int, default=1, help="lowbit decode threads (set_codec_threads)")
    ap.add_argument("--torch-ops", action="store_true",
                    help="the torch-op codec only (lowbit.codec.set_native_codec(False)): the compiled loops' baseline")
    ap.add_argument("--decode-chunk", type=int, default=None,
                    help=f"CPU decode chunk in payload bytes (default {decode_module.CHUNK_BYTES})")
    ap.add_argument("--no-wire", action="store_true", help="skip the delta-coded and row-sparse rows")
    ap.add_argument("--entropy", action="store_true", help="also evaluate entropy coders on gradient codes")
    ap.add_argument("--nt-stores", default=None,
                    help="output bytes from which the compiled decode uses streaming stores, or 'off' "
                         "(default: the extension's, lowbit.codec._native.nt_stores(-1))")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    set_codec_threads(args.codec_threads)
    if args.torch_ops:
        native.set_native_codec(False)
    if args.decode_chunk is not None:
        if args.decode_chunk < 8:
            raise SystemExit("--decode-chunk must be >= 8 bytes")
        decode_module.CHUNK_BYTES = args.decode_chunk
    if args.nt_stores is not None:
        if not native.native_codec_available():
            raise SystemExit("--nt-stores needs the compiled codec (lowbit.codec._native)")
        native.lib.nt_stores(1 << 62 if args.nt_stores == "off" else int(float(args.nt_stores)))
    nt_min = native.lib.nt_stores(-1) if native.native_codec_available() else None
    dev = torch.device(args.device)
    sizes = [int(float(s[:-1]) * 2**20) if s[-1] in "Mm" else int(s) for s in args.sizes.split(",")]
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    timer = "wall" if dev.type != "cpu" else args.timer
    clock = CLOCKS[timer]
    recs = []
    for n in sizes:
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(n, generator=gen, device=dev).reshape(-1, 1024) if n % 1024 == 0 else torch.randn(n, device=dev)
        d = torch.rand(x.shape, generator=gen, device=dev) + 0.1
        reps = max(1, args.reps if n <= 2**24 else args.reps - 1)

        def memcpy():
            x.clone()
            sync()
        t_mem = best_time(memcpy, reps, clock)
        dst = torch.empty_like(x)

        def copy_into():  # the same copy into warm, preallocated memory: the bandwidth bound itself
            dst.copy_(x)
            sync()
        t_copy = best_time(copy_into, reps, clock)

        def fill():  # write only, no read: the bound of a decode's output
            dst.fill_(1.0)
            sync()
        t_fill = best_time(fill, reps, clock)
        raw = n * 4
        for name, bits, codec, needs_d in codecs():
            kw = {"d": d} if needs_d else {"generator": torch.Generator(device=dev).manual_seed(1)}
            box = {}

            def enc():
                box["b"] = codec.encode(x, **kw).to_bytes()
                sync()

            def dec():
                codec.decode(Frame.from_bytes(box["b"]), device=dev)
                sync()

            flat = dst.view(-1)

            def dec_into():
                decode_frame(Frame.from_bytes(box["b"]), out=flat)
                sync()

            def dec_add():
                decode_frame(Frame.from_bytes(box["b"]), out=flat, accumulate=True)
                sync()

            def mean2():  # a server's op: two workers' frames of a tensor averaged into a warm buffer
                f = Frame.from_bytes(box["b"])
                decode_sum([f, f], flat, divisor=2)
                sync()

            def mean2_seq():  # the same, one frame after the other, then the division
                f = Frame.from_bytes(box["b"])
                decode_frame(f, out=flat)
                decode_frame(f, out=flat, accumulate=True)
                flat.div_(2)
                sync()
            t_enc = best_time(enc, reps, clock)
            t_dec = best_time(dec, reps, clock)
            t_into = best_time(dec_into, reps, clock)
            t_add = best_time(dec_add, reps, clock)
            t_mean2, t_mean2_seq = best_time(mean2, reps, clock), best_time(mean2_seq, reps, clock)
            payload = len(box["b"])
            recs.append({"codec": name, "bits": bits, "numel": n, "encode_gbps": raw / t_enc / 1e9,
                         "decode_gbps": raw / t_dec / 1e9, "decode_into_gbps": raw / t_into / 1e9,
                         "decode_add_gbps": raw / t_add / 1e9,
                         "mean2_gbps": raw / t_mean2 / 1e9, "mean2_sequential_gbps": raw / t_mean2_seq / 1e9,
                         "memcpy_gbps": raw / t_mem / 1e9,
                         "copy_into_gbps": raw / t_copy / 1e9, "fill_gbps": raw / t_fill / 1e9, "encode_vs_copy_into": t_copy / t_enc,
                         "decode_vs_copy_into": t_copy / t_dec,
                         "encode_vs_memcpy": t_mem / t_enc, "decode_vs_memcpy": t_mem / t_dec,
                         "payload_bytes": payload, "raw_bytes": raw, "ratio": raw / payload,
                         "device": str(dev), "threads": args.threads, "codec_threads": args.codec_threads,
                         "decode_chunk": decode_module.CHUNK_BYTES, "nt_min_bytes": nt_min, "timer": timer,
                         "native": native.native_codec_enabled()})
            print(f"  {name:20s} n={n:>9d} enc {raw / t_enc / 1e9:6.2f} GB/s  dec {raw / t_dec / 1e9:6.2f} GB/s"
                  f"  into {raw / t_into / 1e9:6.2f}  add {raw / t_add / 1e9:6.2f}"
                  f"  mean2 {raw / t_mean2 / 1e9:6.2f} (sequential {raw / t_mean2_seq / 1e9:6.2f})",
                  file=sys.stderr, flush=True)
    print_table(recs, ["codec", "numel", "encode_gbps", "decode_gbps", "decode_into_gbps", "decode_add_gbps",
                       "mean2_gbps", "mean2_sequential_gbps",
                       "memcpy_gbps", "copy_into_gbps", "fill_gbps",
                       "encode_vs_memcpy", "decode_vs_memcpy", "payload_bytes", "ratio"],
                {"encode_gbps": "{:.2f}", "decode_gbps": "{:.2f}", "decode_into_gbps": "{:.2f}",
                 "decode_add_gbps": "{:.2f}", "mean2_gbps": "{:.2f}", "mean2_sequential_gbps": "{:.2f}",
                 "memcpy_gbps": "{:.2f}", "copy_into_gbps": "{:.2f}", "fill_gbps": "{:.2f}",
                 "encode_vs_memcpy": "{:.3f}", "decode_vs_memcpy": "{:.3f}", "ratio": "{:.1f}"})
    if not args.no_wire and dev.type == "cpu":
        recs += wire_rows(max(1, args.reps), clock)
    if args.entropy:
        recs += entropy_rows(max(1, args.reps), clock)
    write_json(args.json, recs, {"command": "python benchmarks/codec_throughput.py " + " ".join(argv or sys.argv[1:])})
    return 0


def entropy_rows(reps: int, clock, n: int = 4 << 20) -> list[dict]:
    """Entropy coders on the codes of clipped stochastic gradients: bits per value, M values/s."""
    import numpy as np
    from zlib_ng import zlib_ng

    from lowbit.codec.pack import unpack_bits

    g = torch.distributions.StudentT(3.0).sample((n,))
    out = []
    for bits in (2, 3, 4):
        f = StochasticGradCodec(bits).encode(g, generator=torch.Generator().manual_seed(0))
        codes = unpack_bits(f.payload, bits, n).numpy()
        counts = np.bincount(codes, minlength=1 << bits).astype(np.float64)
        p = counts[counts > 0] / n
        coders = {"deflate": (lambda c: zlib_ng.compress(c.tobytes(), 1), zlib_ng.decompress)}
        try:
            import zstandard
            coders["zstd"] = (zstandard.ZstdCompressor(level=1).compress, zstandard.ZstdDecompressor().decompress)
        except ImportError:
            print("  zstd: skipped (pip install zstandard)", file=sys.stderr)
        try:
            import constriction
            probs = np.maximum(counts / n, 1e-7).astype(np.float32)
            model = constriction.stream.model.Categorical(probs / probs.sum(), perfect=False)

            def rans_enc(c):
                enc = constriction.stream.stack.AnsCoder()
                enc.encode_reverse(c.astype(np.int32), model)
                return enc.get_compressed()

            coders["rans"] = (rans_enc, lambda z: constriction.stream.stack.AnsCoder(z).decode(model, n))
        except ImportError:
            print("  rans: skipped (pip install constriction)", file=sys.stderr)
        for name, (enc, dec) in coders.items():
            box = {}
            t_enc = best_time(lambda: box.__setitem__("z", enc(codes)), reps, clock)
            t_dec = best_time(lambda: box.__setitem__("d", dec(box["z"])), reps, clock)
            size = box["z"].nbytes if hasattr(box["z"], "nbytes") else len(box["z"])
            assert np.array_equal(np.frombuffer(box["d"], np.uint8) if isinstance(box["d"], bytes) else box["d"], codes)
            r = {"codec": f"grad-{bits}bit-{name}", "bits": bits, "numel": n, "entropy_bits": float(-(p * np.log2(p)).sum()),
                 "bits_per_value": 8 * size / n, "encode_mvps": n / t_enc / 1e6, "decode_mvps": n / t_dec / 1e6}
            print(f"  {r['codec']:20s} {r['bits_per_value']:.3f} bits/value (entropy {r['entropy_bits']:.3f})"
                  f"  enc {r['encode_mvps']:.0f} M/s  dec {r['decode_mvps']:.0f} M/s", file=sys.stderr, flush=True)
            out.append(r)
    return out


def wire_rows(reps: int, clock) -> list[dict]:
    """Delta-coded weights and row-sparse gradients: bits per value on the wire, encode and decode
    GB/s of fp32 values, against a copy of the same tensor."""
    from lowbit.codec.delta import DeltaDecoder, DeltaEncoder
    from lowbit.codec.entropy import EntropyCodec
    from lowbit.codec.sparse import RowSparseCodec
    from lowbit.codec.threshold import ThresholdGradCodec

    gen = torch.Generator().manual_seed(0)
    out = []

    def row(name, x, wire_bytes, t_enc, t_dec, t_copy, extra):
        raw = x.numel() * 4
        r = {"codec": name, "numel": x.numel(), "encode_gbps": raw / t_enc / 1e9, "decode_into_gbps": raw / t_dec / 1e9,
             "copy_into_gbps": raw / t_copy / 1e9, "payload_bytes": wire_bytes, "raw_bytes": raw,
             "ratio": raw / wire_bytes, "bits_per_value": 8 * wire_bytes / x.numel(), **extra}
        print(f"  {name:20s} n={x.numel():>9d} enc {r['encode_gbps']:6.2f} GB/s  dec {r['decode_into_gbps']:6.2f} GB/s"
              f"  {r['bits_per_value']:.3f} bits/value", file=sys.stderr, flush=True)
        out.append(r)

    w = 0.05 * torch.randn(1536, 384 * 8, generator=gen)  # 4.7M values, a MiniLM-sized block
    d = torch.rand(w.shape, generator=gen) + 0.1
    step = 1e-4 * torch.randn(w.shape, generator=gen).sign()  # Adam's step is about lr per weight
    dst = torch.empty_like(w).view(-1)
    t_copy = best_time(lambda: dst.copy_(w.view(-1)), reps, clock)
    for bits in (2, 4):
        codec = WeightCodec("laq-linear", bits)
        f0 = codec.encode(w, d=d, key=1, step=0)
        f1 = codec.encode(w + step, d=d, key=1, step=1)
        alpha = f0.scales

        def enc():
            e = DeltaEncoder()
            e.sent = dict(base.sent)
            box["b"] = e.encode(f1)

        base = DeltaEncoder()
        base.encode(f0)
        box = {}
        t_enc = best_time(enc, reps, clock)
        held = DeltaDecoder()
        held.apply(Frame.from_bytes(f0.to_bytes()))
        snapshot = {k: (v.groups.clone(), v.digest) for k, v in held.held.items()}

        def dec():
            for k, (g, dg) in snapshot.items():
                held.held[k].groups.copy_(g)
                held.held[k].digest = dg
            decode_frame(held.apply(Frame.from_bytes(box["b"])), out=dst)

        t_dec = best_time(dec, reps, clock)
        changed = float((codec.quantize(w, d).codes != codec.quantize(w + step, d).codes).float().mean())
        row(f"weight-{bits}bit-delta", w, len(box["b"]), t_enc, t_dec, t_copy,
            {"bits": bits, "whole_frame_bytes": len(f1.to_bytes()), "codes_changed": changed,
             "scale_moved": float((f1.scales - alpha).abs().max())})

    emb = torch.zeros(30522, 384)
    rows = torch.randperm(30522, generator=gen)[:384]
    emb[rows] = torch.randn(384, 384, generator=gen)
    codec = RowSparseCodec(StochasticGradCodec(3))
    dst = torch.empty_like(emb).view(-1)
    t_copy = best_time(lambda: dst.copy_(emb.view(-1)), reps, clock)
    box = {}

    def enc_sparse():
        box["b"] = codec.encode(emb, generator=torch.Generator().manual_seed(1)).to_bytes()

    t_enc = best_time(enc_sparse, reps, clock)
    t_dec = best_time(lambda: decode_frame(Frame.from_bytes(box["b"]), out=dst), reps, clock)
    row("grad-3bit-rowsparse", emb, len(box["b"]), t_enc, t_dec, t_copy,
        {"bits": 3, "whole_frame_bytes": codec.frame_nbytes(tuple(emb.shape)), "rows_sent": 384})

    # entropy-coded gradient frames (rANS) of a heavy-tailed MiniLM-sized gradient block
    g = torch.distributions.StudentT(3.0).sample((1536, 1536))
    dst = torch.empty_like(g).view(-1)
    t_copy = best_time(lambda: dst.copy_(g.view(-1)), reps, clock)
    for name, inner in [("grad-3bit-rans", StochasticGradCodec(3)), ("grad-2bit-rans", StochasticGradCodec(2)),
                        ("grad-2bit-threshold1.0-rans", ThresholdGradCodec(1.0)),
                        ("grad-2bit-threshold1.5-rans", ThresholdGradCodec(1.5))]:
        codec = EntropyCodec(inner)
        box = {}

        def enc_coded():
            box["b"] = codec.encode(g, generator=torch.Generator().manual_seed(1)).to_bytes()

        t_enc = best_time(enc_coded, reps, clock)
        t_dec = best_time(lambda: decode_frame(Frame.from_bytes(box["b"]), out=dst), reps, clock)
        row(name, g, len(box["b"]), t_enc, t_dec, t_copy,
            {"bits": inner.bits, "whole_frame_bytes": codec.frame_nbytes(tuple(g.shape))})
    return out


if __name__ == "__main__":
    sys.exit(main())
