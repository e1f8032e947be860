"""PS, ring and tree transports on real gloo groups: fp32 equivalence with dist.all_reduce, 3-bit
error bounds, dropped contributions, byte counts against the formulas (PS bundles in chunks: 6 for
one server with 6 keys, 3 each for two servers), weights decoded in place (``out=``)."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from lowbit.testing import SGDOwner, run_ranks
from lowbit.codec.codecs import RawCodec, StochasticGradCodec, WeightCodec
from lowbit.codec.frame import Frame
from lowbit.comm.collective import RingTransport, TreeTransport
from lowbit.comm.ps import ParameterServerTransport, expected_bytes as ps_expected_bytes
from lowbit.errors import ConfigError, FrameError, TransportError
from lowbit.quant.grads import clip_sigma

SHAPES = {0: (6, 5), 1: (7,), 2: (3, 4), 3: (10,), 4: (2, 2, 2), 5: (9, 3)}
LR = 0.1


def w0(k):
    return torch.randn(SHAPES[k], generator=torch.Generator().manual_seed(1000 + k))


def grad(rank, step, k):
    return torch.randn(SHAPES[k], generator=torch.Generator().manual_seed(10_000 * step + 100 * rank + k))


def sgd_owner(keys, wcodec):
    """fp32 shard with plain SGD; weight frames from ``wcodec``."""
    return SGDOwner({k: w0(k) for k in keys}, LR, wcodec)


def _make(kind, rank, world):
    if kind.endswith("L"):  # chunk messages as length, then bytes (NCCL's protocol), here on gloo
        t = _make(kind[:-1], rank, world)
        t.p2p.one_message = False
        return t
    if kind == "ps1":
        return ParameterServerTransport(SHAPES, 1, timeout=30)
    if kind == "ps2":
        return ParameterServerTransport(SHAPES, 2, timeout=30)
    if kind in ("ps1w", "ps2w"):  # weights on connections of their own (a second gloo group)
        t = ParameterServerTransport(SHAPES, int(kind[2]), timeout=30, weights_channel=True)
        assert t.p2p.down_group is not None and t.p2p._channel("down") is not t.p2p._channel("up")
        return t
    if kind == "ring":
        return RingTransport(SHAPES, timeout=30)
    return TreeTransport(SHAPES, timeout=30)


def _bcast_owner_truth(t, owner, decode):
    """Every rank learns each owner's dequantized weights (sum of one-hot contributions)."""
    out = {}
    for k in sorted(SHAPES):
        x = decode(owner, k) if owner is not None and k in owner.w else torch.zeros(SHAPES[k])
        dist.all_reduce(x)
        out[k] = x
    return out


