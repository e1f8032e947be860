import pytest
import torch

from lowbit.codec import RawCodec, StochasticGradCodec, join_frames
from lowbit.codec.bundle import bundle_bound, check_announced, max_frame_nbytes, parse_bundle
from lowbit.errors import FrameError

SHAPES = {0: (4, 6), 1: (10,), 2: (3, 5)}


def _frame(key, step=7, shape=None, codec=None):
    g = torch.randn(*(shape or SHAPES[key]), generator=torch.Generator().manual_seed(key))
    codec = codec or StochasticGradCodec(3)
    return codec.encode(g, key=key, step=step, generator=torch.Generator().manual_seed(1)).to_bytes()


def _parse(buf, **kw):
    return parse_bundle(buf, peer=3, step=7, kind="grad", shapes=SHAPES, rank=0, **kw)


def test_frames_come_back_in_order_with_their_exact_bytes():
    frames = [_frame(2), _frame(0)]
    got = _parse(join_frames(frames), required_keys=[0, 2])
    assert [pf.frame.key for pf in got] == [2, 0]
    assert [bytes(pf.raw) for pf in got] == frames
    assert _parse(b"") == []


@pytest.mark.parametrize("bundle, kw, match", [
    (lambda: _frame(0, step=8), {}, "carries step 8, expected 7"),
    (lambda: _frame(1), {"allowed_keys": [0]}, "key 1, which this peer may not send"),
    (lambda: _frame(0, shape=(6, 4)), {}, r"shape \(6, 4\), expected \(4, 6\)"),
    (lambda: _frame(0) + _frame(0), {}, "key 0 occurs 2 times"),
    (lambda: _frame(0), {"required_keys": [0, 1]}, r"missing frames for keys \[1\]"),
    (lambda: _frame(0)[:-1], {}, "frame #0 at byte 0"),
])
def test_a_bad_bundle_names_the_peer_and_the_step(bundle, kw, match):
    with pytest.raises(FrameError, match=match) as e:
        _parse(bundle(), **kw)
    assert "rank 0: bundle from peer 3 at step 7" in str(e.value)


def test_the_bound_holds_every_codec_and_bounds_an_announced_length():
    for k, shape in SHAPES.items():
        assert len(_frame(k, codec=RawCodec())) <= max_frame_nbytes(shape)
    bound = bundle_bound(SHAPES, [0, 2], copies=2)
    assert bound == 2 * (max_frame_nbytes(SHAPES[0]) + max_frame_nbytes(SHAPES[2]))
    check_announced(bound, bound, peer=1, step=3, rank=0)
    check_announced(10**12, None, peer=1, step=3, rank=0)
    with pytest.raises(FrameError, match=r"rank 0: peer 1 announced chunk 2 of \d+ bytes at step 3"):
        check_announced(bound + 1, bound, peer=1, step=3, rank=0, chunk=2)
    with pytest.raises(FrameError, match="announced a bundle of -1 bytes"):
        check_announced(-1, None, peer=1, step=3, rank=0)
