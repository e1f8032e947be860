"""lowbit's links inside Flower: the strategy wrapper and the client mod, alone and in Flower's
simulation engine (its Ray backend)."""
import math
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'lowbit[flower]')")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from lowbit.codec.frame import split_frames  # noqa: E402
from lowbit.errors import ConfigError  # noqa: E402
from lowbit.integrations.flower import KEY, CountBytes, LowbitStrategy, lowbit_mod  # noqa: E402
from lowbit.sim.federated import link_spec  # noqa: E402

import flower_apps  # noqa: E402  (the ClientApp and ServerApp the simulation runs)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside Flower's runtime need the process's task identity; put it back after."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class Grid:
    """The part of Flower's Grid a strategy's configure_* uses."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def _model_arrays(seed=0) -> ArrayRecord:
    return ArrayRecord(flower_apps.model(seed).state_dict())


def _reply_to(msg: Message, arrays: dict, n: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": n})})
    return Message(content, reply_to=msg)


def _context(node_id=7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})


def _client_round(messages, step_seed):
    """What lowbit_mod does around a ClientApp that moves every float array by a seeded step."""
    replies = []
    for m in messages:
        def train(msg, ctxt):
            sd = msg.content["arrays"].to_torch_state_dict()
            g = torch.Generator().manual_seed(step_seed + msg.metadata.dst_node_id)
            out = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
            return _reply_to(msg, out, n=10 + msg.metadata.dst_node_id)
        replies.append(lowbit_mod(m, _context(m.metadata.dst_node_id), train))
    return replies


def test_32_bit_links_aggregate_like_the_wrapped_strategy():
    """fp32 links change nothing but the packaging: the result equals plain FedAvg on the same
    client updates (to float rounding of w + (w_i − w))."""
    grid, arrays = Grid([1, 2, 3]), _model_arrays()
    plain = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3)
    wrapped = LowbitStrategy(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3),
                             up_bits=32, down_bits=32)
    ref, _ = plain.aggregate_train(1, [_plain_reply(m, 5) for m in plain.configure_train(1, arrays, ConfigRecord(), grid)])
    got, metrics = wrapped.aggregate_train(1, _client_round(wrapped.configure_train(1, arrays, ConfigRecord(), grid), 5))
    assert metrics is not None and set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(got[k].numpy(), ref[k].numpy(), rtol=0, atol=1e-6)


def _plain_reply(msg, step_seed):
    sd = msg.content["arrays"].to_torch_state_dict()
    g = torch.Generator().manual_seed(step_seed + msg.metadata.dst_node_id)
    return _reply_to(msg, {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()},
                     n=10 + msg.metadata.dst_node_id)


def test_frames_are_lowbit_frames_and_bytes_are_counted():
    grid, arrays = Grid([1, 2]), _model_arrays()
    s = LowbitStrategy(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2), up_bits=3, down_bits=2)
    msgs = list(s.configure_train(1, arrays, ConfigRecord(), grid))
    rec = msgs[0].content[KEY]
    names = list(rec["names"])
    specs = [link_spec(i, n, tuple(arrays[n].shape), up_bits=3, down_bits=2) for i, n in enumerate(names)]
    frames = list(split_frames(rec["frames"]))
    assert {f.kind for f in frames} == {"weight"} and [f.key for f in frames] == list(range(len(specs)))
    assert [f.bits for f in frames] == [2 if len(sp.shape) >= 2 else 32 for sp in specs]
    assert len(rec["frames"]) == sum(sp.down.frame_nbytes(sp.shape) for sp in specs)
    assert s.rounds[1].down == sum(sum(r.count_bytes() for r in m.content.values()) for m in msgs)
    assert "arrays" not in msgs[0].content  # the fp32 arrays do not travel
    replies = _client_round(msgs, 1)
    up = replies[0].content[KEY]["frames"]
    assert len(up) == sum(sp.up.frame_nbytes(sp.shape) for sp in specs)
    sent_up = sum(sum(r.count_bytes() for r in m.content.values()) for m in replies)
    out, _ = s.aggregate_train(1, replies)
    assert s.rounds[1].up == sent_up
    assert s.rounds[1].dropped == 0 and set(out) == set(arrays)
    # 2-bit down, 3-bit up: the new model moved towards the clients' average but is not fp32-exact
    moved = max(float(np.abs(out[k].numpy() - arrays[k].numpy()).max()) for k in arrays)
    assert 0 < moved < 1


def test_client_keeps_its_residual_and_decodes_what_it_trains_from():
    grid, arrays = Grid([4]), _model_arrays()
    s = LowbitStrategy(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1),
                       up_bits=2, down_bits=2, error_feedback=True)
    ctxt = _context(4)
    seen = {}

    def train(msg, c):
        sd = msg.content["arrays"].to_torch_state_dict()
        seen.update(sd)
        return _reply_to(msg, {k: v + 0.05 for k, v in sd.items()}, n=3)

    msg = list(s.configure_train(1, arrays, ConfigRecord(), grid))[0]
    frames = list(split_frames(msg.content[KEY]["frames"]))
    lowbit_mod(msg, ctxt, train)
    # the ClientApp got the decoded low-bit weights, in the model's names and shapes
    assert list(seen) == list(arrays)
    w = seen["0.weight"]
    assert w.shape == tuple(arrays["0.weight"].shape) and len(torch.unique(w)) <= 3  # ternary codes × α
    assert frames[0].bits == 2
    res = ctxt.state["lowbit.residual"]
    assert set(res) == {"0.weight", "2.weight"}  # the quantized (matrix) links; 1-D ones go fp32
    assert float(np.abs(res["0.weight"].numpy()).max()) > 0  # 2-bit codes of a constant 0.05 step lose something


def test_bad_settings_fail_at_construction():
    with pytest.raises(ConfigError, match="up_bits"):
        LowbitStrategy(FedAvg(), up_bits=1)
    with pytest.raises(ConfigError, match="clip"):
        LowbitStrategy(FedAvg(), clip=-1.0)
    with pytest.raises(ConfigError, match="Strategy"):
        CountBytes(object())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_simulation_trains_and_drops_a_corrupt_client():
    """Flower's simulation engine on Ray: 4 clients, 3 rounds; node 3's frames are corrupted on
    the way up. Its reply is dropped and counted every round, the others train the model."""
    from flwr.simulation import run_simulation

    from lowbit.comm.ray import ray_session

    strategy, result = flower_apps.server(rounds=3)
    # Ray's workers import flower_apps by name: give them this process's sys.path
    with ray_session(2, env_vars={"PYTHONPATH": os.pathsep.join(sys.path)}):
        run_simulation(result["app"], flower_apps.client_app, num_supernodes=4,
                       backend_config={"client_resources": {"num_cpus": 1}})
    assert sorted(strategy.rounds) == [1, 2, 3]
    for r in strategy.rounds.values():
        assert r.sent == 4 and r.replies == 4 and r.dropped == 1
        assert r.reasons[0].startswith("node ") and "crc" in r.reasons[0].lower(), r.reasons
    acc = result["accuracy"]
    assert acc[3] > acc[0] + 0.1, acc
    assert math.isfinite(result["loss"][3])
