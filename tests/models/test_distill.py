import copy

import torch

from lowbit.models import distill_losses, distill_step, wrap
from lowbit.models.layers import install_lowbit_attention


def test_losses_zero_for_identical_outputs(fresh):
    model, batch = fresh
    install_lowbit_attention(model, return_scores=True)
    with torch.no_grad():
        a = model(**batch, output_hidden_states=True, output_attentions=True)
        b = model(**batch, output_hidden_states=True, output_attentions=True)
    losses = distill_losses(a, b)
    assert set(losses) == {"logits", "hidden", "attention"}
    for v in losses.values():
        assert abs(float(v)) < 1e-6
    assert len(a.hidden_states) == model.config.num_hidden_layers + 1  # embedding output included
    # scores (pre-softmax), not probabilities: rows do not sum to 1 and masked keys are 0
    att = a.attentions[0]
    assert not torch.allclose(att.sum(-1), torch.ones_like(att.sum(-1)))
    mask = batch["attention_mask"]
    assert (att[1, :, :, mask[1] == 0] == 0).all()


def test_losses_positive_for_quantized_student(fresh):
    teacher, batch = fresh
    student = wrap(copy.deepcopy(teacher), "ternarybert").eval()
    for m in (teacher, student):
        install_lowbit_attention(m, return_scores=True)
    with torch.no_grad():
        t = teacher(**batch, output_hidden_states=True, output_attentions=True)
        s = student(**batch, output_hidden_states=True, output_attentions=True)
    losses = distill_losses(s, t, T=2.0)
    for k, v in losses.items():
        assert float(v) > 0, k


def test_distill_step_trains_student(fresh):
    teacher, batch = fresh
    student = wrap(copy.deepcopy(teacher), "ternarybert")
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    w0 = student.bert.encoder.layer[0].attention.self.value.weight.detach().clone()
    torch.manual_seed(0)
    first = distill_step(student, teacher, batch, opt)
    later = [distill_step(student, teacher, batch, opt)["loss"] for _ in range(9)]
    assert set(first) >= {"logits", "hidden", "attention", "loss"}
    assert min(later[-3:]) < first["loss"]  # single steps are noisy (dropout); the trend must be down
    assert not torch.equal(w0, student.bert.encoder.layer[0].attention.self.value.weight)
    # the teacher is untouched
    for p in teacher.parameters():
        assert p.grad is None
