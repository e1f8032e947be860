"""Smoke run of the shaped-link communication benchmark machinery (benchmarks/comm_bandwidth.py):
2 ranks in their own namespaces, 2 small tensors, one 50 Mbit/s link, fp32 all_reduce and lowbit
ring w2/g3, one timed step each (skipped without netns); and its plot of an empty run."""
import math
import os

import pytest

from lowbit.net.netns import list_namespaces, netns_available

OK, WHY = netns_available()
needs_netns = [pytest.mark.netns, pytest.mark.skipif(not OK, reason=f"netns testbed not available: {WHY}")]

SHAPES = [(512, 512), (256, 1024)]
FIELDS = ("method", "bandwidth", "model", "step_s", "bytes_per_rank", "speedup_vs_fp32", "ideal_s", "efficiency",
          "wire_bytes_per_rank", "step_total_s")


@needs_netns[0]
@needs_netns[1]
@pytest.mark.timeout(180)
def test_comm_bandwidth_smoke_two_ranks_50mbit(tmp_path, bench):
    comm_bandwidth = bench("comm_bandwidth")
    frame_sizes = bench("_comm_common").frame_sizes
    from lowbit.comm.collective import ring_expected_bytes

    n = sum(math.prod(s) for s in SHAPES)
    models = [{"name": "tiny", "shapes": [list(s) for s in SHAPES], "n": n}]
    recs = comm_bandwidth.run_rate(50, models, ["fp32_allreduce", "lowbit_ring_w2g3", "lowbit_ps_w2g3"], ranks=2,
                                   reps=1, ps_servers=1, prefix="lbct", timeout_s=60, codec_threads=2, trace=True)
    assert [n for n in list_namespaces() if n.startswith("lbct")] == []
    by = {r["method"]: r for r in recs}
    assert set(by) == {"fp32_allreduce", "lowbit_ring_w2g3", "lowbit_ps_w2g3"}
    for r in recs:
        for f in FIELDS:
            assert f in r and r[f] is not None, (r["method"], f)
        assert r["bandwidth"] == "50Mbit" and r["model"] == "tiny" and r["reps"] == 1
        assert r["threads"] == 1 and r["codec_threads"] == 2 and r["codec_device"] == "cpu"
        assert r["ideal_s"] == pytest.approx(max(r["bytes_per_rank"], r["recv_per_rank"]) * 8 / 50e6)
        # the interface carried at least the payload, plus TCP/IP headers of a few percent
        assert r["bytes_per_rank"] <= r["wire_bytes_per_rank"] <= 1.25 * r["bytes_per_rank"] + 20_000
        # CPU per step: each rank's process (user + system) and the machine's core-seconds by kind
        cpu = r["cpu_per_rank"]
        assert len(cpu) == 2 and r["cpu_process_s_per_rank"] == [c["process_s"] for c in cpu]
        for c in cpu:
            assert c["process_s"] == pytest.approx(c["user_s"] + c["system_s"], abs=1e-4)
            assert 0 < c["process_s"] < 10 * r["step_s"] + 0.1 and c["ctx_switches"] >= 0
        host = r["cpu_host_core_s"]
        assert set(host) == {"user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"}
        # /proc/stat counts in 10 ms ticks: all kinds together are the cores times rank 0's window
        assert all(v >= 0 for v in host.values()) and 0 <= r["cpu_host_busy"] <= 1
        assert sum(host.values()) <= (os.cpu_count() or 1) * (r["step_s"] + 0.03)

    # the trace: every rank's interface counters over the last step, in order, and they add up to
    # about what the interface carried in a step
    for r in recs:
        assert len(r["trace"]) == 2
        for rank, rows in enumerate(r["trace"]):
            assert len(rows) >= 2 and [x[0] for x in rows] == sorted(x[0] for x in rows)
            tx = rows[-1][2] - rows[0][2]
            sent = r["counters"][rank]["sent"] if "counters" in r else r["bytes_per_rank"]  # PS: ranks differ
            assert 0.5 * sent <= tx <= 1.3 * r["wire_bytes_per_rank"] + 20_000, (r["method"], rank, tx)
    png = comm_bandwidth.plot_traces(recs, tmp_path / "trace.png")
    assert png is not None and png.stat().st_size > 10_000

    # the PS step's timeline: the server's and the worker's events of the last timed step, and
    # its milestones in order (gradients in before the weights, the tail after them)
    ps = by["lowbit_ps_w2g3"]
    assert "timeline" not in by["lowbit_ring_w2g3"]
    server, worker = ps["timeline"]
    assert {e[1] for e in server["events"]} == {"grads_in", "group_averaged", "weights_posted", "end"}
    assert {e[1] for e in worker["events"]} == {"grads_posted", "weights_in", "weights_decoded", "end"}
    sm = ps["timeline_summary"]
    assert 0 <= sm["first_grads_in_s"] <= sm["grads_done_s"] <= sm["weights_posted_s"] <= sm["weights_in_s"]
    assert sm["weights_in_s"] <= sm["weights_decoded_s"] <= sm["end_s"] <= ps["step_s"] + sm["start_skew_s"] + 0.05
    assert sm["tail_s"] == pytest.approx(sm["end_s"] - sm["grads_done_s"])

    fp32, low = by["fp32_allreduce"], by["lowbit_ring_w2g3"]
    assert fp32["bytes_per_rank"] == pytest.approx(2 * (2 - 1) / 2 * 4 * n)  # ring all-reduce formula
    shapes = {k: s for k, s in enumerate(SHAPES)}
    g, w = frame_sizes(SHAPES, 3), frame_sizes(SHAPES, 2)
    for rank, counted in enumerate(low["counters"]):
        expected = ring_expected_bytes(rank, 2, shapes, g, w)
        assert {k: counted[k] for k in expected} == expected
    assert low["bytes_per_rank"] == max(c["sent"] for c in low["counters"])
    assert low["speedup_vs_fp32"] == pytest.approx(fp32["step_s"] / low["step_s"])
    assert fp32["speedup_vs_fp32"] == pytest.approx(1.0)
    # 2 MB of fp32 per rank at 50 Mbit/s against ~0.16 MB of frames: the shaped link decides
    assert fp32["step_s"] > low["step_s"]
    assert fp32["step_s"] > 0.5 * fp32["ideal_s"]
    # the step with the encode inside (LazyFrames) and the LAQ timings, warm and cold
    for f in ("step_enc_s", "grad_encode_s", "weight_quant_s", "weight_quant_cold_s"):
        assert low[f] > 0, f
    assert low["step_enc_total_s"] == pytest.approx(low["step_enc_s"] + low["weight_quant_s"])
    assert low["step_total_s"] == pytest.approx(low["step_s"] + low["grad_encode_s"] + low["weight_quant_s"])


