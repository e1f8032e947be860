"""Distillation inside distributed training: the loss terms, the two modes, and the checks that run
before any rank starts."""
import math

import pytest
import torch
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.models.presets import load_preset
from lowbit.testing import tiny_config
from lowbit.train.distill import (LOGITS_FILE, CachedLogitLoss, TeacherLoss, load_teacher, make_distiller,
                                  parse_weights)
from lowbit.train.launch import launch_local
from lowbit.train.loop import build_model, load_data
from lowbit.train.preflight import preflight


def test_soft_cross_entropy_against_a_hand_computed_value():
    """student logits (0, 0), teacher (ln 3, 0): p_t = (3/4, 1/4), p_s = (1/2, 1/2);
    KL = 3/4·ln(3/2) + 1/4·ln(1/2) = 0.130812..."""
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Model(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, **kw):
            return Out(self.logits)

    w = parse_weights("logits=1", "logits")
    loss = CachedLogitLoss(teacher, w)(Model(student), {"input_ids": torch.zeros(1, 4)}, torch.tensor([0]))
    assert float(loss) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    w2 = parse_weights("logits=1,label=0.5", "logits")
    with_label = CachedLogitLoss(teacher, w2)(Model(student), {"input_ids": torch.zeros(1, 4), "labels": torch.tensor([1])},
                                              torch.tensor([0]))
    assert float(with_label) == pytest.approx(float(loss) + 0.5 * math.log(2.0), abs=1e-6)


@pytest.mark.timeout(60)
def test_cached_logits_give_the_teacher_on_worker_logit_loss():
    torch.manual_seed(0)
    teacher, tok = load_preset("tiny-bert", num_labels=2)
    teacher.eval()
    student = load_preset("tiny-bert", num_labels=2)[0]  # the preset's seeded init: perturb it
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = dict(tok(["good", "bad movie", "fine"], padding="max_length", max_length=8, return_tensors="pt"))
    with torch.no_grad():
        cached = teacher(**batch).logits
    w = parse_weights("logits=1", "logits")
    student.eval()  # no dropout: the two calls see the same student
    on_worker = TeacherLoss(teacher, dict(w))(student, batch, torch.arange(3))
    from_cache = CachedLogitLoss(torch.cat([torch.zeros(5, 2), cached]), w)(student, batch, torch.arange(5, 8))
    assert float(on_worker.detach()) > 0 and torch.allclose(on_worker, from_cache, rtol=0, atol=1e-7)
    full = TeacherLoss(teacher, parse_weights("logits=1,hidden=1,attention=1", "workers"))(student, batch, None)
    assert float(full.detach()) > float(on_worker.detach())  # hidden-state and attention terms add to it


def test_weights_are_checked():
    assert parse_weights("logits=2,label=1", "workers") == {"logits": 2.0, "hidden": 0.0, "attention": 0.0,
                                                             "label": 1.0}
    with pytest.raises(ConfigError, match="TERM=WEIGHT"):
        parse_weights("logit=1", "workers")
    with pytest.raises(ConfigError, match="logits only"):
        parse_weights("logits=1,hidden=1", "logits")
    with pytest.raises(ConfigError, match="every term is 0"):
        parse_weights("logits=0", "workers")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "fp32"
    launch_local(tiny_config(out, {"run": {"steps": 3}}))
    return out


@pytest.mark.timeout(60)
def test_bad_teachers_fail_before_any_rank_starts(tmp_path, teacher_run):
    base = ["train", "--model", "tiny-bert", "--steps", "1", "--out", str(tmp_path / "run")]
    assert main(base + ["--teacher", str(tmp_path / "missing")]) == 2
    three = tmp_path / "three_labels"
    load_preset("tiny-bert", num_labels=3)[0].save_pretrained(three)
    with pytest.raises(ConfigError, match="num_labels 3"):
        preflight(tiny_config(tmp_path / "run", {"run": {"teacher": str(three)}}), quiet=True)
    from transformers import BertConfig, BertForSequenceClassification
    small_vocab = tmp_path / "small_vocab"
    BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64)).save_pretrained(small_vocab)
    with pytest.raises(ConfigError, match="vocab_size 100"):
        preflight(tiny_config(tmp_path / "run", {"run": {"teacher": str(small_vocab)}}), quiet=True)
    assert not (tmp_path / "run" / "logs").exists()
    t = load_teacher(str(teacher_run))  # a run folder: its owners' fp32 weights
    assert t.config.num_labels == 2 and not t.training


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["workers", "logits"])
def test_distributed_run_distills_from_a_run(mode, tmp_path, teacher_run):
    cfg = tiny_config(tmp_path / mode, {"codec": {"w_bits": 2, "g_bits": 3, "scheme": "ternarybert"},
                                        "run": {"teacher": str(teacher_run), "distill": mode, "steps": 3,
                                                "distill_weights": "logits=1,label=0" if mode == "logits"
                                                else "logits=1,hidden=1,attention=1"}})
    summary = launch_local(cfg)
    assert summary["steps_done"] == 3 and math.isfinite(summary["eval_loss"])
    if mode == "logits":
        logits = load_file(str(tmp_path / mode / LOGITS_FILE))["logits"]
        model, tok = build_model(cfg)
        train, _ = load_data(cfg, tok, 0, 1, leader=False)
        assert logits.shape == (train["labels"].shape[0], 2)
        d = make_distiller(cfg, model)
        assert isinstance(d, CachedLogitLoss) and not hasattr(d, "teacher")  # no fp32 model on the workers
