"""GLUE TSV data: locate, read, tokenize, subset, shard.

GLUE SST-2 ships inside the package (``lowbit/data/glue/SST-2/{train,dev}.tsv.gz``); other GLUE tasks
are read from a folder holding ``glue/<TASK>/{train,dev}.tsv`` (or ``.tsv.gz``) given as ``data_dir``
(``lowbit train --data-dir``) or ``$LOWBIT_DATA``. Nothing is downloaded at run time.
"""
from __future__ import annotations

import csv
import gzip
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from lowbit.errors import ConfigError

if TYPE_CHECKING:
    from lowbit.train.config import Config

__all__ = ["find_data_dir", "packaged_data_dir", "resolve_task", "task_file", "check_task", "load_glue_tsv",
           "encode", "subset", "shard", "TASKS", "DATA_ENV", "batch_indices", "load_data", "load_dev", "batches"]

#: task -> (text column(s), label column); a second text column makes a sentence-pair task
TASKS = {
    "SST-2": (("sentence",), "label"),
    "CoLA": (("sentence",), "label"),
    "MRPC": (("#1 String", "#2 String"), "Quality"),
    "QNLI": (("question", "sentence"), "label"),
    "RTE": (("sentence1", "sentence2"), "label"),
}
DATA_ENV = "LOWBIT_DATA"
SPLITS = ("train", "dev")


def packaged_data_dir() -> Path:
    """The data folder inside the installed package (holds ``glue/SST-2``)."""
    return Path(__file__).resolve().parents[1] / "data"


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder GLUE tasks are read from: ``data_dir`` when given, else ``$LOWBIT_DATA``, else the
    packaged copy. A given folder must exist."""
    for given, what in ((data_dir, "data_dir"), (os.environ.get(DATA_ENV) or None, f"${DATA_ENV}")):
        if given:
            p = Path(given).expanduser()
            if not p.is_dir():
                raise ConfigError(f"{what} {str(p)!r} is not a folder (it should hold glue/<TASK>/train.tsv)")
            return p
    return packaged_data_dir()


def _glue_root(root: Path) -> Path:
    """``root/glue`` when it exists, else ``root`` itself (a folder of task folders)."""
    return root / "glue" if (root / "glue").is_dir() else root


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def resolve_task(task: str, data_dir: str | os.PathLike | None = None) -> str:
    """The task folder's name for ``task``, matched case- and dash-insensitively (``sst2``, ``sst-2``
    and ``SST-2`` are one task). An unknown task raises ConfigError listing the tasks found."""
    glue = _glue_root(find_data_dir(data_dir))
    present = sorted(p.name for p in glue.iterdir() if p.is_dir()) if glue.is_dir() else []
    for name in present:
        if _norm(name) == _norm(task):
            return name
    if data_dir or os.environ.get(DATA_ENV):
        raise ConfigError(f"unknown task {task!r}: tasks found in {str(glue)!r}: {present or 'none'}")
    raise ConfigError(f"unknown task {task!r}: the data packaged with lowbit holds {present or 'none'} "
                      f"(--data-dir or ${DATA_ENV} point at other GLUE tasks)")


def task_file(task: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The TSV (or .tsv.gz) file of one split of a task."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    name = resolve_task(task, data_dir)
    folder = _glue_root(find_data_dir(data_dir)) / name
    for cand in (folder / f"{split}.tsv", folder / f"{split}.tsv.gz"):
        if cand.is_file():
            return cand
    raise ConfigError(f"task {name}: no {split}.tsv or {split}.tsv.gz in {str(folder)!r}")


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _columns(task: str, header: list[str], path: Path) -> tuple[list[int], int]:
    text_cols, label_col = TASKS.get(task, (("sentence",), "label"))
    try:
        return [header.index(c) for c in text_cols], header.index(label_col)
    except ValueError:
        raise ConfigError(f"{path}:1: header {header} lacks one of {list(text_cols) + [label_col]}") from None


def check_task(task: str, data_dir: str | os.PathLike | None = None) -> str:
    """Validate a task before any process starts: it is found, both splits exist and their headers
    parse. Returns the task folder's name."""
    name = resolve_task(task, data_dir)
    for split in SPLITS:
        path = task_file(name, split, data_dir)
        try:
            with _open(path) as fh:
                line = fh.readline()
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise ConfigError(f"{path}: cannot be read: {e}") from None
        if not line.strip():
            raise ConfigError(f"{path} is empty")
        _columns(name, next(csv.reader(io.StringIO(line), delimiter="\t", quoting=csv.QUOTE_NONE)), path)
    return name


