"""Shared fixtures for every test directory."""
import importlib
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
