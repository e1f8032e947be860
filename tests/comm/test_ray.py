"""The Ray transport on a local Ray cluster, its ranks as actors (RayGroup): a toy Owner (SGD on small
tensors) against the direct fp32 computation, m-bit error bounds, byte counts, a bad frame, a killed
worker actor; delta-coded weights with a worker that lost its codes and one that was replaced."""
import json
import os
import sys

os.environ["RAY_AUTH_MODE"] = "disabled"

import pytest  # noqa: E402
import torch  # noqa: E402

ray = pytest.importorskip("ray")

from lowbit.codec.codecs import RawCodec, StochasticGradCodec, WeightCodec  # noqa: E402
from lowbit.codec.delta import DeltaEncoder  # noqa: E402
from lowbit.codec.frame import Frame  # noqa: E402
from lowbit.comm.ray import RayGroup, RayTransport, group, ray_session  # noqa: E402
from lowbit.comm.transport import partition  # noqa: E402
from lowbit.testing import SGDOwner  # noqa: E402
from lowbit.errors import FrameError  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # toy classes travel by value

SHAPES = {0: (6, 5), 1: (7,), 2: (3, 4), 3: (10,)}
W, S = 2, 2
LR = 0.1
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def init_weights():
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def targets(wid):
    g = torch.Generator().manual_seed(100 + wid)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def noise(wid, step, k):
    g = torch.Generator().manual_seed(1000 * wid + 10 * step + k)
    return 0.3 * torch.randn(SHAPES[k], generator=g)


def toy_grad(w, wid, step, k):
    """Gradient of ½||w − t_wid||² plus a deterministic per-(worker, step) perturbation."""
    return (w - targets(wid)[k]) + noise(wid, step, k)


class ToyWorker:
    def __init__(self, wid, g_bits):
        self.wid = wid
        self.codec = RawCodec(torch.float32, "grad") if g_bits == 32 else StochasticGradCodec(g_bits, clip=None)
        self.w = None

    def load_weights(self, weights):
        self.w = {k: v.clone() for k, v in weights.items()}

    def compute(self, step):
        gen = torch.Generator().manual_seed(7 * self.wid + 13 * step)
        frames, gmax = {}, 0.0
        for k in sorted(SHAPES):
            g = toy_grad(self.w[k], self.wid, step, k)
            gmax = max(gmax, float(g.abs().max()))
            frames[k] = self.codec.encode(g, key=k, step=step, generator=gen).to_bytes()
        return frames, {"gmax": gmax}

    def evaluate(self):
        return self.w


def reference(w, start, steps):
    """The direct fp32 computation: steps start..start+steps-1 of averaged-gradient SGD from w."""
    w = {k: v.clone() for k, v in w.items()}
    for s in range(start, start + steps):
        gs = [{k: toy_grad(w[k], wid, s, k) for k in SHAPES} for wid in range(W)]
        w = {k: w[k] - LR * ((gs[0][k] + gs[1][k]) / W) for k in SHAPES}
    return w


def toy_rank(rank, tag, g_bits, steps, die_at=None, hold=False):
    """One rank of a toy run. Servers own an SGDOwner of their keys and return their byte counts after
    the first fetch; workers compute toy gradients, put each step's numbers in the store under
    ``tag/res/<step>/<worker>`` and return their final weights. ``die_at``: worker 1 dies as that step
    begins (Ray restarts it, the replacement joins); ``hold``: workers wait for ``tag/go`` after the
    first fetch (having set ``tag/ready/<worker>``)."""
    g = group()
    t = RayTransport(SHAPES, n_servers=S, timeout=60)
    if rank < S:
        init = init_weights()
        owner = SGDOwner({k: init[k] for k in t.owned_keys()}, LR, strict_steps=True)
        t.fetch_weights(0, owner)
        base = t.counter.snapshot()
        for s in range(steps):
            t.step(s, None, owner)
        return t.counter.delta(base)
    wid = rank - S
    first = g.join_step() if g.replaced else 0
    worker = ToyWorker(wid, g_bits)
    worker.load_weights(t.fetch_weights(first, None))
    if hold:
        g.store.set(f"{tag}/ready/{wid}", "1")
        g.store.wait([f"{tag}/go"])
    for s in range(first, steps):
        if s == die_at and wid == 1 and not g.replaced:
            os._exit(17)
        before = t.counter.snapshot()
        frames, info = worker.compute(s)
        worker.load_weights(t.step(s, frames, None))
        res = {"worker": wid, "step": s, "fetched": g.replaced and s == first, "pid": os.getpid(), **info,
               **t.counter.delta(before)}
        g.store.set(f"{tag}/res/{s}/{wid}", json.dumps(res))
    return worker.w


@pytest.fixture(scope="module")
def ranks():
    """One local cluster and one set of rank actors (2 servers, 2 workers) for the module: actor
    processes are the slow part. Each test is a run of its own from step 0."""
    with ray_session(num_cpus=2, temp_dir=os.path.join(REPO, ".ray_tmp")):
        g = RayGroup(S + W, S, timeout_s=60, max_restarts=2)
        yield g
        g.shutdown()


