"""End-to-end training over real gloo process groups (tiny-bert, small SST-2 subsets)."""
import json
from pathlib import Path

import pytest
import torch

from lowbit.testing import tiny_config
from lowbit.train.config import Config
from lowbit.train.checkpoint import Checkpointer
from lowbit.train.launch import launch_local
from lowbit.train.loop import batch_indices, load_data
from lowbit.train.plan import assemble, make_plan
from lowbit.train.server import lr_lambda


def tiny_cfg(tmp_path, name, **over):
    return tiny_config(tmp_path / name, {"codec": {"max_piece_numel": 1_000_000}, "run": {"steps": 3}}, over)


def final_weights(out: Path, steps: int) -> dict[int, torch.Tensor]:
    return Checkpointer(out).weights(steps)


def reference_run(cfg: Config, alive=None):
    """Single-process data-parallel training on the same data and seeds: the average of the
    workers' gradients, one Adam step, the same schedule. ``alive(step)`` (0-based step) gives the
    worker indices taking part in that step (default: all)."""
    from lowbit.models.presets import load_preset

    r = cfg.run
    torch.manual_seed(r.seed)
    model, tok = load_preset(r.model, num_labels=2)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    params = [p for _, p in model.named_parameters()]
    opt = torch.optim.Adam(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim.warmup_steps, r.steps))
    W = cfg.transport.workers
    shards = [load_data(cfg, tok, w, W, leader=False)[0] for w in range(W)]
    losses = []
    for step in range(r.steps):
        grads = [torch.zeros_like(p) for p in params]
        tot = 0.0
        live = list(range(W)) if alive is None else alive(step)
        for w in live:
            n = shards[w]["labels"].shape[0]
            idx = batch_indices(n, r.batch_size, step, r.seed + w)
            model.zero_grad()
            out = model(**{k: v[idx] for k, v in shards[w].items()})
            out.loss.backward()
            tot += float(out.loss.detach())
            for g, p in zip(grads, params):
                g += p.grad / len(live)
        for g, p in zip(grads, params):
            p.grad = g
        opt.step()
        sched.step()
        losses.append(tot / len(live))
    return {k: p.detach() for k, p in enumerate(params)}, losses, make_plan(model, cfg.codec)


def identical_runs(a: Config, b: Config) -> tuple[list[dict], list[dict]]:
    """Run ``a`` and ``b`` (the same training sent differently): assert identical final weights and
    losses; return both runs' metrics records."""
    launch_local(a)
    launch_local(b)
    wa, wb = final_weights(Path(a.run.out), a.run.steps), final_weights(Path(b.run.out), b.run.steps)
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_losses(Path(b.run.out)) == read_losses(Path(a.run.out))
    return tuple([json.loads(line) for line in (Path(c.run.out) / "metrics.jsonl").read_text().splitlines()]
                 for c in (a, b))


def read_losses(out: Path):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind,over", [("ring", {}), ("ps", {"servers": 2})])
def test_full_precision_equals_single_process(tmp_path, kind, over):
    cfg = tiny_cfg(tmp_path, kind, transport={"kind": kind, **over})
    summary = launch_local(cfg)
    ref_w, ref_losses, plan = reference_run(cfg)
    assert len(plan) > len(ref_w)  # the word embedding travels as several pieces
    got = assemble(plan, final_weights(Path(cfg.run.out), cfg.run.steps))
    assert sorted(got) == sorted(ref_w)
    for k in ref_w:
        torch.testing.assert_close(got[k], ref_w[k], atol=2e-5, rtol=1e-4)
    assert read_losses(Path(cfg.run.out)) == pytest.approx(ref_losses, abs=1e-5)
    assert summary["bytes_up"] > 0 and summary["compression"] == pytest.approx(1.0, rel=1e-3)


@pytest.mark.timeout(240)
def test_laq_training_reduces_loss_and_compresses(tmp_path):
    cfg = tiny_cfg(tmp_path, "laq", codec={"w_bits": 2, "g_bits": 3, "embed_bits": 8, "head_bits": 8},
                   run={"steps": 24, "batch_size": 8, "train_subset": 32}, optim={"lr": 3e-3})
    s = launch_local(cfg)
    losses = read_losses(Path(cfg.run.out))
    assert len(losses) == 24
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    assert s["compression"] > 5.0
    # the workers' weights really are low-bit: the checkpointed fp32 shard is not what was sent,
    # but the bytes sent per step equal the frame formula
    plan_w = s["weight_frame_bytes"]
    assert s["fp32_frame_bytes"] / plan_w > 3.0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,fault,who", [("ring", "kill-worker:1@4", r"rank 1 exited with code 17 in step 4"),
                                            ("ps", "kill-server:0@4", r"rank 0 \(server\) exited with code 17 in step 4")])
