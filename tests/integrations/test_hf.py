"""lowbit's gradient codec under transformers.Trainer: examples/hf_trainer.py on 2 gloo ranks
under torchrun, and the callback's checks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.codec.frame import frame_nbytes
from lowbit.errors import ConfigError
from lowbit.testing import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_trainer_under_torchrun_trains_and_counts_the_codec_bytes(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install 'lowbit[hf]')")
    out = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(ROOT / "examples" / "hf_trainer.py"), "--model", "tiny-bert",
           "--bits", "3", "--max-steps", "16", "--train-subset", "64", "--lr", "3e-3",
           "--output-dir", str(tmp_path / "run"), "--out", str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=220)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["world_size"] == 2 and s["steps"] == 16 and s["iterations"] == 16
    losses = s["losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses  # 8 passes over 64 examples
    # every trainable parameter went through the codec, and the counter is the frame formula
    numel = [int(n) for n in s["bucket_numel"].values()]
    assert sum(numel) == s["params"]
    per_iteration = sum(frame_nbytes("sym", 3, (n,), 1) for n in numel)
    assert s["bytes_sent"] == 16 * per_iteration
    assert s["bytes_recv"] == (2 - 1) * s["bytes_sent"]


def test_callback_checks_its_arguments():
    from lowbit.integrations.hf import LowbitCallback

    with pytest.raises(ConfigError, match="Trainer"):
        LowbitCallback(object())

    class FakeTrainer:
        model_wrapped = None

    with pytest.raises(ConfigError, match="bits"):
        LowbitCallback(FakeTrainer(), bits=1)
    cb = LowbitCallback(FakeTrainer(), bits=4)
    cb.on_train_begin(None, None, None)  # not DDP: leaves the model alone
    assert cb.state is None and cb.counter is None
