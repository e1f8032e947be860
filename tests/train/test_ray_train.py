"""Training through Ray actors (run_ray) on a local Ray cluster, tiny-bert on small SST-2 subsets."""
import json
import math
import os
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"

import pytest  # noqa: E402
import torch  # noqa: E402

ray = pytest.importorskip("ray")

from lowbit.comm.ray import ray_session  # noqa: E402
from lowbit.testing import tiny_config  # noqa: E402
from lowbit.train.checkpoint import Checkpointer  # noqa: E402
from lowbit.train.launch import launch_local  # noqa: E402
from lowbit.train.ray_launch import run_ray  # noqa: E402

RAY_TMP = str(Path(__file__).resolve().parents[2] / ".ray_tmp")


def tiny_cfg(tmp_path, name, **over):
    return tiny_config(tmp_path / name, {"transport": {"kind": "ray", "servers": 1, "timeout_s": 120}}, over)


def final_weights(out: Path, steps: int) -> dict[int, torch.Tensor]:
    return Checkpointer(out).weights(steps)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cluster():
    with ray_session(num_cpus=2, temp_dir=RAY_TMP):
        yield


STEPS = 4


@pytest.fixture(scope="module")
def fp32_ray(cluster, tmp_path_factory):
    """Full precision on both links, 2 workers and 1 server (several servers: tests/comm/test_ray.py);
    worker actor 1 is killed after step 2 (Ray replaces it, the replacement re-fetches the weights)."""
    root = tmp_path_factory.mktemp("fp32")
    cfg = tiny_cfg(root, "ray", run={"fault": "kill-worker:2@2"})  # rank 2: worker actor 1
    return root, run_ray(cfg)


@pytest.mark.timeout(240)
def test_killed_worker_actor_is_replaced_and_the_run_finishes(fp32_ray):
    root, s = fp32_ray
    out = root / "ray"
    assert s["weight_refetches"] >= 1 and s["workers_alive"] == 2
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    assert all(r["workers"] == 2 for r in m)
    # bytes are the frames only (Ray frames the call: no length prefix)
    per_step = 2 * s["grad_frame_bytes"]
    assert [r["bytes_up"] for r in m] == [per_step] * STEPS
    assert s["bytes_up"] == STEPS * per_step
    assert json.loads((out / "summary.json").read_text())["bytes_up"] == STEPS * per_step
    assert json.loads((out / "ckpt" / "latest.json").read_text())["step"] == STEPS


@pytest.mark.timeout(240)
def test_fp32_ray_equals_ring(fp32_ray):
    root, s_ray = fp32_ray
    s_ring = launch_local(tiny_cfg(root, "ring", transport={"kind": "ring"}))
    w_ray, w_ring = final_weights(root / "ray", STEPS), final_weights(root / "ring", STEPS)
    assert sorted(w_ray) == sorted(w_ring) and w_ray
    worst = max(float((w_ray[k] - w_ring[k]).abs().max()) for k in w_ring)
    assert worst < 1e-5
    assert abs(s_ray["eval_loss"] - s_ring["eval_loss"]) < 1e-5
    assert s_ray["accuracy"] == s_ring["accuracy"]
    for a, b in zip(metrics(root / "ray"), metrics(root / "ring"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert a["lr"] == pytest.approx(b["lr"])


@pytest.mark.timeout(240)
def test_laq_ray_run_writes_metrics_and_counts_bytes(cluster, tmp_path):
    """2-bit LAQ weights (8-bit embeddings/head) and 3-bit clipped gradients, one server."""
    steps = 3
    cfg = tiny_cfg(tmp_path, "laq", run={"steps": steps},
                   codec={"w_bits": 2, "g_bits": 3, "embed_bits": 8, "head_bits": 8})
    s = run_ray(cfg)
    out = tmp_path / "laq"
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in m)
    # gradients: row-sparse embedding frames are smaller than whole ones, the record counts both
    assert [r["bytes_up_whole"] for r in m] == [pytest.approx(2 * s["grad_frame_bytes"], rel=0.02)] * steps
    assert all(0 < r["bytes_up"] < r["bytes_up_whole"] for r in m)
    # weights: delta-coded frames, the record counts the whole frames they stand for
    assert [r["bytes_down_whole"] for r in m] == [pytest.approx(2 * s["weight_frame_bytes"], rel=0.01)] * steps
    assert all(0 < r["bytes_down"] < r["bytes_down_whole"] for r in m)
    assert s["compression"] > 4  # most bytes are 2/3/8-bit frames
    assert 0.0 <= s["accuracy"] <= 1.0 and s["eval_n"] == 32 and s["servers"] == 1
    assert json.loads((out / "summary.json").read_text())["bytes_down"] == s["bytes_down"]
    assert len(list((out / "ckpt" / f"step_{steps}").glob("shard_*.safetensors"))) == 1


@pytest.mark.timeout(300)
def test_delta_weights_are_exact_move_fewer_bytes_and_resync_a_replaced_worker(cluster, tmp_path):
    """The same Ray run with whole weight frames and with delta-coded ones: identical losses and
    final weights, fewer bytes down in every step (the key frames went with the first fetch). With a worker actor killed
    in step 2 the weights are still the same: its replacement fetches key frames of step 2 (on top
    of the others' deltas) and gets deltas from then on."""
    over = dict(codec={"w_bits": 4, "g_bits": 3, "embed_bits": 8, "head_bits": 8}, optim={"lr": 1e-4},
                run={"steps": STEPS})
    whole = tiny_cfg(tmp_path, "whole", **over)
    whole.codec.delta_weights = False
    delta = tiny_cfg(tmp_path, "delta", **over)
    killed = tiny_cfg(tmp_path, "killed", **over)
    killed.run.fault = "kill-worker:2@2"  # rank 2: worker actor 1, in step 2 before it sends
    runs = [(c, run_ray(c)) for c in (whole, delta, killed)]
    w = [final_weights(Path(c.run.out), STEPS) for c, _ in runs]
    losses = [[r["loss"] for r in metrics(Path(c.run.out))] for c, _ in runs]
    for i in (1, 2):
        assert sorted(w[i]) == sorted(w[0]) and all(torch.equal(w[i][k], w[0][k]) for k in w[0])
        assert losses[i] == losses[0]
    ra, rb, rc = (metrics(Path(c.run.out)) for c, _ in runs)
    full = 2 * runs[0][1]["weight_frame_bytes"]
    assert [r["bytes_down"] for r in ra] == [full] * STEPS
    for a, b in zip(ra, rb):  # the key frames went with the first fetch: every step sends deltas
        assert b["bytes_down"] < 0.5 * a["bytes_down"]
        assert b["bytes_down_whole"] == pytest.approx(a["bytes_down"], rel=0.01)
    assert runs[2][1]["weight_refetches"] >= 1 and runs[2][1]["workers_alive"] == 2
    assert rc[1]["bytes_down"] == rb[1]["bytes_down"] + full // 2  # the replacement's key frames
    assert rc[1]["bytes_down_whole"] == pytest.approx(1.5 * full, rel=0.01)
    assert [r["bytes_down"] for r in rc[2:]] == [r["bytes_down"] for r in rb[2:]]
