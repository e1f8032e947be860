"""Smoke run of benchmarks/laq_encode.py: rows per bit width and start, rounds counted, quality."""
import json

import pytest
import torch


@pytest.mark.timeout(120)
def test_laq_encode_bench_smoke(tmp_path, bench):
    laq_encode = bench("laq_encode")
    from lowbit.quant import weights as W
    threads, out = torch.get_num_threads(), tmp_path / "laq.json"
    try:
        assert laq_encode.main(["--n", "65536", "--bits", "2,4", "--reps", "1", "--search-n", "20000",
                                "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    recs = json.loads(out.read_text())["records"]
    assert [(r["bits"], r["start"]) for r in recs] == [(2, "warm"), (2, "cold"), (4, "warm"), (4, "cold")]
    for r in recs:
        assert r["n"] == 65536 and r["ms"] > 0
        if W.native_laq_available():  # the compiled round is what the benchmark counts
            assert 1 <= r["rounds"] <= 20, r
        assert r["objective_vs_search"] < 1e-4, r  # at the search's best up to 4 bits
    assert W._laq is None or W._laq.round.__name__ == "round"  # the counting wrapper was taken off
