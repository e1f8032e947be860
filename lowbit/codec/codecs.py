"""Codecs: values that turn a tensor into a :class:`Frame` and back.

    encode(tensor) -> Frame        decode(Frame) -> tensor        frame_nbytes(shape) -> int

A codec holds configuration only; randomness comes in through an explicit ``generator`` and
state (error feedback residuals) lives in a memory the caller owns, composed with a codec by
:func:`lowbit.codec.feedback.with_feedback`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.codec.decode import decode_frame
from lowbit.codec.frame import Frame, frame_nbytes
from lowbit.codec.pack import pack_bits, pack_into, packed_nbytes
from lowbit.errors import ConfigError, NonFiniteGradientError
from lowbit.quant.grads import _clip_scale, check_finite, qsgd, stochastic_code_chunks, terngrad
from lowbit.quant.qtensor import QTensor, grid_k
from lowbit.quant.weights import laq_project, quantize_weight

def frame_from_qtensor(q: QTensor, *, kind: str, key: int = 0, step: int = 0,
                       dtype: torch.dtype = torch.float32) -> Frame:
    """Pack a QTensor's codes and carry its scales."""
    return Frame(kind=kind, encoding=q.grid, dtype=dtype, bits=q.bits, shape=tuple(q.shape),
                 scales=q.scale.reshape(-1).float(), payload=pack_bits(q.codes, q.bits),
                 key=key, step=step)

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
        """Same frame as ``frame_from_qtensor(quantize_grad_stochastic(g, ...))``, fused: the codes of
        each cache-sized chunk are packed straight into the payload (no full-size code tensor)."""
        g = x.detach()
        try:
            gf, s = _clip_scale(g, self.clip)
        except NonFiniteGradientError:  # the finite screen costs a pass: only run it when needed
            g = check_finite(g, name=f"gradient[{key}]", policy=self.nonfinite)
            if g is None:
                return None
            gf, s = _clip_scale(g, self.clip)
        bits, n = self.bits, gf.numel()
        payload = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=gf.device)
        if n:
            for a, c in stochastic_code_chunks(gf, grid_k(bits), s, generator):
                pack_into(c, bits, payload[a * bits // 8: ((a + c.numel()) * bits + 7) // 8])
        scale = torch.tensor([s], dtype=torch.float32)
        return Frame(kind=self.kind, encoding="sym", dtype=torch.float32, bits=bits, shape=tuple(x.shape),
                     scales=scale, payload=payload, key=key, step=step)

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

    scheme: binary | twn | lat | lat2 | laq-linear | laq-log; per_row gives one α per output row;
    hold (LAQ): keep the warm-start α while the new one is within this relative distance of it
    (:func:`lowbit.quant.weights.laq_project`)."""

    scheme: str = "laq-linear"
    bits: int = 2
    per_row: bool = False
    kind: str = "weight"
    hold: float = 0.0

    def __post_init__(self) -> None:
        quantize_weight(torch.ones(2, 2), self.scheme, self.bits, per_row=self.per_row)  # validates
        if isinstance(self.hold, bool) or not isinstance(self.hold, (int, float)) or not 0 <= self.hold < 1:
            raise ConfigError(f"scale hold must be a number in [0, 1), got {self.hold!r}")

    @property
    def grid(self) -> str:
        if self.scheme == "binary":
            return "bin"
        return "log" if self.scheme == "laq-log" else "sym"

    def quantize(self, w: torch.Tensor, d: torch.Tensor | None = None,
                 alpha: torch.Tensor | float | None = None) -> QTensor:
        """Quantize ``w``. ``alpha`` (LAQ schemes only; ignored by the others) warm-starts the
        alternating minimisation, e.g. with last step's scale: one phase of rounds instead of two."""
        per_row = self.per_row and w.dim() >= 2
        if alpha is not None and self.scheme in ("laq-linear", "laq-log"):
            return laq_project(w.detach(), d=d, bits=self.bits, scheme=self.scheme[4:], per_row=per_row,
                               alpha=alpha, hold=self.hold)
        return quantize_weight(w.detach(), self.scheme, self.bits, d=d, per_row=per_row)

    def encode(self, x: torch.Tensor, *, key: int = 0, step: int = 0, generator=None,
               d: torch.Tensor | None = None, alpha: torch.Tensor | float | None = None) -> Frame:
        """The weight frame of ``x`` (loss-aware with ``d``, warm-started from ``alpha``); its scales
        are the warm start of the next step's encode."""
        return frame_from_qtensor(self.quantize(x, d, alpha), kind=self.kind, key=key, step=step)

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


def weight_codec(bits: int, scheme: str = "laq-linear", per_row: bool = False, hold: float = 0.0):
    """The weight codec for ``--w-bits``: 32 -> fp32, 16 -> fp16, otherwise a quantized scheme.
    bits=2 with scheme laq-linear is ternary (LAT-equivalent grid)."""
    if bits == 32:
        return RawCodec(torch.float32, "weight")
    if bits == 16:
        return RawCodec(torch.float16, "weight")
    if bits == 1:
        scheme = "binary"
    return WeightCodec(scheme, bits, per_row, hold=hold)
