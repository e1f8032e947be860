"""Error feedback as a codec wrapper: a memory composed with any gradient codec (the Memory /
Compressor split of GRACE; Seide et al. 2014, Karimireddy et al. 2019).

    codec = with_feedback(StochasticGradCodec(3), memory)    # memory: ErrorFeedback, one per sender
    frame = codec.encode(g, key=k, name="layer.0.weight")    # sends Q(g + e), keeps e <- g + e - deQ

The memory holds one residual per name and lives with the sender (a worker, a federated client, a
DDP rank). A passthrough codec (fp32/fp16 cast) and ``memory=None`` encode without feedback, so a
caller writes one line whether or not feedback is on.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.codec.codecs import RawCodec
from lowbit.codec.frame import Frame
from lowbit.quant.grads import ErrorFeedback

__all__ = ["FeedbackCodec", "with_feedback", "ErrorFeedback"]


@dataclass(frozen=True)
class FeedbackCodec:
    """``codec`` with error feedback through ``memory``. ``encode`` takes the residual's ``name``
    (default: the frame key); decoding and frame sizes are the wrapped codec's."""

    codec: object
    memory: ErrorFeedback | None

    @property
    def active(self) -> bool:
        return self.memory is not None and not isinstance(self.codec, RawCodec)

    @property
    def bits(self) -> int:
        return self.codec.bits

    def encode(self, x: torch.Tensor, *, key: int = 0, step: int = 0, generator=None, name=None) -> Frame | None:
        if not self.active:
            return self.codec.encode(x, key=key, step=step, generator=generator)
        name = key if name is None else name
        xc = self.memory.compensate(name, x)
        f = self.codec.encode(xc, key=key, step=step, generator=generator)
        if f is not None:  # a frame the non-finite policy dropped leaves the residual as it was
            self.memory.update(name, xc, self.codec.decode(f, xc.device))
        return f

    def decode(self, f: Frame, device=None) -> torch.Tensor:
        return self.codec.decode(f, device)

    def frame_nbytes(self, shape) -> int:
        return self.codec.frame_nbytes(shape)


def with_feedback(codec, memory: ErrorFeedback | None):
    """``codec`` with error feedback through ``memory`` (none when ``memory`` is None or the codec
    is a passthrough). A lossless wrapper (row-sparse, entropy-coded: ``codec.lossless``) keeps its
    place outside: the memory wraps the lossy codec inside it, whose frames decode cheaply."""
    if getattr(codec, "lossless", False):
        return replace(codec, inner=with_feedback(codec.inner, memory))
    return FeedbackCodec(codec, memory)
