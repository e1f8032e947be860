"""torchrun launches: a worker killed mid-step is restarted by torchrun (--max-restarts) and the
group resumes from the last complete checkpoint, ending where an uninterrupted run ends."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lowbit.testing import free_port
from lowbit.train.checkpoint import Checkpointer

ARGS = ["--model", "tiny-bert", "--transport", "ring", "--w-bits", "2", "--g-bits", "3", "--steps", "4",
        "--batch-size", "4", "--max-len", "16", "--train-subset", "32", "--eval-subset", "16",
        "--dropout", "0", "--threads-per-rank", "1", "--checkpoint-every", "2", "--no-progress",
        "--timeout", "60"]


def torchrun(out, *extra, restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--max-restarts", str(restarts), "-m", "lowbit.train",
           *ARGS, "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)


def weights(out):
    return Checkpointer(out).weights(4)


@pytest.mark.timeout(600)
def test_torchrun_restart_resumes_and_matches(tmp_path):
    a = torchrun(tmp_path / "a")
    assert a.returncode == 0, a.stderr[-3000:]
    b = torchrun(tmp_path / "b", "--fault", "kill-worker:1@3", restarts=1)
    assert b.returncode == 0, b.stderr[-3000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["start_step"] == 2  # restarted from the step-2 checkpoint
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa and sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=0, rtol=0)
