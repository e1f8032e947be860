"""Ring and tree decode on a helper thread while the next round is on the wire: sums and weights equal to
decoding inline, and a frame that passes its CRC but fails to decode (a code outside the grid) is raised on
the owner as FrameError naming key and peer, once its rounds are over; the other ranks, left
without that owner's weights, fail with a TransportError within their timeout instead of hanging."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from lowbit.testing import SGDOwner, run_ranks
from lowbit.codec.codecs import RawCodec, StochasticGradCodec
from lowbit.comm.collective import RingTransport, TreeTransport, _Overlap
from lowbit.errors import FrameError

SHAPES = {0: (64,), 1: (8, 8), 2: (40,), 3: (5, 5)}


def _bad_frame(k, step):
    """A 3-bit gradient frame with a valid CRC whose first codes are 7: outside the symmetric grid."""
    f = StochasticGradCodec(3).encode(torch.randn(SHAPES[k]), key=k, step=step,
                                      generator=torch.Generator().manual_seed(k))
    payload = f.payload.clone()
    payload[:3] = 0xFF
    return dataclasses.replace(f, payload=payload).to_bytes()


def _body(rank, world, kind):
    from lowbit.errors import TransportError
    t = (RingTransport if kind == "ring" else TreeTransport)(SHAPES, timeout=5)
    owner = SGDOwner({k: torch.full(SHAPES[k], float(k)) for k in t.owned_keys()}, lr=0.0)  # fixed weights
    out = {}
    for step in (1, 2):
        grads = {k: RawCodec().encode(torch.full(SHAPES[k], float(rank + 1)), key=k, step=step).to_bytes()
                 for k in SHAPES}
        if step == 2 and rank == 1:  # rank 0's keys get a bad frame from rank 1
            for k in t.owned_keys(0):
                grads[k] = _bad_frame(k, step)
        try:
            got = t.step(step, grads, owner)
            out[step] = ("ok", {k: float(v.mean()) for k, v in got.items()},
                         {k: float(g.mean()) for k, g in owner.grads.items()})
        except (FrameError, TransportError) as e:
            out[step] = (type(e).__name__, str(e))
        if step == 1:
            dist.barrier()
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["ring", "tree"])
def test_decode_error_on_the_helper_thread_is_raised_after_the_rounds(kind):
    res = run_ranks(_body, 4, kind)
    for rank in range(4):  # step 1: weights as owned, sums = mean over ranks of rank + 1
        verdict, weights, sums = res[rank][1]
        assert verdict == "ok"
        assert weights == {k: float(k) for k in SHAPES}
        assert all(v == pytest.approx(2.5) for v in sums.values()), sums
    verdict, msg = res[0][2]
    assert verdict == "FrameError" and "outside the 3-bit symmetric grid" in msg and "via peer" in msg, msg
    for rank in (1, 2, 3):
        assert res[rank][2][0] in ("TransportError", "FrameError"), (rank, res[rank][2])


def test_overlap_keeps_order_and_reports_the_first_error():
    ov = _Overlap()
    seen = []
    for i in range(50):
        ov.submit(seen.append, i)
    ov.join()
    assert seen == list(range(50))

    def boom(i):
        raise ValueError(f"bad {i}")
    ov.submit(boom, 1)
    ov.submit(seen.append, 99)
    ov.submit(boom, 2)
    with pytest.raises(ValueError, match="bad 1"):
        ov.join()
    assert seen[-1] == 99  # work after a failure still ran: nothing is left writing afterwards
    ov.submit(boom, 3)
    ov.join(quiet=True)  # the caller's own error wins
    ov.join()  # nothing left
