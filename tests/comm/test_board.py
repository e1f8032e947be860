"""The control-plane board (lowbit.comm.board) and the checkpoint barrier built on it, in one
process over a real c10d HashStore."""
import json

import pytest
import torch.distributed as dist

from lowbit.comm.board import Board
from lowbit.errors import TransportError
from lowbit.train.checkpoint import Checkpointer


def test_publish_gather_and_missing_ranks_are_named():
    store = dist.HashStore()
    a, b = Board(store, 0, timeout=0.2), Board(store, 1, timeout=0.2)
    a.publish("w", 3, [1.5, 0.0])
    b.publish("w", 3, [2.5, 1.0])
    assert a.gather("w", 3, [0, 1]) == {0: [1.5, 0.0], 1: [2.5, 1.0]}
    assert not store.check(["lowbit/ctl/w/3/0"])  # gathered values are deleted by default
    a.publish("w", 4)
    with pytest.raises(TransportError, match=r"ranks \[1\] did not report 'w' for step 4"):
        a.gather("w", 4, [0, 1])


class _StoreGoneAfterWait:
    """A store whose host died between the wait and the reads (rank 0 passed the barrier and died)."""

    def __init__(self):
        self.inner = dist.HashStore()

    def set(self, k, v):
        self.inner.set(k, v)

    def wait(self, keys, timeout):
        self.inner.wait(keys, timeout)

    def check(self, keys):
        return self.inner.check(keys)

    def get(self, k):
        raise dist.DistNetworkError("Connection reset by peer")


def test_store_lost_after_the_wait_is_a_transport_error():
    store = _StoreGoneAfterWait()
    Board(store, 1, 0.2).publish("ck", 3)
    with pytest.raises(TransportError, match="store was lost while reading 'ck' for step 3"):
        Board(store, 0, 0.2).gather("ck", 3, [1])


def _ckpt(tmp_path, store, rank, timeout):
    from lowbit.train.config import Config
    from lowbit.train.control import Control
    from lowbit.train.loop import _Checkpoints

    cfg = Config()
    cfg.run.out = str(tmp_path)
    return _Checkpoints(Checkpointer(tmp_path), Control(store, rank, 2, timeout), cfg, rank, 0, None, None, set())


def test_checkpoint_is_committed_by_any_rank_that_passed_the_barrier(tmp_path):
    """Rank 0 (a server, not the leader) commits too: should it die right after the barrier, the
    leader, still reading the marks from rank 0's store, could not commit."""
    store = dist.HashStore()
    Board(store, 1, 1.0).publish("checkpoint", 3, {"files": {}, "error": None})  # the other rank wrote its part
    _ckpt(tmp_path, store, 0, 1.0).write(3, leading=False, ranks=[0, 1])
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text())["step"] == 3
    assert Checkpointer(tmp_path).verify(3)["step"] == 3
    # a barrier that does not complete commits nothing: the previous checkpoint stays the latest
    _ckpt(tmp_path, store, 0, 0.2).write(6, leading=False, ranks=[0, 1])
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text())["step"] == 3


def test_a_rank_that_cannot_write_fails_every_rank_naming_it(tmp_path):
    from lowbit.train.loop import CheckpointError

    store = dist.HashStore()
    Board(store, 1, 1.0).publish("checkpoint", 3, {"files": {}, "error": "rank 1: [Errno 28] No space left on device"})
    with pytest.raises(CheckpointError, match=r"checkpoint of step 3 could not be written: rank 1: .*No space left"):
        _ckpt(tmp_path, store, 0, 1.0).write(3, leading=False, ranks=[0, 1])
    assert not (tmp_path / "ckpt" / "latest.json").exists()
