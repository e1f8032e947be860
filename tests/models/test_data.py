"""lowbit.train.data: locate, read, encode, subset, shard."""
import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.train.data import encode, find_data_dir, load_glue_tsv, shard, subset


def test_sst2_dev_and_encode(tiny):
    assert (find_data_dir() / "glue" / "SST-2").is_dir()
    s, l = load_glue_tsv("SST-2", "dev")
    assert len(s) == len(l) == 872 and set(l) == {0, 1}
    enc = encode(tiny[1], s[:5], l[:5], max_len=20)
    assert enc["input_ids"].shape == (5, 20) and enc["labels"].tolist() == l[:5]
    with pytest.raises(ConfigError, match="not found"):
        load_glue_tsv("NOPE", "dev")


def test_env_override_and_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    assert find_data_dir() == tmp_path
    (tmp_path / "glue" / "T").mkdir(parents=True)
    (tmp_path / "glue" / "T" / "dev.tsv").write_text("sentence\tlabel\nhello\t1\nbye\t0\n")
    assert load_glue_tsv("T", "dev") == (["hello", "bye"], [1, 0])


def test_subset_and_shard_partition():
    idx = subset(10, seed=3, total=100)
    assert len(set(idx)) == 10 and idx == subset(10, seed=3, total=100)
    data = {"x": torch.arange(10)}
    parts = [shard(data, r, 3)["x"] for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    with pytest.raises(ConfigError):
        shard(data, 3, 3)
