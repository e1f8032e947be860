"""b-bit codes <-> bytes, vectorized with torch ops (no Python loop over elements).

Codes are uint8 values in [0, 2^b). They are packed little-endian within a byte: code j of a group
occupies bits [b·j, b·j + b) of the group's bit string, groups of ``8 // b`` codes per byte for
b ∈ {1, 2, 4, 8}; for other b (3, 5, 6, 7) groups of 8 codes fill exactly b bytes.
The packed size of n codes is exactly ceil(n·b / 8) bytes.

Implementation: 8 codes viewed as one little-endian 64-bit word (code j in bits [8j, 8j+8)) are
squeezed to 8·b bits by three shift/or/mask steps (pairs, quads, octets), so every op runs over
n/8 words instead of over columns; unpacking runs the same steps backwards. Large inputs are
processed in cache-sized chunks so the temporaries never leave L2.
"""
from __future__ import annotations

import functools

import torch

from lowbit.codec import native
from lowbit.errors import ConfigError

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
CHUNK = 1 << 16  # codes per chunk (a multiple of 8): 64 KiB of codes, 8 Ki words


def packed_nbytes(numel: int, bits: int) -> int:
    """ceil(numel · bits / 8)."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ConfigError(f"pack bit width must be one of {SUPPORTED_BITS}, got {bits!r}")


def _rep(field: int, stride: int) -> int:
    """``field`` repeated every ``stride`` bits across 64 bits (stays below 2^63 for b <= 7)."""
    return sum(field << s for s in range(0, 64, stride))


# narrow word -> packed bytes: the low ``bits`` bytes of each int64 word (b = 1, 2, 4: one cast)
_NARROW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _squeeze_words(x: torch.Tensor, bits: int) -> torch.Tensor:
    """In place on int64 words holding 8 codes (code j at bit 8j): afterwards code j sits at bit b·j.

    Step with fields of width w spaced S apart: pairs merge into fields of 2w spaced 2S apart."""
    w = bits
    for s in (8, 16, 32):
        if 2 * w <= s:
            x.bitwise_or_(x >> (s - w)).bitwise_and_(_rep((1 << 2 * w) - 1, 2 * s))
        else:
            hi = (x >> (s - w)).bitwise_and_(_rep(((1 << w) - 1) << w, 2 * s))
            x.bitwise_and_(_rep((1 << w) - 1, 2 * s)).bitwise_or_(hi)
        w *= 2
    return x


def _spread_words(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_squeeze_words`, in place (bits above 8·b are ignored)."""
    for s in (32, 16, 8):
        w = bits * s // 8
        if 2 * w <= s:
            x.bitwise_or_(x << (s - w)).bitwise_and_(_rep((1 << w) - 1, s))
        else:
            hi = (x << (s - w)).bitwise_and_(_rep(((1 << w) - 1) << s, 2 * s))
            x.bitwise_and_(_rep((1 << w) - 1, 2 * s)).bitwise_or_(hi)
    return x


_WORD = {1: torch.int64, 2: torch.int32, 4: torch.int16}  # 8//b codes per byte: one byte per word
_SHIFTS = {1: (7, 14, 28), 2: (6, 12), 4: (4,)}


