"""lowbit's benchmarks, installed as ``lowbit.benchmarks`` and run by ``lowbit bench NAME``: each prints
a table and writes JSON (``--json``; by default under ``benchmarks/results/`` in a source checkout,
else ``./lowbit-results/``)."""
from __future__ import annotations

import importlib
import sys

# name -> (module, one line)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "codec": ("codec_throughput", "encode/decode GB/s of every codec against memcpy, one core"),
    "comm": ("comm_bandwidth", "PS / ring / tree vs fp32, fp16, PowerSGD over tc-shaped links (root, netns)"),
    "costmodel": ("comm_costmodel", "the alpha-beta cost model fitted to the comm measurements"),
    "loopback": ("comm_loopback", "one exchange per method on loopback, bytes and time"),
    "train": ("train_sst2", "SST-2 end to end: lowbit vs fp32 and PowerSGD data-parallel, accuracy per byte"),
    "glue": ("glue", "single-process TernaryBERT / Q8BERT fine-tuning on a GLUE task"),
    "federated": ("federated", "federated simulation: accuracy per round and bytes, quantized links vs fp32"),
    "flower": ("flower_sst2", "Flower FedAvg with and without lowbit's links, non-IID SST-2, bytes and accuracy"),
    "soak": ("soak", "a run crashed and resumed several times ends bit-identical to a fault-free one"),
    "faults": ("faults", "the fault table: kills, signals, damaged checkpoints, a full disk, a link down"),
}


def run_benchmark(name: str, argv: list[str]) -> int:
    """Run benchmark ``name`` with command-line arguments ``argv``; returns its exit status."""
    if name not in BENCHMARKS:
        raise SystemExit(f"lowbit bench: unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"lowbit.benchmarks.{BENCHMARKS[name][0]}")
    prog, sys.argv[0] = sys.argv[0], f"lowbit bench {name}"
    try:
        return int(module.main(argv) or 0)
    finally:
        sys.argv[0] = prog
