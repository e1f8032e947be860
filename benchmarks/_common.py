"""Shared bits of the benchmark scripts: result paths, table printing, JSON writing."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

# benchmarks/results in a source checkout; from an installed package, ./lowbit-results
_SOURCE_RESULTS = Path(__file__).resolve().parent / "results"
RESULTS = _SOURCE_RESULTS if _SOURCE_RESULTS.is_dir() else Path.cwd() / "lowbit-results"


def machine() -> dict:
    import os
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def print_table(rows: list[dict], cols: list[str], fmt: dict[str, str] | None = None) -> str:
    fmt = fmt or {}
    cells = [[(fmt.get(c, "{}").format(r[c]) if r.get(c) is not None else "-") for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(x.ljust(w) for x, w in zip(row, widths)) + " |" for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | Path, records: list[dict], meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **(meta or {}), "records": records}, indent=1))
    print(f"wrote {path}")
    return path