def run(ranks, tag, g_bits, steps, **kw):
    """(worker 0's final weights, each step's worker results in worker order, the servers' byte counts)."""
    out = ranks.run(toy_rank, [(r, tag, g_bits, steps) + tuple(kw.values()) for r in range(S + W)])
    hist = [[json.loads(ranks.store.get(f"{tag}/res/{s}/{w}")) for w in range(W)] for s in range(steps)]
    return out[S], hist, [out[j] for j in range(S)]


@pytest.mark.timeout(240)
def test_fp32_equals_direct_and_bytes(ranks):
    steps = 4
    got, hist, servers = run(ranks, "fp32", 32, steps)
    ref = reference(init_weights(), 0, steps)
    for k in SHAPES:
        assert torch.allclose(got[k], ref[k], atol=1e-6, rtol=0), k
    # bytes: every push / pull is exactly its frames (no prefix: Ray frames the call)
    raw = RawCodec()
    frame_bytes = sum(raw.frame_nbytes(s) for s in SHAPES.values())
    own = partition(SHAPES, S)
    shard_bytes = {j: sum(raw.frame_nbytes(SHAPES[k]) for k, o in own.items() if o == j) for j in range(S)}
    for results in hist:
        assert [r["worker"] for r in results] == [0, 1]
        for r in results:
            assert r["up_sent"] == frame_bytes and r["down_recv"] == frame_bytes
    for j, c in enumerate(servers):
        assert c["up_recv"] == W * steps * shard_bytes[j]
        assert c["down_sent"] == W * steps * shard_bytes[j]
    assert sum(shard_bytes.values()) == frame_bytes
    assert [ray.get(a.stats.remote())["step"] for a in ranks.actors[:S]] == [steps] * S


@pytest.mark.timeout(240)
def test_3bit_within_codec_error(ranks):
    steps = 3
    got, hist, _ = run(ranks, "3bit", 3, steps)
    ref = reference(init_weights(), 0, steps)
    # e_{s+1} = (1 − lr)·e_s − lr·q_s with |q_s| ≤ max_w scale/k, k = 3 for 3 bits (no clipping)
    bound = sum(LR * max(r["gmax"] for r in res) / 3 for res in hist)
    worst = max(float((got[k] - ref[k]).abs().max()) for k in SHAPES)
    assert 0 < worst <= bound + 1e-6
    up = hist[0][0]["up_sent"]
    assert up == sum(StochasticGradCodec(3, clip=None).frame_nbytes(s) for s in SHAPES.values())


@pytest.mark.timeout(240)
def test_bad_frame_is_a_frame_error_in_the_caller(ranks):
    s0 = 0
    refs = ranks.start(toy_rank, [(r, "bad", 32, 1, None, True) for r in range(S + W)])
    ranks.store.wait([f"bad/ready/{w}" for w in range(W)])  # the servers are at step 0
    srv = ranks.actors[0]
    own = partition(SHAPES, S)
    keys = sorted(k for k, o in own.items() if o == 0)
    k = keys[0]
    with pytest.raises(FrameError, match=r"server 0: .*bad magic"):
        ray.get(srv.push.remote(s0, 1, b"\x00" * 64))
    wrong = RawCodec().encode(torch.zeros(tuple(reversed(SHAPES[k])) + (2,)), key=k, step=s0).to_bytes()
    with pytest.raises(FrameError, match=rf"server 0: bundle from peer 0 at step {s0}: frame for key {k} has shape"):
        ray.get(srv.push.remote(s0, 0, wrong))
    stale = RawCodec().encode(torch.zeros(SHAPES[k]), key=k, step=s0 + 7).to_bytes()
    with pytest.raises(FrameError, match=rf"carries step {s0 + 7}, expected {s0}"):
        ray.get(srv.push.remote(s0, 0, stale))
    assert ray.get(srv.stats.remote())["step"] == s0  # nothing was applied
    other = sorted(k for k, o in own.items() if o == 1)[0]
    foreign = RawCodec().encode(torch.zeros(SHAPES[other]), key=other, step=s0).to_bytes()
    with pytest.raises(FrameError, match=rf"frame for key {other}, which this peer may not send here"):
        ray.get(srv.push.remote(s0, 0, foreign))
    ranks.store.set("bad/go", "1")
    ranks.wait(refs)  # and the servers still work
    assert ray.get(srv.stats.remote())["step"] == s0 + 1


@pytest.mark.timeout(240)
def test_killed_worker_actor_is_replaced_and_run_finishes(ranks):
    steps = 4
    got, hist, _ = run(ranks, "kill", 32, steps, die_at=2)
    assert [len(r) for r in hist] == [W] * steps
    assert [ray.get(a.stats.remote())["step"] for a in ranks.actors[:S]] == [steps] * S
    assert hist[3][1]["pid"] != hist[0][1]["pid"]  # a new actor process
    assert hist[2][1]["fetched"] and not hist[2][0]["fetched"]  # it re-pulled the weights
    ref = reference(init_weights(), 0, steps)
    for k in SHAPES:
        assert torch.allclose(got[k], ref[k], atol=1e-6, rtol=0), k


