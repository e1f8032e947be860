"""The DDP baselines of benchmarks/train_sst2.py (PyTorch's PowerSGD and fp16 comm hooks on the same
training): short real runs on 2 gloo ranks train and report PowerSGD's much smaller payload."""
import pytest


@pytest.mark.timeout(300)
def test_ddp_powersgd_baseline_trains_and_counts_its_payload(bench):
    run_ddp = bench("_ddp_train").run_ddp
    kw = dict(model="tiny-bert", batch_size=4, max_len=16, train_subset=64, lr=1e-3, workers=2)
    short, long = run_ddp("powersgd4", steps=3, **kw), run_ddp("powersgd4", steps=6, **kw)
    for r in (short, long):
        assert 0.0 <= r["accuracy"] <= 1.0 and r["transport"] == "ddp" and r["wall_s"] > 0
        assert r["bytes_total"] < r["fp32_bytes_total"]
    # the first two PowerSGD steps all-reduce fp32; each later step sends P and Q only
    per_compressed_step = (long["bytes_total"] - short["bytes_total"]) / 3
    assert per_compressed_step < short["fp32_bytes_total"] / 3 / 10