def _one_config(rank, world, kind, mode, drop):
    """Two steps of one transport. Returns the max errors and byte mismatches seen on this rank."""
    t = _make(kind, rank, world)
    is_worker = not (kind.startswith("ps") and rank < t.n_servers)
    owns = t.owned_keys()
    gcodec = RawCodec(torch.float32) if mode == "raw" else StochasticGradCodec(3, clip=3.0)
    wcodec = RawCodec(torch.float32, "weight") if mode in ("raw", "3bit") else WeightCodec("laq-linear", 3)
    owner = sgd_owner(owns, wcodec) if owns else None
    ref = {k: w0(k) for k in SHAPES}
    out = {"max_err": 0.0, "max_bound_ratio": 0.0, "bytes_bad": [], "counts_bad": [], "down_exact_err": 0.0}
    gen = torch.Generator().manual_seed(rank)
    bound = {k: 0.0 for k in SHAPES}  # accumulated over steps
    for step in (1, 2):
        grads = None
        contrib = {k: is_worker and not (step == 1 and (rank, k) in drop) for k in SHAPES}
        if is_worker:
            grads = {k: (gcodec.encode(grad(rank, step, k), key=k, step=step, generator=gen).to_bytes()
                         if contrib[k] else None) for k in SHAPES}
        before = t.counter.snapshot()
        # step 2: computing ranks decode the weights in place, into buffers they own (out=)
        dest = {k: torch.full(SHAPES[k], float("nan")) for k in SHAPES} if step == 2 and grads is not None else None
        got = t.step(step, grads, owner, out=dest)
        delta = t.counter.delta(before)
        if dest is not None and not all(got[k].data_ptr() == dest[k].data_ptr() for k in SHAPES):
            out["counts_bad"].append((step, "weights not decoded into out="))
        # Reference: all_reduce of the (clipped) fp32 gradients of the contributing ranks.
        for k in SHAPES:
            g = grad(rank, step, k)
            if mode != "raw":
                g = clip_sigma(g, 3.0)
            s = torch.stack([g.abs().max() / 3.0]) if mode != "raw" else torch.zeros(1)  # s/k, k = 3 at 3 bits
            on = torch.tensor([1.0 if contrib[k] else 0.0])
            g = g if contrib[k] else torch.zeros_like(g)
            s = s * on
            dist.all_reduce(g)
            dist.all_reduce(on)
            dist.all_reduce(s)
            ref[k] = ref[k] - LR * g / on
            bound[k] += float(LR * s / on)
            if owner is not None and k in owner.w and owner.counts.get(k) != int(on):
                out["counts_bad"].append((step, k, owner.counts.get(k), int(on)))
        if owner is not None:
            for k in owner.w:
                err = float((owner.w[k] - ref[k]).abs().max())
                out["max_err"] = max(out["max_err"], err)
                if mode != "raw":
                    out["max_bound_ratio"] = max(out["max_bound_ratio"], (err - 1e-6) / max(bound[k], 1e-12))
        if mode == "laq":  # workers' weights are exactly what the owners quantized
            truth = _bcast_owner_truth(t, owner, lambda o, k: wcodec.decode(
                Frame.from_bytes(o.weight_frames(step)[k])))
            if got is not None:
                out["down_exact_err"] = max(out["down_exact_err"],
                                            max(float((got[k] - truth[k]).abs().max()) for k in SHAPES))
        elif got is not None:
            assert sorted(got) == sorted(SHAPES)
            for k in SHAPES:
                err = float((got[k] - ref[k]).abs().max())
                out["max_err"] = max(out["max_err"], err)
                if mode != "raw":
                    out["max_bound_ratio"] = max(out["max_bound_ratio"], (err - 1e-6) / max(bound[k], 1e-12))
        if not drop:
            gsz = {k: gcodec.frame_nbytes(SHAPES[k]) for k in SHAPES}
            wsz = {k: wcodec.frame_nbytes(SHAPES[k]) for k in SHAPES}
            if kind.startswith("ps"):
                exp = ps_expected_bytes(rank, world, t.n_servers, SHAPES, gsz, wsz)
            else:
                exp = t.expected_bytes(gsz, wsz)
            for name, v in exp.items():
                if delta[name] != v:
                    out["bytes_bad"].append((step, name, delta[name], v))
            out["up_sent"] = delta["up_sent"]
    return out


def _transports_body(rank, world, configs):
    return {cfg: _one_config(rank, world, *cfg[:2], drop=set(cfg[2])) for cfg in configs}


CONFIGS_4 = [(kind, mode, ()) for kind in ("ps1", "ps2", "ps2w", "ring", "tree") for mode in ("raw", "3bit", "laq")]
CONFIGS_4 += [("ps1w", "laq", ()), ("ps2L", "3bit", ()), ("ps2wL", "laq", ())]
# Dropped contributions at step 1 (a worker's nonfinite policy skipped these keys).
CONFIGS_4 += [("ps1", "raw", ((1, 0), (2, 0), (3, 5))), ("ps2", "raw", ((2, 1), (3, 4))),
              ("ps2w", "raw", ((2, 1), (3, 4))), ("ps2wL", "raw", ((2, 1), (3, 4))),
              ("ring", "raw", ((0, 2), (1, 2), (3, 0))), ("tree", "raw", ((2, 3),))]


@pytest.mark.timeout(120)
def test_four_ranks_ps_ring_tree_against_all_reduce():
    res = run_ranks(_transports_body, 4, CONFIGS_4)
    for rank, per in res.items():
        for cfg, out in per.items():
            kind, mode, drop = cfg
            assert out["bytes_bad"] == [], (rank, cfg, out["bytes_bad"])
            assert out["counts_bad"] == [], (rank, cfg, out["counts_bad"])
            if mode == "raw":
                assert out["max_err"] <= 1e-6, (rank, cfg, out["max_err"])
            elif mode == "3bit":
                # stochastic 3-bit: |ĝ − g_clipped| ≤ s/k per element and rank, averaged over ranks
                assert out["max_bound_ratio"] <= 1.0, (rank, cfg, out)
                assert out["max_err"] > 0  # the codec really quantized
            else:
                assert out["down_exact_err"] == 0.0, (rank, cfg, out)
    # Ring sends (p-1)/p of the payload, tree L/2 = 1 of it at p = 4 (8-byte prefixes aside).
    for rank in res:
        ring = res[rank][("ring", "raw", ())]["up_sent"]
        tree = res[rank][("tree", "raw", ())]["up_sent"]
        assert ring < tree


