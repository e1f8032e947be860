"""Row-sparse gradient frames: cut from the dense frame and rebuilt from it byte for byte (so the
receiver's sum is the dense path's), sent only when smaller, rejected with FrameError when malformed."""
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from lowbit.codec.codecs import StochasticGradCodec
from lowbit.codec.decode import decode_frame
from lowbit.codec.frame import Frame
from lowbit.codec.sparse import RowSparseCodec, densify, sparsify
from lowbit.errors import FrameError
from lowbit.testing import resealed


def _grad(rows, cols, touched, seed):
    g = torch.zeros(rows, cols)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(rows, generator=gen)[:touched]
    g[idx] = torch.randn(len(idx), cols, generator=gen)
    return g


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 300), cols=st.sampled_from([8, 16, 24, 384]), bits=st.integers(2, 8),
       frac=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]), seed=st.integers(0, 1000))
def test_the_sparse_frame_rebuilds_the_dense_one_byte_for_byte(rows, cols, bits, frac, seed):
    g = _grad(rows, cols, int(rows * frac), seed)
    dense = StochasticGradCodec(bits).encode(g, key=3, step=9, generator=torch.Generator().manual_seed(seed))
    sp = RowSparseCodec(StochasticGradCodec(bits)).encode(g, key=3, step=9,
                                                          generator=torch.Generator().manual_seed(seed))
    assert sp.kind == "gsparse" or sp.to_bytes() == dense.to_bytes()
    if frac == 0.0 and rows >= 10:
        assert sp.kind == "gsparse"
    wire = sp.to_bytes()
    parsed = Frame.from_bytes(wire, expect_kind="grad")
    back = densify(parsed) if parsed.kind == "gsparse" else parsed
    assert back.to_bytes() == dense.to_bytes()
    assert torch.equal(decode_frame(Frame.from_bytes(wire)), decode_frame(dense))


def test_rows_are_chosen_by_their_codes_not_by_the_gradient():
    """Stochastic rounding may, rarely, give an exactly-zero value a nonzero code: such a row is sent
    (the dense frame is rebuilt exactly), a row of zero codes is not."""
    codec = StochasticGradCodec(3)
    g = _grad(15261, 128, 60, 0) * 1e-3
    for seed in range(12):
        dense = codec.encode(g, generator=torch.Generator().manual_seed(seed))
        sp = RowSparseCodec(codec).encode(g, generator=torch.Generator().manual_seed(seed))
        assert sp.kind == "gsparse" and densify(sp).to_bytes() == dense.to_bytes()


def test_the_codec_sends_sparse_frames_only_when_smaller():
    codec = RowSparseCodec(StochasticGradCodec(3))
    few, most = _grad(1000, 64, 10, 0), _grad(1000, 64, 950, 1)
    f = codec.encode(few, key=1, generator=torch.Generator().manual_seed(0))
    assert f.kind == "gsparse" and len(f.to_bytes()) < 0.05 * codec.frame_nbytes((1000, 64))
    assert torch.equal(codec.decode(f), StochasticGradCodec(3).decode(
        StochasticGradCodec(3).encode(few, key=1, generator=torch.Generator().manual_seed(0))))
    assert codec.encode(most, generator=torch.Generator().manual_seed(0)).kind == "grad"
    assert codec.encode(_grad(10, 5, 1, 2)).kind == "grad"  # 5 columns at 3 bits: rows are not whole bytes
    assert sparsify(StochasticGradCodec(3).encode(_grad(10, 5, 1, 2)), torch.tensor([0])) is None


_SEED = RowSparseCodec(StochasticGradCodec(3)).encode(_grad(200, 16, 12, 5), key=2).to_bytes()


@pytest.mark.parametrize("edit,match", [
    (lambda p: struct.pack_into("<I", p, 0, 10**6), "does not hold"),
    (lambda p: p.__setitem__(8, p[8] ^ 0xFF), "row ids"),
])
def test_a_malformed_sparse_frame_is_a_frame_error(edit, match):
    with pytest.raises(FrameError, match=match):
        densify(Frame.from_bytes(resealed(_SEED, edit)))
