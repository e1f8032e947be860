"""Smoke run of benchmarks/codec_throughput.py: its three decode paths and its tuning knobs."""
import json

import pytest


@pytest.mark.timeout(120)
def test_codec_throughput_smoke(tmp_path, bench):
    codec_throughput = bench("codec_throughput")
    import lowbit.codec.decode as cc
    from lowbit.codec import native
    from lowbit.codec.threads import get_codec_threads, set_codec_threads
    chunk, threads = cc.CHUNK_BYTES, get_codec_threads()
    has_native = native.native_codec_available()
    nt = native.lib.nt_stores(-1) if has_native else None
    out = tmp_path / "codec.json"
    try:
        assert codec_throughput.main(["--sizes", "65536", "--reps", "1", "--json", str(out),
                                      "--decode-chunk", "256", "--codec-threads", "2"]
                                     + (["--nt-stores", "4096"] if has_native else [])) == 0
    finally:
        cc.CHUNK_BYTES = chunk
        set_codec_threads(threads)
        if has_native:
            native.lib.nt_stores(nt)
    recs = json.loads(out.read_text())["records"]
    wire = [r for r in recs if "bits_per_value" in r]
    recs = [r for r in recs if "bits_per_value" not in r]
    assert {r["codec"] for r in recs} == {"grad-2bit", "grad-3bit", "grad-4bit", "grad-8bit",
                                          "weight-ternary-laq", "weight-4bit-laq"}
    assert {r["codec"] for r in wire} == {"weight-2bit-delta", "weight-4bit-delta", "grad-3bit-rowsparse",
                                          "grad-3bit-rans", "grad-2bit-rans", "grad-2bit-threshold1.0-rans",
                                          "grad-2bit-threshold1.5-rans"}
    for r in wire:  # a fraction of the whole frame's bits (small for deltas and sparse rows), at a real rate
        assert r["bits_per_value"] < (0.7 if "rans" in r["codec"] else 0.2) * r["bits"]
        assert r["payload_bytes"] < r["whole_frame_bytes"]
        assert min(r["encode_gbps"], r["decode_into_gbps"]) > 0
    for r in recs:
        assert r["decode_chunk"] == 256 and r["codec_threads"] == 2
        assert r["nt_min_bytes"] == (4096 if has_native else None)
        assert r["fill_gbps"] > 0
        assert min(r["encode_gbps"], r["decode_gbps"], r["decode_into_gbps"], r["decode_add_gbps"],
                   r["mean2_gbps"], r["mean2_sequential_gbps"]) > 0
        # payload: bits per element plus the frame's fixed header/shape/scale/CRC bytes
        assert r["payload_bytes"] == pytest.approx(65536 * r["bits"] / 8, abs=128)


@pytest.mark.timeout(120)
def test_entropy_rows_measure_what_the_coders_reach(bench):
    """The entropy evaluation: every coder round-trips the codes and none beats their entropy."""
    import time
    rows = bench("codec_throughput").entropy_rows(1, time.perf_counter, n=1 << 15)
    assert {r["codec"] for r in rows} >= {"grad-2bit-deflate", "grad-3bit-deflate", "grad-4bit-deflate"}
    for r in rows:
        assert 0 < r["entropy_bits"] <= r["bits"] and r["bits_per_value"] >= r["entropy_bits"] - 0.01
        assert r["encode_mvps"] > 0 and r["decode_mvps"] > 0
