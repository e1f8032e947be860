"""The Ray actor transport on a local Ray cluster: a toy Owner (SGD on small tensors) against the
direct fp32 computation, m-bit error bounds, byte counts, a bad frame, a killed worker actor."""
import os
import sys

os.environ["RAY_AUTH_MODE"] = "disabled"

import pytest  # noqa: E402
import torch  # noqa: E402

ray = pytest.importorskip("ray")

from lowbit.codec.codecs import RawCodec, StochasticGradCodec  # noqa: E402
from lowbit.comm.ray import RayPS, key_partition, ray_session  # noqa: E402
from lowbit.testing import SGDOwner  # noqa: E402
from lowbit.errors import FrameError  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # toy classes travel by value

SHAPES = {0: (6, 5), 1: (7,), 2: (3, 4), 3: (10,)}
W = 2
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

    def set_bits(self, g_bits):
        self.codec = RawCodec(torch.float32, "grad") if g_bits == 32 else StochasticGradCodec(g_bits, clip=None)

    def evaluate(self):
        return self.w


class OwnerFactory:
    def __init__(self, keys):
        self.keys = keys

    def __call__(self):
        init = init_weights()
        return SGDOwner({k: init[k] for k in self.keys}, LR, strict_steps=True)


class WorkerFactory:
    def __init__(self, wid, g_bits):
        self.wid, self.g_bits = wid, g_bits

    def __call__(self):
        return ToyWorker(self.wid, self.g_bits)


def reference(w, start, steps):
    """The direct fp32 computation: steps start..start+steps-1 of averaged-gradient SGD from w."""
    w = {k: v.clone() for k, v in w.items()}
    for s in range(start, start + steps):
        gs = [{k: toy_grad(w[k], wid, s, k) for k in SHAPES} for wid in range(W)]
        w = {k: w[k] - LR * ((gs[0][k] + gs[1][k]) / W) for k in SHAPES}
    return w


@pytest.fixture(scope="module")
def ps():
    """One local cluster and one set of actors (2 servers, 2 workers) for the module: actor
    processes are the slow part. Each test starts from wherever the servers are."""
    with ray_session(num_cpus=2, temp_dir=os.path.join(REPO, ".ray_tmp")):
        own = key_partition(SHAPES, 2)
        owners = [OwnerFactory(sorted(k for k, s in own.items() if s == j)) for j in range(2)]
        ps = RayPS(owners, [WorkerFactory(w, 32) for w in range(W)], SHAPES, timeout_s=60, max_restarts=2)
        yield ps
        ps.shutdown()


def where(ps):
    """(current weights as workers hold them, current step) and the per-server byte counters."""
    stats = ps.server_stats()
    assert len({s["step"] for s in stats}) == 1
    return ray.get(ps.workers[0].evaluate.remote()), stats[0]["step"], stats


def set_bits(ps, bits):
    ray.get([w.call.remote("set_bits", bits) for w in ps.workers])


@pytest.mark.timeout(240)
def test_fp32_equals_direct_and_bytes(ps):
    set_bits(ps, 32)
    w0, s0, before = where(ps)
    steps = 4
    hist = ps.run_steps(range(s0, s0 + steps))
    got, s1, after = where(ps)
    assert s1 == s0 + steps
    ref = reference(w0, s0, steps)
    for k in SHAPES:
        assert torch.allclose(got[k], ref[k], atol=1e-6, rtol=0), k
    # bytes: every push / pull is exactly its frames (no prefix: Ray frames the call)
    raw = RawCodec()
    frame_bytes = sum(raw.frame_nbytes(s) for s in SHAPES.values())
    shard_bytes = {j: sum(raw.frame_nbytes(SHAPES[k]) for k, o in ps.key_server.items() if o == j)
                   for j in range(2)}
    for results in hist:
        assert [r["worker"] for r in results] == [0, 1]
        for r in results:
            assert r["up_sent"] == frame_bytes and r["down_recv"] == frame_bytes
    for b, a in zip(before, after):
        assert a["up_recv"] - b["up_recv"] == W * steps * shard_bytes[a["server"]]
        assert a["down_sent"] - b["down_sent"] == W * steps * shard_bytes[a["server"]]
    assert sum(shard_bytes.values()) == frame_bytes


@pytest.mark.timeout(240)
def test_3bit_within_codec_error(ps):
    set_bits(ps, 3)
    try:
        w0, s0, _ = where(ps)
        steps = 3
        hist = ps.run_steps(range(s0, s0 + steps))
        got, _, _ = where(ps)
    finally:
        set_bits(ps, 32)
    ref = reference(w0, s0, steps)
    # e_{s+1} = (1 − lr)·e_s − lr·q_s with |q_s| ≤ max_w scale/k, k = 3 for 3 bits (no clipping)
    bound = sum(LR * max(r["gmax"] for r in res) / 3 for res in hist)
    worst = max(float((got[k] - ref[k]).abs().max()) for k in SHAPES)
    assert 0 < worst <= bound + 1e-6
    up = hist[0][0]["up_sent"]
    assert up == sum(StochasticGradCodec(3, clip=None).frame_nbytes(s) for s in SHAPES.values())


@pytest.mark.timeout(240)
def test_bad_frame_is_a_frame_error_in_the_caller(ps):
    _, s0, _ = where(ps)
    srv = ps.servers[0]
    keys = sorted(k for k, o in ps.key_server.items() if o == 0)
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
    other = sorted(k for k, o in ps.key_server.items() if o == 1)[0]
    foreign = RawCodec().encode(torch.zeros(SHAPES[other]), key=other, step=s0).to_bytes()
    with pytest.raises(FrameError, match=rf"frame for key {other}, which this peer may not send here"):
        ray.get(srv.push.remote(s0, 0, foreign))
    ps.run_steps(range(s0, s0 + 1))  # and the servers still work


@pytest.mark.timeout(240)
def test_killed_worker_actor_is_replaced_and_run_finishes(ps):
    set_bits(ps, 32)
    w0, s0, _ = where(ps)
    steps = 4
    pid_before = ray.get(ps.workers[1].stats.remote())["pid"]

    def on_step(s, results):
        if s == s0 + 1:
            ray.kill(ps.workers[1], no_restart=False)

    hist = ps.run_steps(range(s0, s0 + steps), on_step=on_step)
    got, s1, _ = where(ps)
    st = ray.get(ps.workers[1].stats.remote())
    assert s1 == s0 + steps and [len(r) for r in hist] == [W] * steps
    assert st["pid"] != pid_before  # a new actor process
    assert hist[2][1]["fetched"] and not hist[2][0]["fetched"]  # it re-pulled the weights
    ref = reference(w0, s0, steps)
    for k in SHAPES:
        assert torch.allclose(got[k], ref[k], atol=1e-6, rtol=0), k
