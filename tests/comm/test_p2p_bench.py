"""Smoke run of benchmarks/p2p_send.py: two gloo ranks, the frames laid out as a list."""
import json

import pytest


@pytest.mark.timeout(120)
def test_p2p_send_bench_smoke(tmp_path, bench):
    p2p_send = bench("p2p_send")
    out = tmp_path / "p2p.json"
    assert p2p_send.main(["--mb", "0.5", "--groups", "3", "--reps", "3", "--json", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["groups"] == 3 and rec["reps"] == 3 and rec["frames_as_list"] is True
    assert abs(rec["mb"] - 0.5) < 0.01 and rec["sender_cpu_ms"] > 0
