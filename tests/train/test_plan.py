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
