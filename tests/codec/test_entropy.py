"""Entropy-coded gradient frames: rebuilt from the dense frame byte for byte (so the receiver's sum
is the dense path's), sent only when smaller, composed with error feedback and row-sparse frames,
rejected with FrameError when malformed."""
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from lowbit.codec.codecs import StochasticGradCodec
from lowbit.codec.decode import decode_frame, dense_frame
from lowbit.codec.entropy import EntropyCodec, entropy_code, expand
from lowbit.codec.feedback import FeedbackCodec, with_feedback
from lowbit.codec.frame import Frame
from lowbit.codec.sparse import RowSparseCodec
from lowbit.errors import FrameError
from lowbit.quant.grads import ErrorFeedback
from lowbit.testing import resealed

pytest.importorskip("constriction")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from([(1,), (7,), (64,), (33, 17), (128, 96), (3, 5, 40)]), bits=st.integers(2, 8),
       seed=st.integers(0, 1000), spread=st.sampled_from([1e-3, 1.0, 1e3]))
def test_the_coded_frame_rebuilds_the_dense_one_byte_for_byte(shape, bits, seed, spread):
    g = torch.randn(shape, generator=_gen(seed)) * spread
    dense = StochasticGradCodec(bits).encode(g, key=5, step=2, generator=_gen(seed))
    f = EntropyCodec(StochasticGradCodec(bits)).encode(g, key=5, step=2, generator=_gen(seed))
    assert f.kind == "gcoded" or f.to_bytes() == dense.to_bytes()
    wire = f.to_bytes()
    assert len(wire) <= len(dense.to_bytes())
    parsed = Frame.from_bytes(wire, expect_kind="grad")
    assert dense_frame(parsed).to_bytes() == dense.to_bytes()
    assert torch.equal(decode_frame(parsed), decode_frame(dense))


@pytest.mark.parametrize("bits,most", [(2, 1.05), (3, 2.05)])
def test_a_clipped_gradient_codes_in_about_its_entropy(bits, most):
    """A heavy-tailed gradient clipped at 3 sigma: 2-bit codes in about one bit, 3-bit in about two."""
    g = torch.distributions.StudentT(3.0).sample((256, 1024))
    codec = EntropyCodec(StochasticGradCodec(bits))
    f = codec.encode(g, generator=_gen(0))
    assert f.kind == "gcoded"
    assert 8 * f.payload.numel() / g.numel() < most
    assert torch.equal(codec.decode(f), StochasticGradCodec(bits).decode(
        StochasticGradCodec(bits).encode(g, generator=_gen(0))))


def test_a_frame_that_would_not_shrink_goes_dense():
    g = torch.randn(4)  # the histogram alone outweighs four packed codes
    f = EntropyCodec(StochasticGradCodec(3)).encode(g, generator=_gen(0))
    assert f.kind == "grad"
    assert entropy_code(StochasticGradCodec(3).encode(torch.zeros(0))) is None


def test_error_feedback_wraps_the_lossy_codec_inside_the_lossless_ones():
    """with_feedback puts the memory around the stochastic codec, inside the coder: the residuals
    are the plain codec's, and the sender never decodes its own coded frame."""
    ef_a, ef_b = ErrorFeedback(), ErrorFeedback()
    coded = with_feedback(EntropyCodec(RowSparseCodec(StochasticGradCodec(2))), ef_a)
    plain = with_feedback(StochasticGradCodec(2), ef_b)
    assert isinstance(coded, EntropyCodec) and isinstance(coded.inner.inner, FeedbackCodec)
    for step in range(3):
        g = torch.randn(64, 32, generator=_gen(step))
        fa = coded.encode(g, key=1, step=step, generator=_gen(10 + step), name="w")
        fb = plain.encode(g, key=1, step=step, generator=_gen(10 + step), name="w")
        assert dense_frame(fa).to_bytes() == fb.to_bytes()
        assert torch.equal(ef_a.residuals["w"], ef_b.residuals["w"])


_SEED = EntropyCodec(StochasticGradCodec(3)).encode(torch.randn(200, 16, generator=_gen(5)), key=2,
                                                    generator=_gen(5)).to_bytes()


@pytest.mark.parametrize("edit,match", [
    (lambda p: struct.pack_into("<I", p, 0, 5), "histogram"),
    (lambda p: struct.pack_into("<I", p, 4, 10**6), "histogram counts"),
    (lambda p: p.__setitem__(len(p) - 1, p[-1] ^ 0x5A), "stream"),
    (lambda p: p.extend(b"\0\0\0\0"), "stream"),
])
def test_a_malformed_coded_frame_is_a_frame_error(edit, match):
    f = Frame.from_bytes(resealed(_SEED, edit))
    with pytest.raises(FrameError, match=match):
        expand(f)
