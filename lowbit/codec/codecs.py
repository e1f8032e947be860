"""Codecs: values that turn a tensor into a :class:`Frame` and back.

    encode(tensor) -> Frame        decode(Frame) -> tensor        frame_nbytes(shape) -> int

A codec holds configuration only; randomness comes in through an explicit ``generator`` and
state (error feedback residuals) lives with the caller (:class:`lowbit.quant.grads.ErrorFeedback`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.codec.frame import Frame, frame_nbytes
from lowbit.codec.pack import pack_bits, unpack_bits
from lowbit.errors import ConfigError, FrameError
from lowbit.quant.grads import check_finite, qsgd, quantize_grad_stochastic, terngrad
from lowbit.quant.qtensor import QTensor
from lowbit.quant.weights import quantize_weight


def frame_from_qtensor(q: QTensor, *, kind: str, key: int = 0, step: int = 0,
                       dtype: torch.dtype = torch.float32) -> Frame:
    """Pack a QTensor's codes and carry its scales."""
    return Frame(kind=kind, encoding=q.grid, dtype=dtype, bits=q.bits, shape=tuple(q.shape),
                 scales=q.scale.reshape(-1).float(), payload=pack_bits(q.codes, q.bits),
                 key=key, step=step)


def qtensor_from_frame(f: Frame, device: torch.device | str | None = None) -> QTensor:
    if f.encoding == "raw":
        raise FrameError("raw frame holds no quantized codes")
    payload = f.payload if device is None else f.payload.to(device)
    codes = unpack_bits(payload, f.bits, math.prod(f.shape)).reshape(f.shape)
    # One scale is per tensor (a (1, n) tensor with one row decodes identically either way).
    scale = f.scales.reshape(()) if f.scales.numel() == 1 else f.scales
    if device is not None:
        scale = scale.to(device)
    if f.encoding == "sym":
        k = (1 << (f.bits - 1)) - 1
        if codes.numel() and int(codes.max()) > 2 * k:
            raise FrameError(f"code {int(codes.max())} outside the {f.bits}-bit symmetric grid (max {2 * k})")
    elif f.encoding == "log":
        k = (1 << (f.bits - 1)) - 1
        if codes.numel() and int(codes.max()) > 2 * k:
            raise FrameError(f"code {int(codes.max())} outside the {f.bits}-bit log grid (max {2 * k})")
    return QTensor(codes=codes, scale=scale, bits=f.bits, grid=f.encoding)


def decode_frame(f: Frame, device: torch.device | str | None = None) -> torch.Tensor:
    """Any frame back to a float tensor of its declared dtype."""
    if f.encoding == "raw":
        payload = f.payload if device is None else f.payload.to(device)
        return payload.view(f.dtype).reshape(f.shape).clone()
    return qtensor_from_frame(f, device).dequantize(f.dtype)


@dataclass(frozen=True)
class RawCodec:
    """Full precision passthrough (fp32), or a cast to fp16/bf16 (DDP's fp16 hook equivalent)."""

    dtype: torch.dtype = torch.float32
    kind: str = "grad"

    @property
    def bits(self) -> int:
        return 32 if self.dtype == torch.float32 else 16

    def encode(self, x: torch.Tensor, *, key: int = 0, step: int = 0, generator=None) -> Frame:
        y = x.detach()
        if self.dtype == torch.float16:
            y = y.float().clamp(-65504.0, 65504.0)
        y = y.to(self.dtype).contiguous().reshape(-1)
        return Frame(self.kind, "raw", self.dtype, self.bits, tuple(x.shape), torch.empty(0),
                     y.view(torch.uint8), key=key, step=step)

    def decode(self, f: Frame, device=None) -> torch.Tensor:
        return decode_frame(f, device).float()

    def frame_nbytes(self, shape: tuple[int, ...]) -> int:
        return frame_nbytes("raw", self.bits, tuple(shape), 0, self.dtype)


