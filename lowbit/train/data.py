"""GLUE TSV data: locate, read, tokenize, subset, shard.

Data lives in ``shared/data/glue/<TASK>/{train,dev}.tsv`` (header ``sentence<TAB>label`` for SST-2);
nothing is downloaded at run time.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import torch

from lowbit.errors import ConfigError

__all__ = ["find_data_dir", "load_glue_tsv", "encode", "subset", "shard", "TASKS"]

#: task -> (text column(s), label column); a second text column makes a sentence-pair task
TASKS = {
    "SST-2": (("sentence",), "label"),
    "CoLA": (("sentence",), "label"),
    "MRPC": (("#1 String", "#2 String"), "Quality"),
    "QNLI": (("question", "sentence"), "label"),
    "RTE": (("sentence1", "sentence2"), "label"),
}

_REPO_ROOT = Path(__file__).resolve().parents[2]


def find_data_dir() -> Path:
    """``$LOWBIT_DATA``, else ``<repo>/../shared/data``, else ``/work/shared/data``."""
    tried = []
    env = os.environ.get("LOWBIT_DATA")
    cands = ([Path(env)] if env else []) + [_REPO_ROOT.parent / "shared" / "data", Path("/work/shared/data")]
    for c in cands:
        tried.append(str(c))
        if c.is_dir():
            return c
    raise ConfigError(f"no data directory found; tried {tried} (set LOWBIT_DATA to the folder holding glue/)")


def load_glue_tsv(task: str, split: str, data_dir: str | os.PathLike | None = None
                  ) -> tuple[list, list[int]]:
    """Sentences (str, or (str, str) pairs for pair tasks) and integer labels of one GLUE split."""
    root = Path(data_dir) if data_dir is not None else find_data_dir()
    path = root / "glue" / task / f"{split}.tsv"
    if not path.is_file():
        have = sorted(p.name for p in (root / "glue").iterdir()) if (root / "glue").is_dir() else []
        raise ConfigError(f"GLUE file {str(path)!r} not found (tasks present: {have})")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ConfigError(f"{path} is empty")
    header = rows[0]
    text_cols, label_col = TASKS.get(task, (("sentence",), "label"))
    try:
        ti = [header.index(c) for c in text_cols]
        li = header.index(label_col)
    except ValueError as e:
        raise ConfigError(f"{path}: header {header} lacks one of {text_cols + (label_col,)}") from e
    sents, labels = [], []
    for n, r in enumerate(rows[1:], start=2):
        if len(r) <= max(ti + [li]):
            raise ConfigError(f"{path}:{n}: expected {len(header)} tab-separated fields, got {len(r)}")
        sents.append(r[ti[0]].strip() if len(ti) == 1 else tuple(r[i].strip() for i in ti))
        labels.append(int(r[li]))
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
