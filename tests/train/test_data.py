"""lowbit.train.data: the packaged SST-2, other GLUE folders, task names, malformed files, subset, shard."""
import gzip

import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.train.data import (check_task, encode, find_data_dir, load_glue_tsv, packaged_data_dir,
                               resolve_task, shard, subset, task_file)


@pytest.fixture(scope="module")
def tokenizer():
    from lowbit.models import load_preset
    return load_preset("tiny-bert")[1]


def test_sst2_ships_with_the_package_and_encodes(monkeypatch, tokenizer):
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    assert find_data_dir() == packaged_data_dir()
    assert task_file("SST-2", "train").name == "train.tsv.gz"
    s, l = load_glue_tsv("SST-2", "dev")
    assert len(s) == len(l) == 872 and set(l) == {0, 1}
    train_s, train_l = load_glue_tsv("SST-2", "train")
    assert len(train_s) == 67_349 and sum(train_l) == 37_569
    enc = encode(tokenizer, s[:5], l[:5], max_len=20)
    assert enc["input_ids"].shape == (5, 20) and enc["labels"].tolist() == l[:5]


@pytest.mark.parametrize("name", ["sst2", "sst-2", "SST-2", "Sst_2"])
def test_task_names_are_case_and_dash_insensitive(monkeypatch, name):
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    assert resolve_task(name) == "SST-2" == check_task(name)


def test_an_unknown_task_lists_the_tasks_found(monkeypatch):
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    with pytest.raises(ConfigError, match=r"unknown task 'NOPE'.*\['SST-2'\].*--data-dir"):
        load_glue_tsv("NOPE", "dev")


def _task(root, name, dev: str, gz: bool = False, train: str | None = None):
    d = root / "glue" / name
    d.mkdir(parents=True, exist_ok=True)
    for split, text in (("dev", dev), ("train", train if train is not None else dev)):
        if gz:
            with gzip.open(d / f"{split}.tsv.gz", "wt", encoding="utf-8") as fh:
                fh.write(text)
        else:
            (d / f"{split}.tsv").write_text(text)


@pytest.mark.parametrize("gz", [False, True])
def test_data_dir_and_env_point_at_other_folders(monkeypatch, tmp_path, gz):
    _task(tmp_path, "T", "sentence\tlabel\nhello\t1\nbye\t0\n", gz=gz)
    assert load_glue_tsv("t", "dev", tmp_path) == (["hello", "bye"], [1, 0])
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    assert find_data_dir() == tmp_path
    assert load_glue_tsv("T", "dev") == (["hello", "bye"], [1, 0])
    assert find_data_dir(tmp_path / "glue") == tmp_path / "glue"  # a folder of task folders works too
    assert load_glue_tsv("T", "dev", tmp_path / "glue")[1] == [1, 0]


def test_a_pair_task_reads_both_columns(tmp_path):
    _task(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta cat\tan animal\t1\n")
    assert load_glue_tsv("rte", "dev", tmp_path) == ([("a cat", "an animal")], [1])


@pytest.mark.parametrize("text, match", [
    ("sentence\tlabel\nhello\t1\nbye\n", r"dev\.tsv:3: expected 2 tab-separated fields, got 1"),
    ("sentence\tlabel\nhello\tyes\n", r"dev\.tsv:2: label 'yes' is not an integer"),
    ("text\tlabel\nhello\t1\n", r"dev\.tsv:1: header \['text', 'label'\] lacks"),
    ("", r"dev\.tsv is empty"),
])
def test_a_malformed_file_is_named_with_its_line(tmp_path, text, match):
    _task(tmp_path, "T", text, train="sentence\tlabel\nx\t0\n")
    with pytest.raises(ConfigError, match=match):
        load_glue_tsv("T", "dev", tmp_path)


def test_check_task_reads_only_the_headers(tmp_path):
    _task(tmp_path, "T", "sentence\tlabel\nok\t1\n", train="text\tlabel\nok\t1\n")
    with pytest.raises(ConfigError, match=r"train\.tsv:1: header"):
        check_task("T", tmp_path)
    (tmp_path / "glue" / "T" / "train.tsv").unlink()
    with pytest.raises(ConfigError, match=r"no train\.tsv or train\.tsv\.gz"):
        check_task("T", tmp_path)


def test_a_missing_data_dir_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        find_data_dir(tmp_path / "nope")


def test_subset_and_shard_partition():
    idx = subset(10, seed=3, total=100)
    assert len(set(idx)) == 10 and idx == subset(10, seed=3, total=100)
    data = {"x": torch.arange(10)}
    parts = [shard(data, r, 3)["x"] for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    with pytest.raises(ConfigError):
        shard(data, 3, 3)