@dataclass(frozen=True)
class StochasticGradCodec:
    """Clipped stochastic m-bit gradient codec (LAQ paper §4): clip at c·σ, scale s = max|clip(g)|,
    unbiased stochastic rounding onto {-k..k}·s/k, k = 2^(m-1)-1, codes packed at m bits."""

    bits: int = 3
    clip: float | None = 3.0
    nonfinite: str = "error"  # error | skip | zero (see lowbit.quant.grads.check_finite)
    kind: str = "grad"

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise ConfigError(f"gradient bits must be in 2..8, got {self.bits!r}")
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"clip factor c must be > 0 (or None for no clipping), got {self.clip!r}")
        if self.nonfinite not in ("error", "skip", "zero"):
            raise ConfigError(f"nonfinite policy must be error|skip|zero, got {self.nonfinite!r}")

    def encode(self, x: torch.Tensor, *, key: int = 0, step: int = 0, generator=None) -> Frame | None:
        g = check_finite(x.detach(), name=f"gradient[{key}]", policy=self.nonfinite)
        if g is None:
            return None
        q = quantize_grad_stochastic(g, self.bits, clip=self.clip, generator=generator)
        return frame_from_qtensor(q, kind=self.kind, key=key, step=step)

    def decode(self, f: Frame, device=None) -> torch.Tensor:
        return decode_frame(f, device).float()

    def frame_nbytes(self, shape: tuple[int, ...]) -> int:
        return frame_nbytes("sym", self.bits, tuple(shape), 1)


@dataclass(frozen=True)
class QSGDCodec:
    """QSGD (Alistarh et al. 2017) with s = 2^(bits-1)-1 levels and the L2 norm as scale."""

    bits: int = 4
    kind: str = "grad"

    def encode(self, x, *, key=0, step=0, generator=None) -> Frame:
        q = qsgd(x.detach(), levels=(1 << (self.bits - 1)) - 1, generator=generator)
        return frame_from_qtensor(q, kind=self.kind, key=key, step=step)

    def decode(self, f: Frame, device=None) -> torch.Tensor:
        return decode_frame(f, device).float()

    def frame_nbytes(self, shape) -> int:
        return frame_nbytes("sym", self.bits, tuple(shape), 1)


@dataclass(frozen=True)
class TernGradCodec:
    """TernGrad (Wen et al. 2017): scale max|g|, Bernoulli ternary codes, 2 bits."""

    kind: str = "grad"
    bits: int = 2

    def encode(self, x, *, key=0, step=0, generator=None) -> Frame:
        return frame_from_qtensor(terngrad(x.detach(), generator=generator), kind=self.kind, key=key, step=step)

    def decode(self, f: Frame, device=None) -> torch.Tensor:
        return decode_frame(f, device).float()

    def frame_nbytes(self, shape) -> int:
        return frame_nbytes("sym", 2, tuple(shape), 1)


@dataclass(frozen=True)
class WeightCodec:
    """Weights down-link: quantize (loss-aware when ``d`` is given) and pack.

    scheme: binary | twn | lat | lat2 | laq-linear | laq-log; per_row gives one α per output row."""

    scheme: str = "laq-linear"
    bits: int = 2
    per_row: bool = False
    kind: str = "weight"

    def __post_init__(self) -> None:
        quantize_weight(torch.ones(2, 2), self.scheme, self.bits, per_row=self.per_row)  # validates

    @property
    def grid(self) -> str:
        if self.scheme == "binary":
            return "bin"
        return "log" if self.scheme == "laq-log" else "sym"

    def quantize(self, w: torch.Tensor, d: torch.Tensor | None = None) -> QTensor:
        per_row = self.per_row and w.dim() >= 2
        return quantize_weight(w.detach(), self.scheme, self.bits, d=d, per_row=per_row)

    def encode(self, x: torch.Tensor, *, key: int = 0, step: int = 0, generator=None,
               d: torch.Tensor | None = None) -> Frame:
        return frame_from_qtensor(self.quantize(x, d), kind=self.kind, key=key, step=step)

    def decode(self, f: Frame, device=None) -> torch.Tensor:
        return decode_frame(f, device).float()

    def frame_nbytes(self, shape) -> int:
        shape = tuple(shape)
        n_scales = shape[0] if (self.per_row and len(shape) >= 2) else 1
        return frame_nbytes(self.grid, self.bits, shape, n_scales)


def grad_codec(bits: int, clip: float | None = 3.0, nonfinite: str = "error"):
    """The gradient codec for ``--g-bits``: 32 -> fp32 passthrough, 16 -> fp16 cast, 2..8 -> clipped stochastic."""
    if bits == 32:
        return RawCodec(torch.float32, "grad")
    if bits == 16:
        return RawCodec(torch.float16, "grad")
    return StochasticGradCodec(bits, clip, nonfinite)


def weight_codec(bits: int, scheme: str = "laq-linear", per_row: bool = False):
    """The weight codec for ``--w-bits``: 32 -> fp32, 16 -> fp16, otherwise a quantized scheme.
    bits=2 with scheme laq-linear is ternary (LAT-equivalent grid)."""
    if bits == 32:
        return RawCodec(torch.float32, "weight")
    if bits == 16:
        return RawCodec(torch.float16, "weight")
    if bits == 1:
        scheme = "binary"
    return WeightCodec(scheme, bits, per_row)
