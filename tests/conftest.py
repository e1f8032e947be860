"""Shared fixtures for every test directory."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench():
    """``bench(name)`` imports ``benchmarks/<name>.py`` (the scripts import their siblings, so the
    folder is on sys.path while it loads)."""
    def load(name: str):
        sys.path.insert(0, str(BENCH))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(BENCH))
    return load


@pytest.fixture
def python_with_env():
    """``python_with_env(code, **env)``: run ``python -c code`` in a fresh interpreter with these
    environment variables added (settings read at import); returns the CompletedProcess (text)."""
    def run(code: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                              text=True, timeout=50)
    return run
