import pytest
import torch
from torch import nn

from lowbit.train.config import CodecConfig
from lowbit.train.plan import assemble, make_plan, param_group, piece_tensors


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(1000, 16)
        self.layer = nn.Linear(16, 8)
        self.classifier = nn.Linear(8, 2)


def test_groups_and_bits():
    m = Toy()
    plan = make_plan(m, CodecConfig(w_bits=2, g_bits=3, embed_bits=8, head_bits=4, max_piece_numel=0))
    by = {s.name: s for s in plan}
    assert by["embeddings.weight"].group == "embedding" and by["embeddings.weight"].w_codec.bits == 8
    assert by["layer.weight"].group == "transformer" and by["layer.weight"].w_codec.bits == 2
    assert by["classifier.weight"].group == "head" and by["classifier.weight"].w_codec.bits == 4
    assert by["layer.bias"].group == "small" and by["layer.bias"].w_codec.bits == 32
    assert by["layer.weight"].g_codec.bits == 3 and by["layer.bias"].g_codec.bits == 32
    assert param_group("encoder.layer.0.attention.self.query.weight", torch.zeros(2, 2)) == "transformer"


def test_large_tensors_split_into_row_blocks_and_reassemble():
    m = Toy()
    plan = make_plan(m, CodecConfig(max_piece_numel=3000))
    emb = [s for s in plan if s.param == 0]
    assert len(emb) == 6  # 16000 elements in blocks of at most 3000 -> 6 blocks of rows
    assert sum(s.shape[0] for s in emb) == 1000 and all(s.shape[0] * 16 <= 3000 for s in emb)
    assert [s.key for s in plan] == list(range(len(plan)))
    pieces = piece_tensors(m, plan)
    whole = assemble(plan, pieces)
    for i, (_, p) in enumerate(m.named_parameters()):
        assert torch.equal(whole[i], p.detach())
    # views, not copies: a piece shares storage with its parameter
    assert pieces[emb[1].key].data_ptr() == m.embeddings.weight[emb[1].rows[0]:].data_ptr()


def test_shard_server_in_parts_equals_one_whole_step():
    """The pipelined parameter server updates a shard group by group (apply_keys); with Adam, warmup
    and LAQ re-quantization the parts together equal one whole apply, bit for bit, and the lr
    schedule advances once per step."""
    from lowbit.codec.frame import Frame
    from lowbit.train.config import OptimConfig
    from lowbit.train.server import ShardServer

    torch.manual_seed(0)
    m = Toy()
    plan = make_plan(m, CodecConfig(w_bits=2, g_bits=3, max_piece_numel=3000))
    init = piece_tensors(m, plan)
    opt = OptimConfig(name="adam", lr=1e-2, warmup_steps=2)
    whole, parts = (ShardServer(plan, init, opt, total_steps=10) for _ in range(2))
    keys = sorted(whole.params)
    groups = [keys[:3], keys[3:7], keys[7:]]
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        grads = {k: torch.randn(s.shape, generator=g) for k, s in enumerate(plan) if k != 2 or step != 1}
        counts = {k: 2 for k in grads}  # key 2 skipped by everyone at step 1
        whole.apply(step, grads, counts)
        for i, grp in enumerate(groups):
            lr_before = parts.lr()
            parts.apply_keys(step, {k: grads[k] for k in grp if k in grads}, {}, grp, last=i == len(groups) - 1)
            if i < len(groups) - 1:
                assert parts.lr() == lr_before and parts.step_done == step
        assert parts.lr() == whole.lr() and parts.step_done == whole.step_done == step + 1
        for k in keys:
            assert torch.equal(parts.params[k].data, whole.params[k].data), (step, k)
        wf, pf = whole.weight_frames(step), parts.weight_frames(step, groups[1])
        assert sorted(pf) == groups[1]
        for k in groups[1]:
            assert pf[k] == wf[k]
            Frame.from_bytes(pf[k], expect_key=k)


def test_worker_takes_aligned_weights_and_decodes_into_them():
    """all-MiniLM-L6-v2 loads from safetensors with weights at 8-byte aligned offsets of the mapped
    file; the worker takes aligned copies, and received 2-bit weights decode into them in place."""
    from lowbit.codec.decode import decode_frame
    from lowbit.comm.transport import decode_weight
    from lowbit.models.presets import load_preset
    from lowbit.train.worker import Worker

    model, _ = load_preset("minilm", num_labels=2)
    plan = make_plan(model, CodecConfig(w_bits=2, g_bits=3, embed_bits=8, head_bits=8))
    w = Worker(model, plan, rank=0)
    assert all(p.data_ptr() % 64 == 0 for p in w.params)
    dest = w.weight_buffers()
    spec = next(s for s in plan if s.w_codec.bits == 2 and len(s.shape) == 2)
    f = spec.w_codec.encode(torch.randn(spec.shape), key=spec.key)
    got = decode_weight(f, "cpu", dest)
    assert got.data_ptr() == dest[spec.key].data_ptr()
    assert torch.equal(spec.view(dict(model.named_parameters())[spec.name]).detach(), decode_frame(f))


def _toy_worker(ef: bool, nonfinite: str):
    from lowbit.train.worker import Worker
    torch.manual_seed(0)
    m = Toy()
    plan = make_plan(m, CodecConfig(w_bits=2, g_bits=3, small_g_bits=8, max_piece_numel=3000))
    w = Worker(m, plan, rank=1, seed=5, error_feedback=ef, nonfinite=nonfinite)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    return w, plan


def test_lazy_gradient_frames_equal_eager_ones_in_any_order():
    """encode_gradients(lazy=True) screens now, encodes on read: the same frames as the eager call
    whatever order the keys are read in (one generator per key), error feedback included; a key the
    nonfinite policy skipped reads as None and is counted at once."""
    for ef in (False, True):
        eager_w, plan = _toy_worker(ef, "skip")
        lazy_w, _ = _toy_worker(ef, "skip")
        for w in (eager_w, lazy_w):  # a NaN in one gradient piece: skipped by both
            plan[2].view(w.params[plan[2].param].grad).reshape(-1)[0] = float("nan")
        for step in (3, 4):  # two steps: error-feedback residuals carry over
            eager = eager_w.encode_gradients(step)
            lazy = lazy_w.encode_gradients(step, lazy=True)
            assert lazy_w.skipped == eager_w.skipped == step - 2 and lazy.encoded == []
            keys = [s.key for s in plan]
            for k in reversed(keys):  # read backwards: not the order eager encoded in
                assert lazy[k] == eager.get(k), (ef, step, k)
            assert lazy[plan[2].key] is None and plan[2].key not in eager
            assert lazy.encoded == list(reversed(keys))
            lazy[keys[0]]  # read again: kept, not encoded twice
            assert lazy.encoded.count(keys[0]) == 1
    with pytest.raises(KeyError):
        lazy[10_000]
