"""Threshold-ternary gradients: the values above tau*rms go as +-s (s their mean magnitude), the rest
as zero; with error feedback nothing is lost, only delayed."""
import pytest
import torch

from lowbit.codec.decode import decode_frame
from lowbit.codec.feedback import with_feedback
from lowbit.codec.frame import Frame
from lowbit.codec.threshold import ThresholdGradCodec
from lowbit.errors import ConfigError, NonFiniteGradientError
from lowbit.quant.grads import ErrorFeedback
from lowbit.train.config import CodecConfig


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.5, 3.0])
def test_values_above_the_threshold_go_as_their_mean_magnitude(tau):
    g = torch.distributions.StudentT(3.0).sample((96, 40))
    f = ThresholdGradCodec(tau).encode(g, key=4, step=7)
    out = decode_frame(Frame.from_bytes(f.to_bytes(), expect_kind="grad"))
    keep = g.abs() > tau * g.pow(2).mean().sqrt()
    s = g.abs()[keep].mean()
    assert f.bits == 2 and f.key == 4 and f.step == 7
    assert torch.allclose(out, torch.sign(g) * keep * s)


def test_a_zero_gradient_sends_zeros():
    f = ThresholdGradCodec().encode(torch.zeros(5, 8))
    assert torch.equal(decode_frame(f), torch.zeros(5, 8))


def test_error_feedback_delays_what_it_does_not_send():
    """sum of what was sent over T steps = sum of the gradients - the last residual."""
    ef, codec = ErrorFeedback(), ThresholdGradCodec(1.5)
    gen = torch.Generator().manual_seed(0)
    sent, total = torch.zeros(64, 32), torch.zeros(64, 32)
    for step in range(20):
        g = torch.randn(64, 32, generator=gen)
        total += g
        sent += codec.decode(with_feedback(codec, ef).encode(g, step=step, name="w"))
    assert torch.allclose(sent, total - ef.residuals["w"], atol=1e-4)
    assert ef.residuals["w"].abs().max() < 4 * total.abs().max() / 20 ** 0.5


@pytest.mark.parametrize("kw,needle", [
    ({"g_scheme": "threshold", "g_bits": 2}, "error feedback"),
    ({"g_scheme": "threshold", "g_bits": 3, "error_feedback": True}, "ternary"),
    ({"g_scheme": "topk"}, "g_scheme"),
    ({"g_scheme": "threshold", "g_bits": 2, "error_feedback": True, "g_threshold": -1.0}, "g_threshold"),
    ({"scale_hold": 1.5}, "scale_hold"),
])
def test_bad_gradient_schemes_name_the_problem(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        CodecConfig(**kw).validate()


def test_threshold_zero_is_the_scaled_sign_in_about_one_bit():
    """tau = 0 sends every nonzero value as sign(g) * mean|g| (EF-signSGD's compressor), and the
    entropy coder takes its 2-bit codes to about one bit per value."""
    from lowbit.codec.entropy import EntropyCodec

    g = torch.randn(256, 384)
    g[0, :5] = 0.0
    f = EntropyCodec(ThresholdGradCodec(0.0)).encode(g)
    out = decode_frame(f)
    assert torch.allclose(out, torch.sign(g) * g.abs()[g != 0].mean())
    assert f.kind == "gcoded" and 8 * f.payload.numel() / g.numel() < 1.01


@pytest.mark.parametrize("policy", ["error", "skip", "zero"])
def test_a_non_finite_gradient_follows_the_policy(policy):
    g = torch.randn(8, 8)
    g[2, 3] = float("nan")
    codec = ThresholdGradCodec(1.0, nonfinite=policy)
    if policy == "error":
        with pytest.raises(NonFiniteGradientError, match="gradient"):
            codec.encode(g)
    elif policy == "skip":
        assert codec.encode(g) is None
    else:
        assert torch.equal(decode_frame(codec.encode(g)), torch.zeros(8, 8))
