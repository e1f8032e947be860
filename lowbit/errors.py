"""Specific exceptions. Messages say what was expected and what came."""


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