def _three_ranks_body(rank, world):
    out = {}
    try:
        TreeTransport(SHAPES)
    except ConfigError as e:
        out["tree_error"] = str(e)
    for cfg in [("ring", "raw", ()), ("ring", "3bit", ()), ("ps1", "raw", ((2, 1),))]:
        out[cfg] = _one_config(rank, world, *cfg[:2], drop=set(cfg[2]))
    # fetch_weights alone (PS, 1 server): workers get the server's initial weights.
    t = ParameterServerTransport(SHAPES, 1, timeout=30)
    got = t.fetch_weights(7, sgd_owner(t.owned_keys(), RawCodec(torch.float32, "weight")) if rank == 0 else None)
    out["fetch_ok"] = got is None if rank == 0 else all(torch.equal(got[k], w0(k)) for k in SHAPES)
    # A bad peer mid-ring: rank 2 corrupts its frame for rank 0; rank 0 must raise FrameError, the
    # others must fail fast with a TransportError/FrameError instead of hanging.
    t = RingTransport(SHAPES, timeout=5)
    owner = sgd_owner(t.owned_keys(), RawCodec(torch.float32, "weight"))
    grads = {k: bytearray(RawCodec().encode(grad(rank, 9, k), key=k, step=9).to_bytes()) for k in SHAPES}
    if rank == 2:
        for k in t.owned_keys(0):
            grads[k][-10] ^= 0xFF
    try:
        t.step(9, {k: bytes(v) for k, v in grads.items()}, owner)
        out["bad_ring"] = "no error"
    except (FrameError, TransportError) as e:
        out["bad_ring"] = f"{type(e).__name__}: {e}"
    return out


@pytest.mark.timeout(120)
def test_three_ranks_ring_ps_fetch_and_bad_ring_peer():
    res = run_ranks(_three_ranks_body, 3)
    for rank, out in res.items():
        assert "power-of-two" in out["tree_error"]
        for cfg in [("ring", "raw", ()), ("ring", "3bit", ()), ("ps1", "raw", ((2, 1),))]:
            o = out[cfg]
            assert o["bytes_bad"] == [] and o["counts_bad"] == [], (rank, cfg, o)
            if cfg[1] == "raw":
                assert o["max_err"] <= 1e-6, (rank, cfg, o)
            else:
                assert 0 < o["max_err"] and o["max_bound_ratio"] <= 1.0, (rank, cfg, o)
        assert out["fetch_ok"] is True
    assert res[0]["bad_ring"].startswith("FrameError") and "CRC32" in res[0]["bad_ring"] \
        and "peer 2" in res[0]["bad_ring"], res[0]["bad_ring"]
    for rank in (1, 2):
        assert res[rank]["bad_ring"] != "no error", res[rank]


