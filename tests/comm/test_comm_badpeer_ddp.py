"""Bad peers give a clear FrameError / TransportError on the receiving rank (never a hang); the DDP
comm hook trains like plain DDP; partition balances by size."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings, strategies as st

from lowbit.testing import SGDOwner, run_ranks
from lowbit.codec.codecs import RawCodec
from lowbit.codec.frame import frame_nbytes
from lowbit.comm.transport import partition

SHAPES = {0: (4, 3), 1: (5,)}


def _good(k, step, kind="grad"):
    return RawCodec(torch.float32, kind).encode(torch.ones(SHAPES[k]), key=k, step=step).to_bytes()


def _bad_bundles(step):
    """name -> bundle a bad worker sends for step ``step`` (both keys belong to server 0)."""
    wrong_shape = RawCodec().encode(torch.ones(3, 4), key=0, step=step).to_bytes()
    v2 = bytearray(_good(0, step))
    v2[4] = 2  # version byte
    corrupt = bytearray(_good(0, step))
    corrupt[-6] ^= 0x55  # payload byte, CRC no longer matches
    return {
        "shape": wrong_shape + _good(1, step),
        "version": bytes(v2) + _good(1, step),
        "corrupt": bytes(corrupt) + _good(1, step),
        "step": _good(0, step + 5) + _good(1, step),
        "kind": _good(0, step, "weight") + _good(1, step),
        "truncated": (_good(0, step) + _good(1, step))[:-3],
        "unknown_key": _good(0, step) + RawCodec().encode(torch.ones(5), key=9, step=step).to_bytes(),
    }


def _badpeer_body(rank, world):
    from lowbit.comm.ps import ParameterServerTransport
    from lowbit.errors import FrameError
    t = ParameterServerTransport(SHAPES, 1, timeout=20, chunks=1)  # the bad worker speaks one-chunk bundles
    out = {}
    names = list(_bad_bundles(0))
    owner = SGDOwner({k: torch.zeros(SHAPES[k]) for k in t.owned_keys()}) if rank == 0 else None
    for i, name in enumerate(names):
        step = 10 + i
        if rank == 1:  # the bad worker: push a crafted bundle with the transport's own protocol
            _send_chunks(t, step, [_bad_bundles(step)[name]])
        else:
            try:
                t.step(step, None, owner)
                out[name] = "no error"
            except FrameError as e:
                out[name] = str(e)
        dist.barrier()
    # A length nobody could fill: rejected (one-message mode: the announced length is checked
    # against the receive buffer, which is the chunk's bound; otherwise before any allocation).
    if rank == 1:
        dist.send(torch.tensor([1 << 50], dtype=torch.int64), 0, tag=0)
    else:
        try:
            t.step(50, None, owner)
            out["huge"] = "no error"
        except FrameError as e:
            out["huge"] = str(e)
    dist.barrier()
    # Down-link: a server that leaves out a key -> FrameError on the worker.
    if rank == 0:
        _send_chunks(t, 51, [_good(0, 51, "weight")], peer=1, direction="down")
    else:
        try:
            t.fetch_weights(51, None)
            out["missing"] = "no error"
        except FrameError as e:
            out["missing"] = str(e)
    dist.barrier()
    # A good round still works after all that.
    if rank == 0:
        t.step(52, None, owner)
    else:
        got = t.step(52, {k: _good(k, 52) for k in SHAPES}, None)
        out["good"] = all(torch.equal(got[k], -torch.ones(SHAPES[k])) for k in SHAPES)
    dist.barrier()
    return out


def _silent_server(rank, world):
    """A silent server: the worker times out with TransportError naming peer and step (no hang)."""
    from lowbit.comm.ps import ParameterServerTransport
    from lowbit.errors import TransportError
    out = {}
    if rank == 1:
        t2 = ParameterServerTransport(SHAPES, 1, timeout=1.5)
        try:
            t2.fetch_weights(60, None)
            out["silent"] = "no error"
        except TransportError as e:
            out["silent"] = str(e)
    return out


def _two_rank_body(rank, world, steps):
    out = {"bad": _badpeer_body(rank, world), "ddp": _ddp_body(rank, world, steps)}
    dist.barrier()
    out["bad"].update(_silent_server(rank, world))  # last: it leaves a timed-out receive behind
    return out


DDP_STEPS = 8


@pytest.fixture(scope="module")
def two_ranks():
    """One 2-rank gloo group for the bad-peer and DDP checks (one spawn for all: spawning is the slow part)."""
    return run_ranks(_two_rank_body, 2, DDP_STEPS, timeout=110)


@pytest.mark.timeout(120)
def test_bad_peer_gives_clear_errors_on_the_receiving_rank(two_ranks):
    srv, wrk = two_ranks[0]["bad"], two_ranks[1]["bad"]
    expect = {"shape": "has shape (3, 4), expected (4, 3)", "version": "unsupported frame version 2",
              "corrupt": "CRC32 mismatch", "step": "carries step 18, expected 13",
              "kind": "expected a grad frame, got weight", "truncated": "truncated frame",
              "unknown_key": "key 9", "huge": "announced a bundle of 1125899906842624 bytes"}
    for name, text in expect.items():
        assert text in srv[name], (name, srv[name])
        assert "peer 1" in srv[name], (name, srv[name])
    assert "missing frames for keys [1]" in wrk["missing"] and "peer 0" in wrk["missing"]
    assert wrk["good"] is True
    assert "peer 0" in wrk["silent"] and "step 60" in wrk["silent"], wrk["silent"]


def _ddp_body(rank, world, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lowbit.comm.hooks import LowbitHookState, lowbit_hook
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(32, 8, generator=g)
    y = x[:, :1] * 0.5 - x[:, 1:2] + 0.1 * torch.randn(32, 1, generator=g)
    models, losses = {}, {}
    state = LowbitHookState(bits=8, clip=None, error_feedback=True, seed=0)
    for name in ("plain", "lowbit"):
        m = copy.deepcopy(base)
        ddp = DDP(m)
        if name == "lowbit":
            ddp.register_comm_hook(state, lowbit_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        losses[name] = []
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
            losses[name].append(float(loss.detach()))
        models[name] = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    n = sum(p.numel() for p in base.parameters())
    return {"diff": float((models["plain"] - models["lowbit"]).abs().max()),
            "moved": float((models["plain"] - torch.cat([p.detach().reshape(-1) for p in base.parameters()])).abs().max()),
            "losses": losses, "up_sent": state.counter.up_sent, "up_recv": state.counter.up_recv,
            "frame": frame_nbytes("sym", 8, (n,), 1), "iters": state.iteration,
            "lowbit_params": models["lowbit"].tolist()}


@pytest.mark.timeout(120)
def test_ddp_hook_at_8_bits_tracks_plain_ddp(two_ranks):
    steps = DDP_STEPS
    res = {rank: out["ddp"] for rank, out in two_ranks.items()}
    for rank, r in res.items():
        lb, pl = r["losses"]["lowbit"], r["losses"]["plain"]
        assert lb[-1] < lb[0] * 0.9, lb
        assert r["diff"] < 0.05 * max(r["moved"], 1e-3) + 1e-3, r  # close to plain DDP relative to the distance moved
        assert abs(lb[-1] - pl[-1]) < 0.05 * pl[0], (lb, pl)
        assert r["iters"] == steps
        # one bucket per step for this tiny model: sent F, received (p-1)F per step
        assert r["up_sent"] == steps * r["frame"] and r["up_recv"] == steps * r["frame"], r
    # both ranks end with identical lowbit models (same averaged gradient everywhere)
    assert res[0]["lowbit_params"] == res[1]["lowbit_params"]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, 500), st.integers(1, 10_000), min_size=1, max_size=40),
       st.integers(1, 8))
def test_partition_balances_by_size(sizes, n):
    own = partition(sizes, n)
    assert set(own) == set(sizes) and all(0 <= o < n for o in own.values())
    loads = [sum(s for k, s in sizes.items() if own[k] == o) for o in range(n)]
    # LPT: every owner's load is within the largest item of the least loaded owner
    assert max(loads) - min(loads) <= max(sizes.values())
    assert partition(dict(reversed(list(sizes.items()))), n) == own  # deterministic, order-free
    if len(sizes) >= n:
        assert min(loads) > 0


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 1000), min_size=1, max_size=40), chunks=st.integers(1, 9))
def test_chunk_keys_cover_the_keys_in_order_in_at_most_chunks_groups(sizes, chunks):
    from lowbit.comm.chunk_plan import chunk_keys, chunk_shares
    keys = list(range(len(sizes)))
    groups = chunk_keys(keys, dict(enumerate(sizes)), chunks)
    assert [k for g in groups for k in g] == keys
    assert len(groups) == min(chunks, len(keys)) and all(groups)
    total, shares = sum(sizes), chunk_shares(len(groups))
    for g, share in zip(groups, shares):  # no group holds much more than its share (plus one key that straddles)
        assert sum(sizes[k] for k in g) <= total * share / sum(shares) + max(sizes)


def test_chunk_shares_make_the_last_groups_small():
    from lowbit.comm.chunk_plan import chunk_keys, chunk_shares
    assert chunk_shares(3) == [1.0, 1.0, 1.0]
    assert chunk_shares(4) == [1.0, 1.0, 0.5, 0.25]
    assert chunk_shares(10) == [1.0] * 6 + [0.5, 0.25, 0.125, 0.0625]
    n = [len(g) for g in chunk_keys(list(range(1000)), {k: 10 for k in range(1000)}, 10)]
    assert sum(n) == 1000 and n[-1] < n[-2] < n[-3] < n[-4] < min(n[:-4]) and max(n) - min(n[:-4]) <= 1, n


def _send_chunks(t, step, chunks, peer=0, direction="up"):
    """An upload (or download) with the transport's own protocol (chunk messages), contents crafted."""
    from lowbit.comm.messages import Pending
    pending = Pending(direction)
    for i, c in enumerate(chunks):
        t.p2p.send_chunk(peer, i, c, direction, pending)
    t.p2p.finish(pending, step)