def load_glue_tsv(task: str, split: str, data_dir: str | os.PathLike | None = None
                  ) -> tuple[list, list[int]]:
    """Sentences (str, or (str, str) pairs for pair tasks) and integer labels of one GLUE split.
    A malformed file raises ConfigError naming the file and the line."""
    name = resolve_task(task, data_dir)
    path = task_file(name, split, data_dir)
    try:
        with _open(path) as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as e:
        raise ConfigError(f"{path}: cannot be read: {e}") from None
    if not rows:
        raise ConfigError(f"{path} is empty")
    header = rows[0]
    ti, li = _columns(name, header, path)
    sents, labels = [], []
    for n, r in enumerate(rows[1:], start=2):
        if len(r) <= max(ti + [li]):
            raise ConfigError(f"{path}:{n}: expected {len(header)} tab-separated fields, got {len(r)}")
        try:
            labels.append(int(r[li]))
        except ValueError:
            raise ConfigError(f"{path}:{n}: label {r[li]!r} is not an integer") from None
        sents.append(r[ti[0]].strip() if len(ti) == 1 else tuple(r[i].strip() for i in ti))
    return sents, labels


def encode(tokenizer, sentences: Sequence, labels: Sequence[int] | None = None, max_len: int = 64
           ) -> dict[str, torch.Tensor]:
    """Tokenize (pad/truncate to ``max_len``) into input_ids, attention_mask (token_type_ids when the
    tokenizer makes them) and ``labels`` (long) when given."""
    if sentences and isinstance(sentences[0], tuple):
        a, b = [s[0] for s in sentences], [s[1] for s in sentences]
        enc = tokenizer(a, b, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    else:
        enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=max_len,
                        return_tensors="pt")
    out = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if labels is not None:
        if len(labels) != len(sentences):
            raise ConfigError(f"{len(sentences)} sentences but {len(labels)} labels")
        out["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return out


def subset(n: int, seed: int, total: int) -> list[int]:
    """``n`` distinct indices of ``range(total)`` drawn with ``seed`` (all of them when n <= 0 or n >= total)."""
    if n <= 0 or n >= total:
        return list(range(total))
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:n].tolist()


def shard(dataset, rank: int, world: int):
    """Rank ``rank``'s strided shard (items rank, rank+world, ...) of a list or of a dict of tensors
    with a common first dimension: each worker reads only its own examples."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ConfigError(f"shard needs 0 <= rank < world, got rank={rank!r}, world={world!r}")
    if isinstance(dataset, dict):
        return {k: v[rank::world] for k, v in dataset.items()}
    return dataset[rank::world]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Positions step·B .. step·B+B-1 of an endless sequence of seeded epoch permutations of n."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = pos // n
    out = torch.empty_like(pos)
    for e in epochs.unique().tolist():  # at most two epochs per batch
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 9_973 + e))
        m = epochs == e
        out[m] = perm[pos[m] % n]
    return out


def load_data(cfg: Config, tokenizer, worker_index: int, n_workers: int, leader: bool):
    """Worker ``worker_index``'s shard of the (subset of the) training set, tokenized; the dev set too
    for the leader."""
    r = cfg.run
    sents, labels = load_glue_tsv(r.task, "train", r.data_dir or None)
    if r.train_subset:
        g = torch.Generator().manual_seed(r.seed)
        idx = torch.randperm(len(sents), generator=g)[: r.train_subset].tolist()
        sents, labels = [sents[i] for i in idx], [labels[i] for i in idx]
    sents, labels = sents[worker_index::n_workers], labels[worker_index::n_workers]
    train = encode(tokenizer, sents, labels, max_len=r.max_len)
    return train, (load_dev(cfg, tokenizer) if leader else None)


def load_dev(cfg: Config, tokenizer) -> dict[str, torch.Tensor]:
    r = cfg.run
    ds, dl = load_glue_tsv(r.task, "dev", r.data_dir or None)
    if r.eval_subset:
        ds, dl = ds[: r.eval_subset], dl[: r.eval_subset]
    return encode(tokenizer, ds, dl, max_len=r.max_len)


def batches(data: dict[str, torch.Tensor], bs: int):
    n = data["labels"].shape[0]
    for i in range(0, n, bs):
        yield {k: v[i:i + bs] for k, v in data.items()}
