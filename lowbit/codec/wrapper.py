"""A gradient codec whose frames travel in a smaller, exact form (row-sparse, entropy-coded): the
receiver rebuilds the dense frame (:func:`lowbit.codec.codecs.dense_frame`) and sums it as any other."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LosslessWrapper:
    """``inner``'s frames, each sent in this wrapper's form when that is smaller. Error feedback wraps
    ``inner`` (:func:`lowbit.codec.feedback.with_feedback`): the lossy codec is inside."""

    inner: object
    lossless = True

    @property
    def bits(self) -> int:
        return self.inner.bits

    @property
    def kind(self) -> str:
        return self.inner.kind

    def frame_nbytes(self, shape) -> int:
        return self.inner.frame_nbytes(shape)