def _lazy_body(rank, world):
    """Gradients given as LazyFrames (encoded when the transport reads them) against the same
    frames given eagerly: identical results; the PS reads them group by group (group 0 of every
    server, then group 1, ...); a gradient the encoder refuses fails the worker at once."""
    from lowbit.comm.transport import LazyFrames
    from lowbit.errors import NonFiniteGradientError
    import threading
    codec = StochasticGradCodec(3)
    where = {}  # key -> the thread that encoded it (last call)

    def enc(k):
        where[k] = threading.current_thread().name
        if (rank, k) == (2, 3):
            return None  # a gradient the worker's nonfinite policy skipped
        gen = torch.Generator().manual_seed(100 * rank + k)  # one generator per key: order-free
        return codec.encode(grad(rank, 1, k), key=k, step=1, generator=gen).to_bytes()

    out = {}
    for kind in ("ps2w", "ring"):
        res = []
        for lazy in (False, True):
            t = _make(kind, rank, world)
            is_worker = not (kind.startswith("ps") and rank < t.n_servers)
            owner = sgd_owner(t.owned_keys(), WeightCodec("laq-linear", 3)) if t.owned_keys() else None
            grads = (LazyFrames(SHAPES, enc) if lazy else {k: enc(k) for k in SHAPES}) if is_worker else None
            got = t.step(1, grads, owner)
            res.append((owner, got, grads))
        (o_e, got_e, _), (o_l, got_l, lazy_grads) = res
        same = True
        if o_e is not None:
            same &= all(torch.equal(o_e.w[k], o_l.w[k]) for k in o_e.w) and o_e.counts == o_l.counts
        if got_e is not None:
            same &= all(torch.equal(got_e[k], got_l[k]) for k in SHAPES)
        out[kind] = {"same": same}
        if lazy_grads is not None:
            out[kind]["encoded"] = list(lazy_grads.encoded)
            if kind == "ring":  # other ranks' keys: joined on the encoder thread during the previous round
                out[kind]["threads"] = sorted({where[k] for k in SHAPES if k not in t.owned_keys()})
            if kind.startswith("ps"):
                out[kind]["groups"] = {s: t.groups_of[s] for s in t.servers}
    # last (it leaves the group with timed-out receives): a refused gradient in group 1
    t = ParameterServerTransport(SHAPES, 2, timeout=3)

    def refuse(k):
        if k in t.groups_of[0][1]:
            raise NonFiniteGradientError(f"gradient[{k}] has NaN")
        return enc(k)

    t0 = __import__("time").monotonic()
    try:
        if rank < 2:
            t.step(2, None, sgd_owner(t.owned_keys(), RawCodec(torch.float32, "weight")))
            out["refused"] = "no error"
        else:
            t.step(2, LazyFrames(SHAPES, refuse), None)
            out["refused"] = "no error"
    except Exception as e:  # noqa: BLE001
        out["refused"] = f"{type(e).__name__}: {e}"
    out["refused_s"] = __import__("time").monotonic() - t0
    return out


@pytest.mark.timeout(120)
def test_lazy_gradient_frames_match_eager_and_stream_by_group():
    res = run_ranks(_lazy_body, 4)
    for rank, out in res.items():
        for kind in ("ps2w", "ring"):
            assert out[kind]["same"] is True, (rank, kind)
    for rank in (2, 3):  # PS workers: keys read group by group, each once
        o = res[rank]["ps2w"]
        groups = {int(s): g for s, g in o["groups"].items()}
        order = [k for i in range(max(map(len, groups.values()))) for s in sorted(groups)
                 if i < len(groups[s]) for k in groups[s][i]]
        assert o["encoded"] == order, (o["encoded"], order)
    for rank in range(4):
        assert sorted(res[rank]["ring"]["encoded"]) == sorted(SHAPES)
        assert [n.startswith("lowbit-encode") for n in res[rank]["ring"]["threads"]] == [True], res[rank]["ring"]
    for rank in (2, 3):  # the worker fails with the encoder's error, before any timeout
        assert res[rank]["refused"].startswith("NonFiniteGradientError"), res[rank]["refused"]
        assert res[rank]["refused_s"] < 3.0, res[rank]
    for rank in (0, 1):  # the servers with a TransportError naming the step (no hang)
        msg = res[rank]["refused"]
        assert msg.startswith("TransportError") and "step 2" in msg and "peer" in msg, msg


