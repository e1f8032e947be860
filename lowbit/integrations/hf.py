"""lowbit's gradient codec under ``transformers.Trainer`` (DDP under torchrun: gloo on CPU, NCCL on
GPU). Two changed lines in an existing Trainer script::

    from lowbit.integrations.hf import LowbitCallback
    trainer.add_callback(LowbitCallback(trainer, bits=3))

At the start of training the callback registers :func:`lowbit.comm.hooks.lowbit_hook` on the
model DDP wraps (``trainer.model_wrapped``): every gradient bucket goes out as clipped stochastic
``bits``-bit codes with error feedback, all-gathered, decoded and averaged in fp32. Nothing else in
the Trainer changes (optimizer, schedule, accumulation, logging, checkpoints). The bytes sent and
received are added to the Trainer's logs (``lowbit_MB_sent``, ``lowbit_MB_recv``) and kept in
:attr:`LowbitCallback.counter`. Outside DDP (one process) the callback does nothing and says so.
"""
from __future__ import annotations

import logging

from torch.nn.parallel import DistributedDataParallel

from lowbit.comm.hooks import LowbitHookState, lowbit_hook
from lowbit.errors import ConfigError

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - transformers is a dependency of lowbit
    raise ImportError("lowbit.integrations.hf needs transformers") from e

__all__ = ["LowbitCallback"]
log = logging.getLogger("lowbit.hf")


class LowbitCallback(TrainerCallback):
    """A ``TrainerCallback`` that puts lowbit's DDP comm hook under the Trainer's model.
    ``bits`` 2..8, ``clip`` the c of the c·σ clip (None: no clipping), ``error_feedback`` keeps
    each bucket's quantization residual, ``seed`` seeds the stochastic rounding (plus the rank)."""

    def __init__(self, trainer, bits: int = 3, clip: float | None = 3.0, error_feedback: bool = True,
                 seed: int = 0):
        if not hasattr(trainer, "model_wrapped"):
            raise ConfigError(f"LowbitCallback needs the transformers.Trainer it hooks, got {type(trainer).__name__}")
        if not (isinstance(bits, int) and 2 <= bits <= 8):
            raise ConfigError(f"bits must be an integer in 2..8, got {bits!r}")
        self.trainer = trainer
        self.settings = {"bits": bits, "clip": clip, "error_feedback": error_feedback, "seed": seed}
        self.state: LowbitHookState | None = None

    @property
    def counter(self):
        return None if self.state is None else self.state.counter

    def on_train_begin(self, args, state, control, **kwargs):
        ddp = self.trainer.model_wrapped
        if not isinstance(ddp, DistributedDataParallel):
            log.warning("lowbit: the Trainer's model is not wrapped in DistributedDataParallel "
                        "(one process?): gradients are not compressed")
            return
        hooked = getattr(ddp, "_lowbit_state", None)
        if hooked is None:  # a second train() on the same Trainer keeps the first hook
            hooked = LowbitHookState(**self.settings)
            ddp.register_comm_hook(hooked, lowbit_hook)
            ddp._lowbit_state = hooked
        self.state = hooked

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.state is not None and logs is not None:
            mb = {"lowbit_MB_sent": round(self.state.counter.up_sent / 1e6, 3),
                  "lowbit_MB_recv": round(self.state.counter.up_recv / 1e6, 3)}
            logs.update(mb)
            if state.log_history:  # the Trainer stored this entry before calling on_log
                state.log_history[-1].update(mb)
