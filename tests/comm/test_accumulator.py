"""GradAccumulator: sums decoded in place, buffers kept across steps, averages per key group."""
import pytest
import torch

from lowbit.codec.codecs import RawCodec, StochasticGradCodec, decode_frame
from lowbit.comm.transport import GradAccumulator
from lowbit.errors import FrameError


def test_sums_reuse_their_buffers_across_steps_and_average_by_group():
    acc = GradAccumulator()
    gen = torch.Generator().manual_seed(0)
    c = StochasticGradCodec(3)
    xs = [torch.randn(40, 3, generator=gen) for _ in range(3)]
    fr = [c.encode(x, key=7, generator=gen) for x in xs]
    raw = RawCodec().encode(torch.ones(5), key=8)
    for f in fr:
        acc.add(f)
    acc.add(raw)
    ref = sum(decode_frame(f) for f in fr) / 3
    buf = acc.sums[7].data_ptr()
    assert acc.counts == {7: 3, 8: 1}
    got = acc.averages([7])
    assert list(got) == [7] and torch.equal(got[7], ref)  # one group averaged, the other untouched
    assert torch.equal(acc.averages([8])[8], torch.ones(5))
    acc.reset()
    assert acc.sums == {} and acc.counts == {}
    acc.add(fr[0])  # the next step decodes into the same memory, overwriting the old sum
    assert acc.sums[7].data_ptr() == buf and torch.equal(acc.sums[7], decode_frame(fr[0]))
    with pytest.raises(FrameError, match="has shape"):
        acc.add(c.encode(torch.randn(3, 40), key=7, generator=gen))
