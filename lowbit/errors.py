"""Specific exceptions (messages say what was expected and what came) and the exit statuses a command
maps them to: 0 done, 2 usage or configuration, 3 a rank or actor failed, 130 interrupted."""

import os
import sys


class LowbitError(Exception):
    """Base class of every lowbit error."""


class ConfigError(LowbitError, ValueError):
    """A configuration value is out of range or inconsistent (raised before any process starts)."""


class FrameError(LowbitError, ValueError):
    """A wire frame is truncated, corrupted, of the wrong version or does not match what was expected."""


class NonFiniteGradientError(LowbitError, FloatingPointError):
    """A gradient holds NaN or Inf and the policy is 'error'."""


class TransportError(LowbitError, RuntimeError):
    """A peer sent something the transport cannot accept, or did not answer in time."""


def guarded(fn, debug: bool = False) -> int:
    """Run a command: a lowbit error becomes one line on stderr and its exit status (2 usage or
    configuration, 3 a rank or actor failed, 130 stopped); ``debug`` (or LOWBIT_DEBUG=1) re-raises
    it with its traceback."""
    debug = debug or os.environ.get("LOWBIT_DEBUG", "").strip() not in ("", "0")
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except LowbitError as e:
        if debug:
            raise
        code = getattr(e, "exit_code", 2 if isinstance(e, ConfigError) else 3)
        label = "error: " if code == 2 else ""
        print(f"lowbit: {label}{' '.join(str(e).split())}", file=sys.stderr)
        return code


