"""b-bit codes <-> bytes, vectorized with torch ops (no Python loop over elements).

Codes are uint8 values in [0, 2^b). They are packed little-endian within a byte: code j of a group
occupies bits [b·j, b·j + b) of the group's bit string, groups of ``8 // b`` codes per byte for
b ∈ {1, 2, 4, 8}; for other b (3, 5, 6, 7) groups of 8 codes fill exactly b bytes.
The packed size of n codes is exactly ceil(n·b / 8) bytes.
"""
from __future__ import annotations

import torch

from lowbit.errors import ConfigError

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_nbytes(numel: int, bits: int) -> int:
    """ceil(numel · bits / 8)."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ConfigError(f"pack bit width must be one of {SUPPORTED_BITS}, got {bits!r}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (any shape, values < 2^bits) into a 1-D uint8 tensor of
    ceil(n·bits/8) bytes. Values >= 2^bits are a caller bug and are masked, not checked (checking
    would cost a full pass; the quantizers never produce them)."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ConfigError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-n) % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        g = flat.view(-1, per)
        out = g[:, 0].clone()
        for j in range(1, per):  # at most 7 iterations over columns, vectorized over groups
            out |= g[:, j] << (bits * j)
        return out
    # b ∈ {3,5,6,7}: 8 codes -> b bytes through a 64-bit word per group.
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    g = flat.view(-1, 8).to(torch.int64)
    word = g[:, 0].clone()
    for j in range(1, 8):
        word |= g[:, j] << (bits * j)
    shifts = torch.arange(0, 8 * bits, 8, device=codes.device, dtype=torch.int64)
    out = ((word.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a 1-D uint8 tensor of ``numel`` codes."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ConfigError(f"packed buffer must be uint8, got {packed.dtype}")
    packed = packed.reshape(-1)
    need = packed_nbytes(numel, bits)
    if packed.numel() != need:
        raise ConfigError(f"{numel} codes of {bits} bits need {need} bytes, got {packed.numel()}")
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        out = (packed.unsqueeze(1) >> shifts) & mask
        return out.reshape(-1)[:numel]
    pad = (-packed.numel()) % bits
    if pad:
        packed = torch.cat([packed, packed.new_zeros(pad)])
    g = packed.view(-1, bits).to(torch.int64)
    word = g[:, 0].clone()
    for i in range(1, bits):
        word |= g[:, i] << (8 * i)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=torch.int64)
    out = ((word.unsqueeze(1) >> shifts) & mask).to(torch.uint8)
    return out.reshape(-1)[:numel]
