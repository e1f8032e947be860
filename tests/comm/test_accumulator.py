"""GradAccumulator: sums decoded in place, buffers kept across steps, averages per key group."""
import pytest
import torch

from lowbit.codec.codecs import RawCodec, StochasticGradCodec
from lowbit.codec.decode import decode_frame
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


class _ScriptedPumps:
    """Stands in for the server's Pumps: chunks 'arrive' in ``arrival`` order, one more each time
    the server blocks (get of a chunk not yet in, or first_of)."""

    def __init__(self, arrival, chunks):
        self.arrival, self.chunks, self.n_in = list(arrival), chunks, 0

    def _arrive_until(self, cond):
        while not cond():
            self.n_in += 1

    def first_of(self, peers):
        self._arrive_until(lambda: any(p in self.arrival[:self.n_in] for p in peers))
        return next(p for p in self.arrival[:self.n_in] if p in peers)

    def ready(self, peer):
        return peer in self.arrival[:self.n_in]

    def get(self, peer):
        self._arrive_until(lambda: self.ready(peer))
        return self.chunks[peer]


@pytest.mark.parametrize("arrival", [(2, 3, 4), (3, 2, 4), (4, 3, 2), (4, 2, 3), (3, 4, 2)])
def test_server_sums_chunks_as_they_arrive_in_a_fixed_order(arrival):
    """The PS server decodes the first chunk of a group while the others are on the wire and the
    ones already in together; whatever the arrival order, the fp32 sum is taken as (w_a + w_b) + w_c
    with {a, b} the first two workers (the same bits as worker order), so it does not depend on timing."""
    from lowbit.comm.ps import ParameterServerTransport
    g = {2: torch.tensor([1e8, 1.0, 3.0]), 3: torch.tensor([1.0, 1e8, -2.5]), 4: torch.tensor([-1e8, -1e8, 0.125])}
    codec = RawCodec(torch.float32, "grad")
    chunks = {w: codec.encode(g[w], key=0, step=5).to_bytes() for w in g}

    class Server:  # what _sum_arriving and _sum_group use of the transport
        workers, rank, shapes, groups_of = [2, 3, 4], 0, {0: (3,)}, {0: [[0]]}
        _acc = GradAccumulator()
        batches = []
        _sum_group_real = ParameterServerTransport._sum_group

        def _sum_group(self, step, i, chunks, average):
            self.batches.append((list(chunks), average))
            self._sum_group_real(step, i, chunks, average)

    srv = Server()
    assert ParameterServerTransport._sum_arriving(srv, 5, 0, _ScriptedPumps(arrival, chunks)) is None
    order = sum((b for b, _ in srv.batches), [])
    assert sorted(order[:2]) == [2, 3] and order[2] == 4, srv.batches  # first two any order, then worker order
    assert [avg for _, avg in srv.batches] == [False] * (len(srv.batches) - 1) + [True]
    assert srv.batches[0][0][0] == next(w for w in arrival if w in (2, 3))  # the first to arrive, decoded first
    expect = ((g[2] + g[3]) + g[4]) / 3
    assert torch.equal(srv._acc.averages([0])[0], expect), (srv._acc.averages([0])[0], expect)
    if arrival[0] == 4:  # worker 4 waits for the first two; the last one then comes in its own pass
        assert len(srv.batches) >= 2