def test_resume_after_crash_equals_uninterrupted(tmp_path, kind, fault, who):
    """A rank killed mid-step (SIGKILL-like) stops the run cleanly with a message naming it; the
    last complete checkpoint is intact and --resume reproduces the uninterrupted trajectory."""
    over = dict(codec={"w_bits": 2, "g_bits": 3, "embed_bits": 8, "head_bits": 8, "error_feedback": True},
                run={"steps": 6, "checkpoint_every": 3}, transport={"kind": kind, "servers": 1})
    a = tiny_cfg(tmp_path, "a", **over)
    launch_local(a)
    b = tiny_cfg(tmp_path, "b", **over)
    b.run.fault = fault  # dies in the middle of step 4: the step-3 checkpoint is the last complete one
    with pytest.raises(RuntimeError, match=who) as e:
        launch_local(b)
    assert "step_3" in str(e.value) and "resume with:" in str(e.value)
    assert json.loads((Path(b.run.out) / "ckpt" / "latest.json").read_text())["step"] == 3
    b.run.fault = ""
    b.run.resume = True
    s = launch_local(b)
    assert s["start_step"] == 3
    wa, wb = final_weights(Path(a.run.out), 6), final_weights(Path(b.run.out), 6)
    assert sorted(wa) == sorted(wb) and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=0, rtol=0)
    la, lb = read_losses(Path(a.run.out)), read_losses(Path(b.run.out))
    assert lb[-3:] == pytest.approx(la[-3:], abs=0)


@pytest.mark.timeout(300)
def test_ps_continues_without_a_killed_worker(tmp_path):
    """--on-worker-failure continue: the first worker (the one logging) is killed in the middle of
    step 3; the server completes that step with the other two, a surviving worker takes over the
    log, the run finishes, and the weights equal data-parallel training on the workers that took
    part in each step."""
    cfg = tiny_cfg(tmp_path, "cont", transport={"kind": "ps", "workers": 3, "servers": 1,
                                                "on_worker_failure": "continue"},
                   run={"steps": 5, "fault": "kill-worker:1@3"})
    s = launch_local(cfg)
    assert s["workers_lost"] == [1] and s["steps"] == 5
    recs = [json.loads(line) for line in (Path(cfg.run.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["workers"] for r in recs] == [3, 3, 2, 2, 2]
    assert recs[2]["bytes_up"] * 3 == recs[0]["bytes_up"] * 2  # two of three gradient uploads came
    assert json.loads((Path(cfg.run.out) / "ckpt" / "latest.json").read_text())["step"] == 5
    ref, losses, plan = reference_run(cfg, alive=lambda step: [0, 1, 2] if step < 2 else [1, 2])
    got = assemble(plan, final_weights(Path(cfg.run.out), 5))
    for k, w in ref.items():
        torch.testing.assert_close(got[k], w, atol=2e-5, rtol=1e-4)
    assert [r["loss"] for r in recs] == pytest.approx(losses, abs=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["ps", "ring"])
def test_delta_weights_and_sparse_embeddings_are_exact_and_move_fewer_bytes(tmp_path, kind):
    """The same run with whole frames both ways and with delta-coded weights down and row-sparse
    embedding gradients up: identical losses and final weights; fewer bytes each way (after the
    first step's key frames), and the record counts the whole frames they stand for."""
    over = dict(codec={"w_bits": 4, "g_bits": 3, "embed_bits": 8, "head_bits": 8}, optim={"lr": 1e-4},
                run={"steps": 4}, transport={"kind": kind, "servers": 1})
    whole = tiny_cfg(tmp_path, "whole", **over)
    whole.codec.delta_weights = whole.codec.sparse_embeddings = False
    delta = tiny_cfg(tmp_path, "delta", **over)
    ra, rb = identical_runs(whole, delta)
    assert rb[0]["bytes_down"] == ra[0]["bytes_down"]  # key frames first
    for a, b in zip(ra[1:], rb[1:]):
        assert b["bytes_down"] < 0.5 * a["bytes_down"]
        assert b["bytes_down_whole"] == pytest.approx(a["bytes_down"], rel=0.01)
    for a, b in zip(ra, rb):
        assert b["bytes_up"] < 0.5 * a["bytes_up"]  # tiny-bert's gradients are mostly its word embedding's
        assert b["bytes_up_whole"] == pytest.approx(a["bytes_up"], rel=0.01)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["ps", "ring"])
def test_entropy_coded_gradients_are_exact_and_move_fewer_bytes(tmp_path, kind):
    """Threshold-ternary gradients with error feedback, sent packed and rANS-coded: identical losses
    and final weights, fewer bytes up, and the record counts the whole frames they stand for."""
    over = dict(codec={"w_bits": 4, "g_bits": 2, "g_scheme": "threshold", "error_feedback": True,
                       "embed_bits": 8, "head_bits": 8, "max_piece_numel": 100_000},
                optim={"lr": 1e-4}, run={"steps": 3}, transport={"kind": kind, "servers": 1})
    packed = tiny_cfg(tmp_path, "packed", **over)
    coded = tiny_cfg(tmp_path, "coded", **over)
    coded.codec.entropy_grads = True
    ra, rb = identical_runs(packed, coded)
    for a, b in zip(ra, rb):
        assert b["bytes_up"] < 0.8 * a["bytes_up"]
        assert b["bytes_up_whole"] == pytest.approx(a["bytes_up_whole"], rel=0.01)
        assert b["bytes_down"] == a["bytes_down"]
