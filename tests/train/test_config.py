import pytest

from lowbit.cli import main
from lowbit.train.args import config_from_args
from lowbit.errors import ConfigError
from lowbit.train.config import Config
from lowbit.train.launch import launch_local


@pytest.mark.parametrize("section,values,match", [
    ("transport", {"kind": "carrier-pigeon"}, "unknown transport 'carrier-pigeon'"),
    ("codec", {"w_bits": 9}, "w_bits must be one of"),
    ("codec", {"g_bits": 1}, "g_bits must be one of"),
    ("codec", {"g_bits": 0}, "g_bits must be one of"),
    ("codec", {"clip": 0.0}, "clip must be > 0"),
    ("codec", {"w_scheme": "twn", "w_bits": 4}, "ternary"),
    ("transport", {"kind": "tree", "workers": 3}, "power-of-two"),
    ("transport", {"kind": "ps", "servers": 0}, "servers must be >= 1"),
    ("optim", {"name": "lion"}, "optimizer must be adam|sgd"),
    ("run", {"steps": 0}, "steps must be >= 1"),
])
def test_bad_config_is_rejected_before_launch(section, values, match):
    cfg = Config().override(section, values)
    with pytest.raises(ConfigError, match=match):
        launch_local(cfg)  # validation happens before any process starts


def test_unknown_option_and_section():
    with pytest.raises(ConfigError, match="unknown option codec.wbits"):
        Config().override("codec", {"wbits": 2})
    with pytest.raises(ConfigError, match="unknown config section"):
        Config.from_dict({"network": {}})


def test_yaml_and_cli_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("codec:\n  w_bits: 4\n  g_bits: 8\ntransport:\n  kind: ps\n  servers: 2\n")
    import argparse

    from lowbit.train.args import add_train_args
    ap = argparse.ArgumentParser()
    add_train_args(ap)
    cfg = config_from_args(ap.parse_args(["--config", str(p), "--g-bits", "3", "--error-feedback"]))
    assert (cfg.codec.w_bits, cfg.codec.g_bits, cfg.transport.kind, cfg.transport.servers) == (4, 3, "ps", 2)
    assert cfg.codec.error_feedback is True


def test_cli_rejects_bad_bits_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--g-bits", "9", "--steps", "1"])
    assert e.value.code == 2
    assert "argument --g-bits: invalid choice: 9 (choose from 2, 3, 4, 5, 6, 7, 8, 16, 32)" in capsys.readouterr().err


def test_train_help_gives_every_flag_its_default_and_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    from lowbit.train.args import TRAIN_FLAGS, TRAIN_SWITCHES
    for flag in list(TRAIN_FLAGS) + list(TRAIN_SWITCHES):
        assert "--" + flag.replace("_", "-") in text
    assert text.count("[default:") == len(TRAIN_FLAGS) + len(TRAIN_SWITCHES) + 1  # and --debug
    assert "(choices: ps, ring, tree, ray) [default: ring]" in text
    assert "minilm (pretrained" in text and "[default: minilm]" in text


def test_cli_export_writes_a_packed_checkpoint_that_loads(tmp_path):
    import os

    import torch

    from lowbit.models import load_packed
    out = tmp_path / "tb.safetensors"
    assert main(["export", "--model", "tiny-bert", "--scheme", "ternarybert", "--out", str(out)]) == 0
    fp32_bytes = 4 * sum(p.numel() for p in load_packed(out).parameters())
    assert 0 < os.path.getsize(out) < fp32_bytes / 3
    m = load_packed(out).eval()
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([[101, 2023, 102]])).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_cli_bench_help_is_the_benchmarks_own(capsys):
    """`lowbit bench comm --help` shows the benchmark script's options (not the bench parser's),
    and `lowbit bench` alone says which benchmarks there are."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "comm", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--trace" in out and "--rates" in out
    assert main(["bench"]) == 2
    listing = capsys.readouterr().err
    from lowbit.benchmarks import BENCHMARKS
    assert all(f"  {name} " in listing for name in BENCHMARKS)
    assert main(["bench", "--help"]) == 0
    assert "lowbit bench" in capsys.readouterr().out