def _pool_body(rank, world):
    """Three steps with 3-bit gradients per transport: received bundles land in the same buffers
    from the second step on (and sent messages are laid out in the same buffers), and the weights every rank gets stay exactly what the owners hold."""
    codec = StochasticGradCodec(3)
    out = {}
    for kind in ("ps1", "ring", "tree"):
        t = ParameterServerTransport(SHAPES, 1, timeout=30, chunks=3) if kind == "ps1" else _make(kind, rank, world)
        computes = not (kind == "ps1" and rank == 0)
        owner = sgd_owner(t.owned_keys(), RawCodec(torch.float32, "weight")) if t.owned_keys() else None
        ptrs, sptrs, exact = [], [], True
        for step in (1, 2, 3):
            grads = None if not computes else {
                k: codec.encode(grad(rank, step, k), key=k, step=step, generator=torch.Generator().manual_seed(step)
                                ).to_bytes() for k in SHAPES}
            got = t.step(step, grads, owner)
            ptrs.append({key: buf.data_ptr() for key, buf in t.p2p.recv_pool.items()})
            sptrs.append({key: buf.data_ptr() for key, buf in t.p2p.send_pool.items()})
            truth = _bcast_owner_truth(t, owner, lambda o, k: o.w[k].clone())
            if got is not None:
                exact &= sorted(got) == sorted(SHAPES) and all(torch.equal(got[k], truth[k]) for k in SHAPES)
        out[kind] = {"ptrs": ptrs, "sptrs": sptrs, "exact": exact}
    # A bounded round checks what it sends before anything is posted (gloo would abort a receiver
    # whose buffer is too small): a bundle over its send_bound, or no send_bound at all.
    peer = 1 - rank
    for name, kw in (("over", {"max_recv": 100, "send_bound": 5}), ("missing", {"max_recv": 100})):
        try:
            t.p2p.exchange(99, {peer: b"x" * 10}, [peer], direction="up", **kw)
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the type is asserted by the test
            out[name] = f"{type(e).__name__}: {e}"
    return out


@pytest.mark.timeout(90)
def test_received_bundles_reuse_their_buffers_across_steps():
    res = run_ranks(_pool_body, 2)
    for rank in (0, 1):
        for kind in ("ps1", "ring", "tree"):
            ptrs = res[rank][kind]["ptrs"]
            if kind == "ps1":  # the server receives 3 gradient chunks, the worker 3 weight chunks
                assert len(ptrs[0]) == 3 and {key[0] for key in ptrs[0]} == {("up", "down")[rank]}, ptrs[0]
            else:  # one round each way at p = 2
                assert {key[0] for key in ptrs[0]} == {"up", "down"}, ptrs[0]
            assert ptrs[0] == ptrs[1] == ptrs[2], (rank, kind)
            sptrs = res[rank][kind]["sptrs"]  # and the messages sent are laid out in the same buffers
            if kind == "ps1":  # the worker sends 3 gradient chunks, the server 3 weight chunks
                assert len(sptrs[0]) == 3 and {key[0] for key in sptrs[0]} == {("down", "up")[rank]}, sptrs[0]
            else:
                assert {key[0] for key in sptrs[0]} == {"up", "down"}, sptrs[0]
            assert sptrs[0] == sptrs[1] == sptrs[2], (rank, kind)
            assert res[rank][kind]["exact"] is True, (rank, kind)
        assert res[rank]["over"].startswith("FrameError") and "a bundle for peer" in res[rank]["over"] \
            and "10 bytes; at most 5" in res[rank]["over"], res[rank]["over"]
        assert res[rank]["missing"].startswith("ValueError") and "send_bound" in res[rank]["missing"], res[rank]


def _timeline_body(rank, world):
    """Two steps of a 2-server PS with a StepTimeline (keep=1), then a fetch_weights: what each
    rank recorded, the chunk groups, and the clock before and after the last step."""
    from lowbit.comm.transport import StepTimeline
    codec = StochasticGradCodec(3)
    t = ParameterServerTransport(SHAPES, 2, timeout=30, chunks=2, weights_channel=True,
                                 timeline=StepTimeline(keep=1))
    owner = sgd_owner(t.owned_keys(), RawCodec(torch.float32, "weight")) if t.is_server else None
    import time
    for step in (1, 2):
        grads = None if t.is_server else {
            k: codec.encode(grad(rank, step, k), key=k, step=step, generator=torch.Generator().manual_seed(step)
                            ).to_bytes() for k in SHAPES}
        before = time.perf_counter()
        t.step(step, grads, owner)
        after = time.perf_counter()
    last = t.timeline.last()
    t.fetch_weights(3, owner)
    return {"last": last, "n_kept": len(t.timeline.steps), "fetched": t.timeline.last(), "before": before,
            "after": after, "groups": {s: [len(g) for g in gs] for s, gs in t.groups_of.items()}}