DELTA_SHAPES = {0: (48, 64), 1: (32, 32), 2: (512,)}


class DeltaOwner(SGDOwner):
    """SGD on fp32 weights sent as 4-bit grid frames through a DeltaEncoder (key frames every 4 steps)."""

    def __init__(self, init, lr, delta):
        super().__init__(init, lr, codec=WeightCodec("laq-linear", bits=4))
        self.enc = DeltaEncoder(keyframe_every=4) if delta else None

    def weight_frames(self, step):
        frames = super().weight_frames(step)
        return frames if self.enc is None else {k: self.enc.encode(Frame.from_bytes(b)) for k, b in frames.items()}


def delta_rank(rank, tag, steps, delta, forget_at=None, die_at=None):
    """Toy SGD on DELTA_SHAPES with delta-coded (or whole) weight frames. ``forget_at``: worker 1 drops
    the codes it holds before that step (its next pull is a StateMismatch); ``die_at``: worker 1 dies
    as that step begins. Workers put their weights and byte counts per step under ``tag/res/...``."""
    g = group()
    t = RayTransport(DELTA_SHAPES, n_servers=S, timeout=60)
    gen = torch.Generator().manual_seed(0)
    init = {k: torch.randn(s, generator=gen) for k, s in DELTA_SHAPES.items()}
    if rank < S:
        owner = DeltaOwner({k: init[k] for k in t.owned_keys()}, 0.01, delta)
        t.fetch_weights(0, owner)
        for s in range(steps):
            t.step(s, None, owner)
        return None
    wid = rank - S
    first = g.join_step() if g.replaced else 0
    before = t.counter.snapshot()
    w = t.fetch_weights(first, None)
    fetched = t.counter.delta(before)["down_recv"]
    for s in range(first, steps):
        if s == die_at and wid == 1 and not g.replaced:
            os._exit(17)
        if s == forget_at and wid == 1:
            t.held.forget()
        gen = torch.Generator().manual_seed(100 * wid + s)
        frames = {k: RawCodec().encode(w[k] + torch.randn(w[k].shape, generator=gen), key=k, step=s).to_bytes()
                  for k in DELTA_SHAPES}
        before = t.counter.snapshot()
        w = {k: v.clone() for k, v in t.step(s, frames, None).items()}
        res = {"down": t.counter.delta(before)["down_recv"], "fetched": fetched if s == first else 0,
               "w": {k: v.tolist() for k, v in w.items()}}
        g.store.set(f"{tag}/res/{s}/{wid}", json.dumps(res))
    return None


def delta_run(ranks, tag, steps, delta, **kw):
    """Each step's results per worker (weights as tensors)."""
    ranks.run(delta_rank, [(r, tag, steps, delta, kw.get("forget_at"), kw.get("die_at")) for r in range(S + W)])
    hist = [[json.loads(ranks.store.get(f"{tag}/res/{s}/{w}")) for w in range(W)] for s in range(steps)]
    for res in hist:
        for r in res:
            r["w"] = {int(k): torch.tensor(v) for k, v in r["w"].items()}
    return hist


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in DELTA_SHAPES)


@pytest.mark.timeout(240)
def test_delta_weights_resync_a_mismatched_and_a_replaced_worker(ranks):
    """Deltas give the whole-frame run's weights with fewer bytes down; a worker that lost its codes
    (a StateMismatch) re-pulls that step as key frames, and a replaced worker joins with key frames,
    while the other worker keeps getting deltas: every run's weights are the whole-frame run's."""
    steps = 6
    whole = delta_run(ranks, "d-whole", steps, False)
    delta = delta_run(ranks, "d-delta", steps, True)
    forgot = delta_run(ranks, "d-forgot", steps, True, forget_at=2)
    died = delta_run(ranks, "d-died", steps, True, die_at=2)
    for run in (delta, forgot, died):
        for a, b in zip(whole, run):
            assert all(same_weights(x["w"], y["w"]) for x, y in zip(a, b))
    full = whole[0][0]["down"]
    for s in (0, 1, 2, 4, 5):  # the pull in step 3 brings the key frames of step 4 (keyframe_every=4)
        assert delta[s][0]["down"] < 0.8 * full and delta[s][1]["down"] == delta[s][0]["down"]
    # step 2's pull (the weights of step 3) fails on the forgetting worker: it gets the deltas, then key frames
    assert forgot[2][1]["down"] == forgot[2][0]["down"] + full
    assert [r[1]["down"] for r in forgot if r is not forgot[2]] == [r[0]["down"] for r in forgot if r is not forgot[2]]
    # the replacement fetches step 2 as key frames; its first step and the other worker's get deltas
    assert died[2][1]["fetched"] == full
    assert died[2][1]["down"] == died[2][0]["down"] == delta[2][0]["down"] < full
