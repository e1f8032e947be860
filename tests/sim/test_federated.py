"""Federated simulation: exactness at 32 bits, byte accounting, non-IID splits, drop-outs, Ray parity."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lowbit.codec.codecs import RawCodec, StochasticGradCodec, WeightCodec
from lowbit.errors import ConfigError
from lowbit.sim.federated import (ClientRunner, FedConfig, build_model, dirichlet_split, iid_split, label_skew,
                                  local_batch_indices, main, make_splits, mix_seed, sample_clients,
                                  simulate, trainable)

RAY_TMP = str(Path(__file__).resolve().parents[2] / ".ray_tmp")
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def synth(n: int, seed: int, length: int = 12) -> dict[str, torch.Tensor]:
    """An easy task: class 0 sentences use tokens 5..33, class 1 tokens 35..63."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 29, (n, length), generator=g) + 5 + 30 * y[:, None]
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y}


TRAIN, EVAL = synth(400, 0), synth(100, 1)


def cfg_(**kw) -> FedConfig:
    base = dict(clients=20, fraction=0.25, rounds=2, local_steps=3, local_batch=8, local_lr=0.1,
                model_config=TINY, out=None, progress=False, eval_every=0, threads=1)
    base.update(kw)
    return FedConfig(**base)


def fedavg_reference(cfg: FedConfig) -> list[torch.Tensor]:
    """Plain FedAvg written out directly: same model init, split, sampling and batch order."""
    model = build_model(cfg)
    w = [p.detach().clone() for p in model.parameters()]
    splits = make_splits(cfg, TRAIN["labels"])
    for rnd in range(1, cfg.rounds + 1):
        clients = sample_clients(cfg, rnd)
        total = sum(len(splits[c]) for c in clients)
        avg = [torch.zeros_like(x) for x in w]
        for c in clients:
            idx = splits[c]
            with torch.no_grad():
                for p, x in zip(model.parameters(), w):
                    p.copy_(x)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.local_lr) if cfg.local_optimizer == "adam" \
                else torch.optim.SGD(model.parameters(), lr=cfg.local_lr, momentum=cfg.local_momentum)
            gen = torch.Generator().manual_seed(mix_seed(cfg.seed, 3, rnd, c))
            for pos in local_batch_indices(len(idx), cfg.local_steps, cfg.local_batch, gen):
                opt.zero_grad()
                model(**{k: v[idx[pos]] for k, v in TRAIN.items()}).loss.backward()
                opt.step()
            for a, p, x in zip(avg, model.parameters(), w):
                a.add_(p.detach() - x, alpha=len(idx) / total)
        w = [x.clone().add_(a, alpha=1.0) for x, a in zip(w, avg)]
    return w


@pytest.mark.timeout(120)
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_fp32_links_equal_plain_fedavg(alpha):
    cfg = cfg_(alpha=alpha, rounds=3)
    got = simulate(cfg, TRAIN, EVAL, return_state=True)["weights"]
    want = fedavg_reference(cfg)
    init = [p.detach() for p in build_model(cfg).parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(got, init)) > 1e-3  # it did train
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("opt", [dict(local_optimizer="adam", local_lr=1e-2), dict(local_momentum=0.9)])
def test_fp32_links_equal_fedavg_with_local_adam_or_momentum(opt):
    """Client optimizer state is fresh every round: the simulation equals FedAvg written out with a
    new torch Adam / momentum SGD per client per round (and differs from plain SGD)."""
    cfg = cfg_(alpha=0.5, rounds=3, **opt)
    got = simulate(cfg, TRAIN, EVAL, return_state=True)["weights"]
    want = fedavg_reference(cfg)
    if cfg.local_optimizer == "sgd":
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    else:  # Adam's g/(sqrt(v)+eps) turns float rounding on near-zero gradients into lr-sized steps
        init = [p.detach() for p in build_model(cfg).parameters()]
        err = sum(float((a - b).norm() ** 2) for a, b in zip(got, want)) ** 0.5
        moved = sum(float((b - x).norm() ** 2) for b, x in zip(want, init)) ** 0.5
        assert moved > 0.1 and err < 1e-2 * moved
    plain = fedavg_reference(cfg_(alpha=0.5, rounds=3))
    assert max(float((a - b).abs().max()) for a, b in zip(got, plain)) > 1e-3


