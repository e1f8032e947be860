"""The parameter server's ``on_worker_failure="continue"`` mode on real gloo groups: a worker that
dies (before or after sending its gradients) or stops answering is dropped, the step completes
with the contributions that came, every server and live worker agrees on who is left, and the
weights equal plain SGD on the surviving workers' gradients."""
from __future__ import annotations

import os
import time

import pytest
import torch

from lowbit.testing import SGDOwner, run_ranks
from lowbit.codec.codecs import RawCodec
from lowbit.comm.ps import ParameterServerTransport
from lowbit.errors import ConfigError

SHAPES = {0: (6, 5), 1: (7,), 2: (3, 4), 3: (10,), 4: (9, 3)}
LR = 0.1
STEPS = (1, 2, 3)


def w0(k):
    return torch.randn(SHAPES[k], generator=torch.Generator().manual_seed(1000 + k))


def grad(rank, step, k):
    return torch.randn(SHAPES[k], generator=torch.Generator().manual_seed(10_000 * step + 100 * rank + k))


def _body(rank, world, n_servers, victim, at_step, how, timeout):
    t = ParameterServerTransport(SHAPES, n_servers, timeout=timeout, on_worker_failure="continue")
    owner = SGDOwner({k: w0(k) for k in t.owned_keys()}, LR) if t.is_server else None
    gcodec = RawCodec(torch.float32)
    t.fetch_weights(0, owner)
    live, got = [], None
    for step in STEPS:
        grads = None
        if not t.is_server:
            grads = {k: gcodec.encode(grad(rank, step, k), key=k, step=step).to_bytes() for k in SHAPES}
        if rank == victim and step == at_step:
            if how == "dies-before-sending":
                os._exit(3)
            if how == "dies-after-sending":
                t._push_grads(step, grads)
                os._exit(3)
            if how == "hangs":
                time.sleep(timeout + 4)  # the servers give up on it meanwhile
        got = t.step(step, grads, owner)
        live.append(t.live_workers)
    t.close()
    out = {"live": live}
    if owner is not None:
        out["w"] = {k: v.tolist() for k, v in owner.w.items()}
        out["counts"] = owner.count_history
        out["lost"] = {w: s for w, (s, _) in t.lost.items()}
    else:
        out["w"] = {k: v.tolist() for k, v in got.items()}
    return out


def _expected(workers, victim, at_step, grads_arrive_at_victim_step):
    w = {k: w0(k) for k in SHAPES}
    for step in STEPS:
        came = [r for r in workers if r != victim or step < at_step or
                (step == at_step and grads_arrive_at_victim_step)]
        for k in SHAPES:
            w[k] -= LR * torch.stack([grad(r, step, k) for r in came]).mean(0)
    return w


@pytest.mark.timeout(150)
@pytest.mark.parametrize("n_servers,world,victim,how", [
    (1, 4, 3, "dies-before-sending"),
    (2, 5, 2, "dies-before-sending"),   # the first worker (the leader in training) dies
    (2, 5, 4, "dies-after-sending"),    # its gradients count; the weights cannot reach it
    (1, 3, 2, "hangs"),                 # alive but silent past the timeout: dropped, then it fails itself
])
def test_servers_continue_without_a_lost_worker(n_servers, world, victim, how):
    at_step, timeout = 2, (4 if how == "hangs" else 30)
    res = run_ranks(_body, world, n_servers, victim, at_step, how, timeout, timeout=120,
                    may_fail=frozenset({victim}))
    workers = list(range(n_servers, world))
    survivors = [r for r in workers if r != victim]
    assert "failed" in res[victim]
    arrived = how == "dies-after-sending"
    ref = _expected(workers, victim, at_step, arrived)
    for s in range(n_servers):
        assert res[s]["lost"] == {victim: at_step} or (arrived and res[s]["lost"] == {victim: at_step + 1})
        # counts: every key averaged over all workers before the loss, over the survivors after
        first_without = at_step + (1 if arrived else 0)
        for step, counts in zip(STEPS, res[s]["counts"]):
            n = len(workers) if step < first_without else len(survivors)
            if arrived and step == at_step + 1 and res[s]["lost"] == {victim: at_step + 1}:
                n = len(survivors)
            assert set(counts.values()) == {n}, (step, counts)
        assert res[s]["live"][-1] == survivors
    for r in survivors:
        assert res[r]["live"][-1] == survivors
        assert res[r]["live"][0] == workers
        for k in SHAPES:
            torch.testing.assert_close(torch.tensor(res[r]["w"][k]), ref[k], rtol=0, atol=1e-5)
    for s in range(n_servers):
        for k, v in res[s]["w"].items():
            torch.testing.assert_close(torch.tensor(v), ref[k], rtol=0, atol=1e-5)


def test_unknown_failure_mode_is_a_config_error():
    from lowbit.train.config import TransportConfig
    with pytest.raises(ConfigError, match="on_worker_failure"):
        TransportConfig(kind="ps", on_worker_failure="maybe").validate()


def test_continue_is_refused_for_ring_and_tree():
    from lowbit.train.config import TransportConfig
    for kind in ("ring", "tree"):
        with pytest.raises(ConfigError, match="every rank owns a shard"):
            TransportConfig(kind=kind, workers=4, on_worker_failure="continue").validate()
