"""Shared fixtures for every test directory."""
import importlib
import os
import subprocess
import sys

import pytest

from lowbit.testing import process_settings, restore_settings, settings_diff

# Settings that libraries fix once per process on first use, made here so that no test is blamed for
# them: lowbit's presets set HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE at import (nothing is fetched from
# a hub), torch's inductor records its cache folder in TORCHINDUCTOR_CACHE_DIR when first asked.
import lowbit.models.presets  # noqa: E402,F401
from torch._inductor.runtime.cache_dir_utils import cache_dir as _inductor_cache_dir  # noqa: E402

_inductor_cache_dir()

# Ray adds RAY_CLIENT_MODE and a sys.path entry when imported; flwr.simulation sets
# RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 when imported (Flower ships uv, which Ray would otherwise hook).
for _name in ("ray", "flwr.simulation"):
    try:
        importlib.import_module(_name)
    except ImportError:
        pass



@pytest.fixture
def bench():
    """``bench(name)`` imports ``benchmarks/<name>.py`` (installed as ``lowbit.benchmarks.<name>``)."""
    return lambda name: importlib.import_module(f"lowbit.benchmarks.{name}")


@pytest.fixture
def python_with_env():
    """``python_with_env(code, **env)``: run ``python -c code`` in a fresh interpreter with these
    environment variables added (settings read at import); returns the CompletedProcess (text)."""
    def run(code: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                              text=True, timeout=50)
    return run


@pytest.fixture(autouse=True)
def _process_settings_unchanged():
    """Every test leaves the process as it found it (threads, environment, cwd, sys.path, the codec and
    LAQ switches): the suite passes in any order and at any thread count. A test that changed one
    fails, naming it, and the setting is put back so the tests after it are unaffected."""
    before = process_settings()
    yield
    after = process_settings()
    before["os.environ"].pop("PYTEST_CURRENT_TEST", None)
    after["os.environ"].pop("PYTEST_CURRENT_TEST", None)
    if after != before:
        restore_settings(before)
        pytest.fail("the test changed process-wide settings: " + "; ".join(settings_diff(before, after)),
                    pytrace=False)
