"""QTensor: the one representation every quantizer returns and every codec frames.

A quantized tensor is integer *codes* (uint8, one per element, value in [0, 2^bits)) that index a
small table of *levels* (grid points in units of the scale), and one positive *scale* per tensor
(shape ``()``) or per row (shape ``(rows,)``, rows = ``shape[0]``)::

    x̂ = levels[codes] · scale

Grids (``grid`` field), with k = 2^(bits-1) - 1:

- ``"sym"``: {-k, …, -1, 0, 1, …, k} / k       (code c  ->  (c - k) / k)   linear m-bit, ternary (bits=2,
  k=1), clipped stochastic gradients, QSGD, TernGrad.
- ``"log"``: {0, ±1, ±1/2, …, ±1/2^(k-1)}        (code 0 -> 0, 1..k -> +2^-(c-1), k+1..2k -> -2^-(c-k-1))
- ``"bin"``: {-1, +1}                             (code 0 -> -1, code 1 -> +1), bits = 1.

Only these three grids exist, so a decoder rebuilds the table from (grid, bits) alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from lowbit.errors import ConfigError

GRIDS = ("sym", "log", "bin")


def grid_k(bits: int) -> int:
    """k = 2^(bits-1) - 1, the largest integer level of an m-bit symmetric grid."""
    return (1 << (bits - 1)) - 1


def check_grid(grid: str, bits: int) -> None:
    if grid not in GRIDS:
        raise ConfigError(f"unknown grid {grid!r}; expected one of {GRIDS}")
    if grid == "bin":
        if bits != 1:
            raise ConfigError(f"grid 'bin' needs bits=1, got bits={bits}")
    elif not (isinstance(bits, int) and 2 <= bits <= 8):
        raise ConfigError(f"grid {grid!r} needs an integer bit width in 2..8, got {bits!r}")


@lru_cache(maxsize=64)
def _levels_cpu(grid: str, bits: int) -> torch.Tensor:
    check_grid(grid, bits)
    if grid == "bin":
        return torch.tensor([-1.0, 1.0])
    k = grid_k(bits)
    if grid == "sym":
        return torch.arange(-k, k + 1, dtype=torch.float32) / k
    pos = torch.tensor([2.0 ** -(i) for i in range(k)])  # 1, 1/2, ..., 1/2^(k-1)
    return torch.cat([torch.zeros(1), pos, -pos])


def levels(grid: str, bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The table of grid points (float32) for ``grid`` at ``bits``; index it with codes."""
    t = _levels_cpu(grid, bits)
    return t if device is None or torch.device(device) == t.device else t.to(device)


@dataclass
class QTensor:
    """Quantized tensor: ``codes`` (uint8, same shape as the original), ``scale`` (float32, ``()`` or
    ``(shape[0],)``), ``bits`` and ``grid`` (see module docstring)."""

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    grid: str

    def __post_init__(self) -> None:
        check_grid(self.grid, self.bits)
        if self.codes.dtype != torch.uint8:
            raise ConfigError(f"QTensor codes must be uint8, got {self.codes.dtype}")
        if self.scale.dim() not in (0, 1):
            raise ConfigError(f"QTensor scale must be 0-d or 1-d, got shape {tuple(self.scale.shape)}")
        if self.scale.dim() == 1 and (self.codes.dim() == 0 or self.scale.numel() != self.codes.shape[0]):
            raise ConfigError(
                f"per-row scale has {self.scale.numel()} entries but codes have shape {tuple(self.codes.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def per_row(self) -> bool:
        return self.scale.dim() == 1

    def signs(self) -> torch.Tensor:
        """The grid values b (float32, in units of the scale): ``levels[codes]``."""
        return levels(self.grid, self.bits, self.codes.device)[self.codes.long()]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x̂ = levels[codes] · scale (scale broadcast per row when per-row)."""
        b = self.signs()
        s = self.scale.to(b.device, torch.float32)
        if self.per_row:
            s = s.reshape((-1,) + (1,) * (b.dim() - 1))
        return (b * s).to(dtype)