@pytest.mark.timeout(60)
def test_plot_of_a_run_that_measured_nothing_is_skipped_with_a_message(tmp_path, bench, capsys):
    """A run whose every rate failed (e.g. a sysctl or tc refused) still writes its JSON; the plot
    then says there is nothing to draw instead of failing inside matplotlib."""
    comm_bandwidth = bench("comm_bandwidth")
    assert comm_bandwidth.plot([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    assert "no measurements" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_cpu_bound_steps_are_named_under_the_table(tmp_path, bench, capsys):
    """A record whose step kept the machine's cores busy (cpu_host_busy >= 0.9) is named in a note
    under its table, also when the table is re-printed from a JSON (with that run's core count)."""
    import json
    comm_bandwidth = bench("comm_bandwidth")
    recs = [{"model": "minilm", "method": m, "bandwidth": "unshaped", "cpu_host_busy": b}
            for m, b in (("lowbit_ps_w2g3", 0.97), ("fp32_allreduce", 0.5), ("ddp_fp16", None))]
    note = comm_bandwidth.cpu_bound_note(recs, cpu_count=16)
    assert "16 cores" in note and "minilm lowbit_ps_w2g3 (0.97)" in note
    assert "fp32_allreduce" not in note and "ddp_fp16" not in note
    assert comm_bandwidth.cpu_bound_note(recs[1:]) is None
    full = [dict(r, reps=1, step_s=0.1, step_total_s=0.1, bytes_per_rank=1e6, recv_per_rank=1e6,
                 wire_bytes_per_rank=1.01e6, rate_mbit=None, n_params=1, p=4) for r in recs[:2]]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"machine": {"cpu_count": 7}, "records": full}))
    assert comm_bandwidth.main(["--from-json", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "CPU-bound (the machine's 7 cores" in out and "lowbit_ps_w2g3 (0.97)" in out