@pytest.mark.timeout(90)
def test_ps_step_timeline_records_every_chunk_in_order():
    res = run_ranks(_timeline_body, 4)
    groups = res[0]["groups"]
    for rank, out in res.items():
        last = out["last"]
        assert last["step"] == 2 and out["n_kept"] == 1
        assert out["before"] <= last["t0"] <= out["after"]
        ev = last["events"]
        assert [e[0] for e in ev] == sorted(e[0] for e in ev) and all(e[0] >= 0 for e in ev)
        assert ev[-1][1] == "end" and last["t0"] + ev[-1][0] <= out["after"]
        kinds = {e[1] for e in ev}
        if rank < 2:  # server: every worker's chunk i arrives before group i is averaged and posted
            assert kinds == {"grads_in", "group_averaged", "weights_posted", "end"}, kinds
            n = len(groups[rank])
            assert sorted((e[2], e[3]) for e in ev if e[1] == "grads_in") == [(w, i) for w in (2, 3) for i in range(n)]
            for i in range(n):
                t_in = max(e[0] for e in ev if e[1] == "grads_in" and e[3] == i)
                t_avg = next(e[0] for e in ev if e[1] == "group_averaged" and e[3] == i)
                t_post = next(e[0] for e in ev if e[1] == "weights_posted" and e[3] == i)
                assert t_in <= t_avg <= t_post
        else:  # worker: posted every group to both servers, got and decoded each server's weights
            assert kinds == {"grads_posted", "weights_in", "weights_decoded", "end"}, kinds
            want = sorted((s, i) for s in (0, 1) for i in range(len(groups[s])))
            for what in ("grads_posted", "weights_in", "weights_decoded"):
                assert sorted((e[2], e[3]) for e in ev if e[1] == what) == want, what
            for s, i in want:
                t_in = next(e[0] for e in ev if e[1] == "weights_in" and (e[2], e[3]) == (s, i))
                assert t_in <= next(e[0] for e in ev if e[1] == "weights_decoded" and (e[2], e[3]) == (s, i))
        # fetch_weights is a step of its own in the timeline (down half only)
        f = out["fetched"]
        assert f["step"] == 3 and f["t0"] > last["t0"]
        assert {e[1] for e in f["events"]} <= {"weights_in", "weights_decoded"}
        assert bool(f["events"]) == (rank >= 2)


def _one_to_many_body(rank, world):
    """P2P.send_chunk with a list of parts (bytes, a memoryview, a uint8 tensor) to a list of peers,
    in both chunk protocols: every peer gets exactly the joined bytes, the sender lays the message
    out once (one pooled buffer for both peers) and counts one message per peer."""
    from lowbit.comm.messages import Pending, message_bytes
    from lowbit.comm.p2p import P2P
    parts = [b"frame-one|", memoryview(b"frame-two|"), torch.arange(7, dtype=torch.uint8)]
    whole = b"frame-one|frame-two|" + bytes(range(7))
    out = {}
    for one_message in (True, False):
        p2p = P2P(timeout=20.0, one_message=one_message)
        if rank == 0:
            pending = Pending("down")
            for step in (0, 1):
                p2p.send_chunk([1, 2], 0, parts, "down", pending, bound=64, reuse=0)
                p2p.finish(pending, step)
            out[one_message] = {"sent": p2p.counter.snapshot()["sent"], "pool": sorted(map(str, p2p.send_pool))}
            try:
                p2p.send_chunk([1, 2], 0, parts, "down", Pending("down"), bound=len(whole) - 1)
                out[f"over_{one_message}"] = "no error"
            except FrameError as e:
                out[f"over_{one_message}"] = str(e)
        else:
            got = []
            for step in (0, 1):
                if one_message:
                    posted = p2p.post_chunks(0, [64], "down")
                    got.append(bytes(p2p.wait_chunk(0, 0, step, posted[0])))
                else:
                    (length,) = p2p.post_chunk_lengths(0, [0], "down")
                    body = p2p.post_chunk_body(0, 0, step, "down", length, 64)
                    got.append(bytes(p2p.wait_chunk_body(0, 0, step, body)))
            out[one_message] = got
        dist.barrier()
    out["expect"] = (whole, 2 * 2 * message_bytes(len(whole)))
    return out


@pytest.mark.timeout(90)
def test_one_chunk_laid_out_once_for_many_peers():
    res = run_ranks(_one_to_many_body, 3)
    whole, sent = res[0]["expect"]
    for one_message in (True, False):
        assert res[1][one_message] == res[2][one_message] == [whole, whole], one_message
        assert res[0][one_message]["sent"] == sent, res[0][one_message]
        over = res[0][f"over_{one_message}"]
        assert "chunk 0 for peer 1 has 27 bytes; at most 26" in over, over
    assert res[0][True]["pool"] == ["('down', (1, 2), 0)"], res[0][True]  # one message buffer, both peers


