"""Error feedback as a codec wrapper: the residual carries what the codec lost, per name."""
import pytest
import torch

from lowbit.codec import FeedbackCodec, RawCodec, StochasticGradCodec, with_feedback
from lowbit.quant.grads import ErrorFeedback


def test_passthrough_and_no_memory_encode_without_feedback():
    memory = ErrorFeedback()
    x = torch.randn(8, 8)
    raw = with_feedback(RawCodec(), memory)
    assert not raw.active and torch.equal(raw.decode(raw.encode(x, key=1, name="a")), x)
    off = with_feedback(StochasticGradCodec(3), None)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert not off.active
    assert off.encode(x, generator=gen(), name="a").to_bytes() == StochasticGradCodec(3).encode(x, generator=gen()).to_bytes()
    assert memory.residuals == {}
    assert isinstance(with_feedback(StochasticGradCodec(3), memory), FeedbackCodec)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_sum_of_decoded_frames_tracks_sum_of_inputs(bits):
    """Σ decode(encode(g_t)) = Σ g_t − e_T: nothing is lost for good, only delayed."""
    memory = ErrorFeedback()
    codec = with_feedback(StochasticGradCodec(bits, clip=None), memory)
    gen = torch.Generator().manual_seed(0)
    total_in = torch.zeros(64, 32)
    total_out = torch.zeros(64, 32)
    for step in range(6):
        g = torch.randn(64, 32, generator=gen)
        f = codec.encode(g, key=5, step=step, generator=gen, name="w")
        assert f.key == 5 and f.bits == bits and codec.frame_nbytes((64, 32)) == len(f.to_bytes())
        total_in += g
        total_out += codec.decode(f)
    torch.testing.assert_close(total_out, total_in - memory.residuals["w"], rtol=1e-4, atol=1e-4)


def test_residuals_are_per_name_and_default_to_the_key():
    memory = ErrorFeedback()
    codec = with_feedback(StochasticGradCodec(2), memory)
    gen = torch.Generator().manual_seed(1)
    codec.encode(torch.randn(10, 10), key=3, generator=gen)
    codec.encode(torch.randn(4, 4), key=0, generator=gen, name="bias-free")
    assert set(memory.residuals) == {3, "bias-free"}
    assert memory.residuals[3].shape == (10, 10) and float(memory.residuals[3].abs().sum()) > 0