def pack_words_into(codes8: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack a contiguous uint8 chunk whose length is a multiple of 8 into ``out`` (uint8, exactly
    len·bits/8 bytes, contiguous). ``codes8`` is left untouched.

    b = 1, 2, 4: the 8/b codes of one output byte form one little-endian word; log2(8/b) shift-or
    steps gather them into its low byte (no masks needed: for b <= 4 nothing else lands there)
    and a narrowing cast keeps that byte."""
    word = _WORD.get(bits)
    if word is not None:
        x = codes8.view(word)
        for s in _SHIFTS[bits]:
            x = torch.bitwise_or(x, x >> s) if x.data_ptr() == codes8.data_ptr() else x.bitwise_or_(x >> s)
        out.copy_(x)  # wrap-around cast keeps the low byte
        return
    x = codes8.view(torch.int64).clone()
    _squeeze_words(x, bits)
    out.view(-1, bits).copy_(x.view(torch.uint8).view(-1, 8)[:, :bits])


def unpack_words_into(packed: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Inverse of :func:`pack_words_into`: ``packed`` holds a multiple of ``bits`` bytes, ``out`` is a
    contiguous uint8 tensor of 8·len/bits codes."""
    if bits == 1:
        x = packed.to(torch.int64)
    elif bits in (2, 4):
        x = packed.view(_NARROW[bits]).to(torch.int64).bitwise_and_((1 << 8 * bits) - 1)
    else:
        x = torch.zeros(packed.numel() // bits, dtype=torch.int64, device=packed.device)
        x.view(torch.uint8).view(-1, 8)[:, :bits].copy_(packed.view(-1, bits))
    _spread_words(x, bits)
    out.copy_(x.view(torch.uint8))


def _chunk(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else 1 << 62


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (any shape, values < 2^bits) into a 1-D uint8 tensor of
    ceil(n·bits/8) bytes. Values >= 2^bits are a caller bug, not checked (checking would cost a
    full pass; the quantizers never produce them): their bytes are unspecified."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ConfigError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=codes.device)
    pack_into(flat, bits, out)
    return out


def pack_into(flat: torch.Tensor, bits: int, out: torch.Tensor, step: int | None = None) -> None:
    """Pack the 1-D uint8 codes ``flat`` into ``out`` (ceil(n·bits/8) bytes; codes < 2^bits, see
    :func:`pack_bits`). For bits=8 this is a copy. On CPU the compiled loop
    (:mod:`lowbit.codec.native`) packs in one pass when it was built."""
    n = flat.numel()
    if bits == 8:
        out.copy_(flat)
        return
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if (native.native_codec_enabled() and flat.device.type == "cpu" and out.device.type == "cpu"
            and out.is_contiguous() and out.dtype == torch.uint8 and flat.dtype == torch.uint8):
        native.lib.pack(flat.data_ptr(), n, bits, out.data_ptr(), out.numel())  # one pass, same bytes
        return
    step = step or _chunk(flat.device)
    full = n - n % 8
    for a in range(0, full, step):
        e = min(a + step, full)
        pack_words_into(flat[a:e], bits, out[a * bits // 8: e * bits // 8])
    if full < n:  # tail: pad to one word of 8 codes
        tail = flat.new_zeros(8)
        tail[: n - full] = flat[full:]
        tmp = torch.empty(bits, dtype=torch.uint8, device=flat.device)
        pack_words_into(tail, bits, tmp)
        out[full * bits // 8:] = tmp[: out.numel() - full * bits // 8]


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
    out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    unpack_into(packed, bits, numel, out)
    return out


def unpack_into(packed: torch.Tensor, bits: int, numel: int, out: torch.Tensor, step: int | None = None) -> None:
    """Unpack ``numel`` codes from ``packed`` into the 1-D uint8 tensor ``out``."""
    if bits == 8:
        out.copy_(packed[:numel])
        return
    if not packed.is_contiguous():
        packed = packed.contiguous()
    step = step or _chunk(packed.device)
    full = numel - numel % 8
    for a in range(0, full, step):
        e = min(a + step, full)
        unpack_words_into(packed[a * bits // 8: e * bits // 8], bits, out[a:e])
    if full < numel:  # the last < 8 codes share their bytes with padding
        out[full:] = unpack_small(packed[full * bits // 8:], bits, numel - full)


@functools.lru_cache(maxsize=16)
def _bit_weights(bits: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.arange(8, dtype=torch.uint8, device=device),
            torch.tensor([1 << j for j in range(bits)], dtype=torch.uint8, device=device))


def unpack_small(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of ``packed`` as int64, in a handful of whole-tensor ops: every byte
    spread to its 8 bits, the bit stream cut into b-bit rows, each row weighted by powers of two
    and summed. For a few thousand codes or fewer this beats the word path (whose ~15 calls per
    chunk dominate there); it reads every bit as a byte, so not for large inputs."""
    if bits == 8:
        return packed[:n].to(torch.int64)
    shifts, weights = _bit_weights(bits, str(packed.device))
    stream = packed.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1).view(-1)
    return stream[: n * bits].view(n, bits).mul_(weights).sum(1)