class _SlowGrads(dict):
    """A worker's gradient frames handed out with a pause before each key: the PS reads a group's
    keys only when it posts that group, so every chunk of this worker leaves ``pause`` s later than
    the one before; ``die_at`` = the key at which the process exits instead."""

    def __init__(self, frames, pause, die_at=None):
        super().__init__(frames)
        self.pause, self.die_at = pause, die_at

    def __getitem__(self, k):
        import os
        import time
        if k == self.die_at:
            os._exit(3)
        time.sleep(self.pause)
        return super().__getitem__(k)


def _window_body(rank, world):
    """One server (rank 0), two workers; worker 2's chunks leave 0.1 s apart, worker 1's at once.
    The same step with the default receive window (2) and with none: the server's arrival times of
    every (worker, chunk), and what the workers got."""
    from lowbit.comm.transport import StepTimeline
    codec = RawCodec(torch.float32)
    out = {}
    for window in (2, 0):
        t = ParameterServerTransport(SHAPES, 1, timeout=30, chunks=6, timeline=StepTimeline(keep=1),
                                     **({} if window == 2 else {"recv_window": 0}))
        assert t.recv_window == window and len(t.groups_of[0]) == 6
        owner = sgd_owner(t.owned_keys(), RawCodec(torch.float32, "weight")) if rank == 0 else None
        grads = None
        if rank > 0:
            grads = {k: codec.encode(grad(rank, 4, k), key=k, step=4).to_bytes() for k in SHAPES}
            if rank == 2:
                grads = _SlowGrads(grads, 0.1)
        got = t.step(4, grads, owner)
        ev = t.timeline.last()["events"]
        out[window] = {"arrived": {f"{e[2]},{e[3]}": e[0] for e in ev if e[1] == "grads_in"},
                       "w": None if got is None else {k: v.tolist() for k, v in got.items()}}
    return out


@pytest.mark.timeout(90)
def test_ps_receive_window_holds_a_fast_worker_to_the_slow_one():
    res = run_ranks(_window_body, 3)
    arr = {w: {tuple(map(int, k.split(","))): t for k, t in res[0][w]["arrived"].items()} for w in (2, 0)}
    # No window: the fast worker's whole upload is in before the slow one's first chunk.
    assert max(arr[0][(1, i)] for i in range(6)) < arr[0][(2, 0)], arr[0]
    # Window 2: the fast worker's chunk i comes only after the slow one's chunk i - 2 is in.
    assert all(arr[2][(1, i)] > arr[2][(2, i - 2)] for i in range(2, 6)), arr[2]
    assert arr[2][(1, 2)] > 0.1  # (worker 2's chunk 0 left after its first 0.1 s pause)
    for r in (1, 2):  # the same sums either way
        assert res[r][2]["w"] == res[r][0]["w"]


def _window_dies_body(rank, world):
    """Worker 2 exits after posting its first key group while the window holds worker 1's later
    chunks back: the server and worker 1 must fail with a TransportError, not hang."""
    codec = RawCodec(torch.float32)
    t = ParameterServerTransport(SHAPES, 1, timeout=5, chunks=6)
    owner = sgd_owner(t.owned_keys(), RawCodec(torch.float32, "weight")) if rank == 0 else None
    grads = None
    if rank > 0:
        grads = {k: codec.encode(grad(rank, 4, k), key=k, step=4).to_bytes() for k in SHAPES}
        if rank == 2:
            grads = _SlowGrads(grads, 0.05, die_at=t.groups_of[0][1][0])
    try:
        t.step(4, grads, owner)
    except TransportError as e:
        return {"error": str(e)}
    return {"error": None}


@pytest.mark.timeout(90)
def test_ps_receive_window_a_dead_worker_fails_the_step_not_hangs():
    res = run_ranks(_window_dies_body, 3, may_fail=frozenset({2}))
    assert res[2] == {"failed": "exit code 3"}
    assert res[0]["error"] and "peer 2" in res[0]["error"], res[0]
    assert res[1]["error"], res[1]