@pytest.mark.timeout(120)
def test_frozen_parameters_stay_put_and_stay_off_the_links():
    cfg = cfg_(alpha=0.5, rounds=3, freeze=("bert.embeddings",))
    model = build_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    train_mask = [not n.startswith("bert.embeddings") for n in names]
    assert [n for n, _ in trainable(model)] == [n for n, m in zip(names, train_mask) if m]
    s = simulate(cfg, TRAIN, EVAL, return_state=True)
    want = [w for w, m in zip(fedavg_reference(cfg), train_mask) if m]
    assert len(s["weights"]) == len(want) < len(names)
    for a, b in zip(s["weights"], want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    raw = RawCodec()
    per_model = sum(raw.frame_nbytes(tuple(p.shape)) for _, p in trainable(model))
    r = s["records"][-1]
    assert r["up_bytes_per_client"] == r["down_bytes_per_client"] == per_model
    assert s["link_nbytes"]["numel"] == sum(p.numel() for _, p in trainable(model))
    with pytest.raises(ConfigError, match="matches no parameter"):
        build_model(cfg_(freeze=("bert.nothing",)))
    with pytest.raises(ConfigError, match="no parameter to train"):
        build_model(cfg_(freeze=("bert", "classifier")))


@pytest.mark.timeout(60)
def test_pretrained_preset_head_is_seeded():
    a, b, c = (build_model(cfg_(model_config=None, model="minilm-l1", seed=seed)) for seed in (0, 0, 1))
    assert len(a.bert.encoder.layer) == 1
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert torch.equal(a.bert.embeddings.word_embeddings.weight, c.bert.embeddings.word_embeddings.weight)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("up,down", [(3, 2), (8, 4), (32, 2), (2, 32)])
def test_bytes_per_round_match_codec_formula(up, down):
    cfg = cfg_(up_bits=up, down_bits=down, rounds=2, error_feedback=True)
    s = simulate(cfg, TRAIN, EVAL)
    shapes = [tuple(p.shape) for p in build_model(cfg).parameters()]
    raw = RawCodec()
    up_c = raw if up == 32 else StochasticGradCodec(up, 3.0)
    down_c = raw if down == 32 else WeightCodec("laq-linear", down)
    up_n = sum((raw if len(sh) < 2 else up_c).frame_nbytes(sh) for sh in shapes)
    down_n = sum((raw if len(sh) < 2 else down_c).frame_nbytes(sh) for sh in shapes)
    fp32_n = sum(raw.frame_nbytes(sh) for sh in shapes)
    m = cfg.clients_per_round
    cum = 0
    for r in s["records"]:
        assert r["up_bytes_per_client"] == up_n and r["down_bytes_per_client"] == down_n
        assert r["up_bytes"] == up_n * m and r["down_bytes"] == down_n * m
        assert r["fp32_bytes"] == fp32_n * 2 * m
        cum += up_n * m + down_n * m
        assert r["cum_bytes"] == cum
    if up != 32 or down != 32:
        assert s["total_bytes"] < s["total_fp32_bytes"]


@pytest.mark.timeout(30)
def test_split_statistics_follow_alpha():
    labels = torch.randint(0, 2, (3000,), generator=torch.Generator().manual_seed(0))
    skews = {}
    for alpha in (0.1, 1.0, None):
        splits = iid_split(3000, 50, 0) if alpha is None else dirichlet_split(labels, 50, alpha, 0)
        assert len(splits) == 50 and all(len(s) >= 1 for s in splits)
        allidx = torch.cat(splits).sort().values
        assert torch.equal(allidx, torch.arange(3000))  # a partition
        skews[alpha] = label_skew(splits, labels)
    assert skews[0.1] > skews[1.0] > skews[None]
    assert skews[0.1] > 0.3 and skews[None] < 0.1
    # extreme skew: still everyone gets an example
    tiny = dirichlet_split(labels[:60], 50, 0.01, 1)
    assert all(len(s) >= 1 for s in tiny) and sum(len(s) for s in tiny) == 60


@pytest.mark.timeout(60)
def test_dropped_clients_do_not_break_a_round():
    cfg = cfg_(dropout_prob=0.5, rounds=4, up_bits=3, down_bits=3, eval_every=2)
    s = simulate(cfg, TRAIN, EVAL)
    rounds = s["records"][1:]
    assert any(0 < r["dropped"] for r in rounds) and any(r["reported"] > 0 for r in rounds)
    for r in rounds:
        assert r["reported"] + r["dropped"] == len(r["clients"])
        assert r["up_bytes"] == r["reported"] * r["up_bytes_per_client"]
        assert r["down_bytes"] == len(r["clients"]) * r["down_bytes_per_client"]
    assert 0.0 <= s["final_accuracy"] <= 1.0
    # everyone drops: the model is kept as it was
    cfg = cfg_(dropout_prob=1.0, rounds=2)
    s = simulate(cfg, TRAIN, EVAL, return_state=True)
    init = [p.detach() for p in build_model(cfg).parameters()]
    for a, b in zip(s["weights"], init):
        assert torch.equal(a, b)
    assert all(r["reported"] == 0 and r["up_bytes"] == 0 for r in s["records"])


@pytest.mark.timeout(60)
def test_fedadam_learns_easy_task():
    cfg = cfg_(aggregator="fedadam", server_lr=0.05, rounds=8, local_steps=5, eval_every=1,
               up_bits=8, down_bits=8)
    s = simulate(cfg, TRAIN, EVAL)
    evals = [r for r in s["records"] if "eval_loss" in r]
    assert evals[0]["round"] == 0
    assert evals[-1]["eval_loss"] < 0.5 * evals[0]["eval_loss"]
    assert s["best_accuracy"] >= 0.9


@pytest.mark.timeout(180)
def test_sequential_and_ray_agree(tmp_path):
    pytest.importorskip("ray")
    kw = dict(rounds=2, up_bits=3, down_bits=2, error_feedback=True, dropout_prob=0.2, eval_every=1)
    seq = simulate(cfg_(**kw), TRAIN, EVAL, return_state=True)
    par = simulate(cfg_(ray=True, ray_cpus=2, ray_temp_dir=RAY_TMP, **kw), TRAIN, EVAL, return_state=True)
    for a, b in zip(seq["weights"], par["weights"]):
        assert torch.equal(a, b)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    assert strip(seq["records"]) == strip(par["records"])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad,msg", [
    (dict(clients=0), "clients"), (dict(fraction=0.0), "fraction"), (dict(fraction=1.5), "fraction"),
    (dict(up_bits=1), "up_bits"), (dict(down_bits=16), "down_bits"), (dict(alpha=0.0), "alpha"),
    (dict(aggregator="fedsgd"), "aggregator"), (dict(dropout_prob=1.5), "dropout_prob"),
    (dict(local_lr=0.0), "local_lr"), (dict(clip=-1.0), "clip"), (dict(rounds=0), "rounds"),
    (dict(clients=100, train_subset=50), "train_subset"),
    (dict(local_optimizer="lamb"), "local_optimizer"),
    (dict(local_optimizer="adam", local_momentum=0.9), "local_momentum"),
    (dict(weight="tokens"), "weight"),
])
def test_bad_config_raises(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg_(**bad).validate()


@pytest.mark.timeout(60)
def test_weight_seen_counts_the_examples_a_round_processes():
    """weight="data": a client's examples; "seen": local steps × min(batch, examples), so a client
    with 10× the data but the same local work weighs the same."""
    cfg = cfg_(local_steps=3, local_batch=4, threads=0)
    splits = [torch.arange(2), torch.arange(2, 12), torch.arange(12, 52)]
    data = ClientRunner(cfg, TRAIN, splits)
    seen = ClientRunner(dataclasses.replace(cfg, weight="seen"), TRAIN, splits)
    assert [data.weight(c) for c in range(3)] == [2, 10, 40]
    assert [seen.weight(c) for c in range(3)] == [3 * 2, 3 * 4, 3 * 4]
    epochs = ClientRunner(dataclasses.replace(cfg, weight="seen", local_epochs=1), TRAIN, splits)
    assert [epochs.weight(c) for c in range(3)] == [1 * 2, 3 * 4, 10 * 4]


@pytest.mark.timeout(30)
def test_too_few_examples_for_clients():
    with pytest.raises(ConfigError, match="cannot give each"):
        simulate(cfg_(clients=500, fraction=0.01), TRAIN, EVAL)


@pytest.mark.timeout(120)
def test_cli_on_sst2_writes_results(tmp_path, capsys):
    mc = json.dumps({**TINY, "vocab_size": 30522, "max_position_embeddings": 32})
    rc = main(["--clients", "10", "--fraction", "0.2", "--rounds", "2", "--local-steps", "2",
               "--model-config", mc, "--train-subset", "200", "--eval-subset", "64", "--max-len", "24",
               "--up-bits", "3", "--down-bits", "2", "--alpha", "0.5", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["round"] == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["total_bytes"] < summary["total_fp32_bytes"] / 8
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 1000
    assert main(["--up-bits", "1", "--no-progress"]) == 2
    assert "up_bits" in capsys.readouterr().err
