"""Helpers for tests and benchmarks: the process-wide settings a run may change, saved and restored.

:func:`process_settings` reads every setting a lowbit call or a benchmark may change for the whole
process (torch's thread count, the environment, the working directory, the codec and LAQ switches,
codec threads, the compiled loops' SIMD and streaming-store choices); :func:`restore_settings` puts
them back; :func:`kept_settings` is both around a block. The test suite checks after every test that
nothing changed (``tests/conftest.py``), so tests pass in any order and at any thread count.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import torch

__all__ = ["process_settings", "restore_settings", "kept_settings", "settings_diff"]


def process_settings() -> dict[str, Any]:
    """A snapshot of the process-wide settings (plain values, comparable with ``==``)."""
    from lowbit.codec import codecs, native
    from lowbit.quant import weights

    s: dict[str, Any] = {
        "torch.num_threads": torch.get_num_threads(),
        "torch.default_dtype": torch.get_default_dtype(),
        "torch.grad_enabled": torch.is_grad_enabled(),
        "torch.deterministic": torch.are_deterministic_algorithms_enabled(),
        "os.environ": dict(os.environ),
        "cwd": os.getcwd(),
        "sys.path": list(sys.path),
        "codec.native": native.native_codec_enabled(),
        "codec.threads": codecs.get_codec_threads(),
        "laq.native": weights._native_on,
    }
    if native.lib is not None:
        s["codec.simd"] = native.lib.simd(-1)
        s["codec.nt_stores"] = native.lib.nt_stores(-1)
    if weights._laq is not None:
        s["laq.simd"] = weights._laq.simd(-1)
    return s


def settings_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed between two snapshots, one line per setting (environment variables by name)."""
    out = []
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k), after.get(k)
        if a == b:
            continue
        if k == "os.environ":
            for v in sorted(set(a) | set(b)):
                if a.get(v) != b.get(v):
                    out.append(f"environment variable {v}: {a.get(v)!r} -> {b.get(v)!r}")
        elif k == "sys.path":
            added, removed = [p for p in b if p not in a], [p for p in a if p not in b]
            out.append(f"sys.path: added {added}, removed {removed}" if added or removed
                       else f"sys.path: reordered or duplicated: {a} -> {b}")
        else:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def restore_settings(s: dict[str, Any]) -> None:
    """Put back the settings of a :func:`process_settings` snapshot."""
    from lowbit.codec import codecs, native
    from lowbit.quant import weights

    if torch.get_num_threads() != s["torch.num_threads"]:
        torch.set_num_threads(s["torch.num_threads"])
    torch.set_default_dtype(s["torch.default_dtype"])
    torch.set_grad_enabled(s["torch.grad_enabled"])
    torch.use_deterministic_algorithms(s["torch.deterministic"])
    if dict(os.environ) != s["os.environ"]:
        os.environ.clear()
        os.environ.update(s["os.environ"])
    if os.getcwd() != s["cwd"]:
        os.chdir(s["cwd"])
    sys.path[:] = s["sys.path"]
    native._on = s["codec.native"]
    codecs.set_codec_threads(s["codec.threads"])
    weights._native_on = s["laq.native"]
    if "codec.simd" in s:
        native.lib.simd(1 if s["codec.simd"] else 0)
        native.lib.nt_stores(s["codec.nt_stores"])
    if "laq.simd" in s:
        weights._laq.simd(1 if s["laq.simd"] else 0)


@contextlib.contextmanager
def kept_settings() -> Iterator[dict[str, Any]]:
    """Run a block (a benchmark's ``main``, say) and restore every process-wide setting afterwards."""
    s = process_settings()
    try:
        yield s
    finally:
        restore_settings(s)