def _chunked_badpeer(rank, world, one_message):
    """Chunked bundles: a frame in the wrong chunk (the receiver drains the round, then raises; the
    next round works), then a chunk longer than its bound (refused by a lowbit sender; announced by
    a lying one, rejected by the receiver), in either chunk protocol (one message on gloo, length
    then bytes on NCCL)."""
    from lowbit.comm.ps import ParameterServerTransport
    from lowbit.errors import FrameError, TransportError
    t = ParameterServerTransport(SHAPES, 1, timeout=20, chunks=2)  # chunk 0: key 0, chunk 1: key 1
    t.p2p.one_message = one_message
    owner = SGDOwner({k: torch.zeros(SHAPES[k]) for k in t.owned_keys()}) if rank == 0 else None
    out = {}
    if rank == 1:
        _send_chunks(t, 7, [_good(1, 7), b""])  # key 1 belongs in chunk 1
    else:
        try:
            t.step(7, None, owner)
            out["wrong_chunk"] = "no error"
        except FrameError as e:
            out["wrong_chunk"] = str(e)
    dist.barrier()
    if rank == 1:  # a good chunked round still works
        got = t.step(9, {k: _good(k, 9) for k in SHAPES}, None)
        out["good"] = all(torch.equal(got[k], -torch.ones(SHAPES[k])) for k in SHAPES)
    else:
        t.step(9, None, owner)
    dist.barrier()
    if rank == 1:
        from lowbit.comm.messages import Pending
        long = _good(0, 10) + _good(0, 10)
        try:  # the sender knows the bound too and refuses before sending
            t.p2p.send_chunk(0, 0, long, "up", Pending("up"), bound=t.bounds_of[0][0])
            out["long_sent"] = "no error"
        except FrameError as e:
            out["long_sent"] = str(e)
        t.p2p.timeout = 2.0  # the server stops listening at the bad length: chunk 1 may not complete
        pending = Pending("up")
        try:
            if t.p2p.one_message:  # a peer that lies: a short message announcing more than the bound
                head = torch.tensor([t.bounds_of[0][0] + 1], dtype=torch.int64).view(torch.uint8)
                dist.send(torch.cat([head, torch.zeros(16, dtype=torch.uint8)]), 0, tag=0)
            else:  # the length message comes first and is checked before the bytes are received
                t.p2p.send_chunk(0, 0, long, "up", pending)
            t.p2p.send_chunk(0, 1, _good(1, 10), "up", pending)
            t.p2p.finish(pending, 10)
        except TransportError:
            pass
    else:
        try:
            t.step(10, None, owner)
            out["long_chunk"] = "no error"
        except FrameError as e:
            out["long_chunk"] = str(e)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("one_message", [True, False], ids=["one-message", "length-then-bytes"])
def test_chunked_bundles_reject_frames_in_the_wrong_chunk(one_message):
    res = run_ranks(_chunked_badpeer, 2, one_message)
    assert "key 1, which this peer may not send here" in res[0]["wrong_chunk"], res[0]
    assert "announced chunk 0 of" in res[0]["long_chunk"], res[0]
    assert "chunk 0 for peer 0 has" in res[1]["long_sent"] and "at most" in res[1]["long_sent"], res[1]
    assert res[1]["good"] is True
