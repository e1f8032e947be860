"""DDP communication hooks: existing DistributedDataParallel scripts get lowbit in two lines::

    from lowbit.comm.hooks import LowbitHookState, lowbit_hook
    model.register_comm_hook(LowbitHookState(bits=3, clip=3.0, error_feedback=True), lowbit_hook)

Per gradient bucket, on every rank (the pairing of a function with a ``State`` follows PyTorch's
own DDP comm hooks):

    e     = residual of this bucket (error feedback; zeros at first or after DDP rebuilt buckets)
    x     = bucket.buffer() + e
    frame = StochasticGradCodec(bits, clip).encode(x)       clipped stochastic m-bit, packed codes
    e     = x − decode(frame)                               (when error_feedback)
    all_gather the frame bytes (equal sizes on every rank: same bucket shape and bits)
    result = (1/p) Σ_ranks decode(frame_rank)   in fp32, cast to the bucket's dtype

Each received frame is validated (kind, key = bucket index, step = hook iteration, shape), so a
mismatched peer raises :class:`FrameError` instead of silently corrupting the model. Bytes per
bucket and rank: ``sent = F`` (the rank's frame, counted once as in a ring all-gather's input),
``recv = (p − 1)·F``, with ``F = frame_nbytes("sym", bits, (numel,), 1)``; kept in
``state.counter`` (``up_sent`` / ``up_recv``).

:func:`fp16_hook`, :func:`allreduce_hook`, :func:`powerSGD_hook` and :class:`PowerSGDState` are
PyTorch's own hooks, re-exported as the baselines the benchmarks compare against.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook as fp16_hook
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

from lowbit.codec.codecs import StochasticGradCodec
from lowbit.codec.decode import decode_frame
from lowbit.codec.feedback import ErrorFeedback, with_feedback
from lowbit.codec.frame import Frame
from lowbit.comm.messages import group_device
from lowbit.comm.transport import ByteCounter
from lowbit.errors import FrameError

__all__ = ["LowbitHookState", "lowbit_hook", "fp16_hook", "allreduce_hook", "powerSGD_hook", "PowerSGDState"]


@dataclass
class LowbitHookState:
    """State of :func:`lowbit_hook`: codec settings, the error-feedback memory (a residual per bucket index), the
    random generator of the stochastic rounding (seeded ``seed + rank``) and a byte counter."""

    process_group: object = None
    bits: int = 3
    clip: float | None = 3.0
    error_feedback: bool = True
    seed: int = 0
    counter: ByteCounter = field(default_factory=ByteCounter)
    memory: ErrorFeedback = field(default_factory=ErrorFeedback)  # residual per bucket index
    iteration: int = 0
    bucket_numel: dict[int, int] = field(default_factory=dict)  # elements per bucket index, as last seen

    def __post_init__(self) -> None:
        codec = StochasticGradCodec(self.bits, self.clip)  # validates bits / clip (ConfigError)
        self.codec = with_feedback(codec, self.memory if self.error_feedback else None)
        rank = dist.get_rank(self.process_group) if dist.is_initialized() else 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seed = int(self.seed) + rank

    def generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device).manual_seed(self._seed)
            self._generators[device] = g
        return g


def _encode_bucket(state: LowbitHookState, idx: int, step: int, buf: torch.Tensor) -> bytes:
    x = buf.detach().float()
    e = state.memory.residuals.get(idx)
    if e is not None and (e.shape != x.shape or e.device != x.device):
        del state.memory.residuals[idx]  # DDP rebuilt its buckets: this index is a new bucket
    return state.codec.encode(x, key=idx, step=step, generator=state.generator(x.device)).to_bytes()


def lowbit_hook(state: LowbitHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: compress the bucket with the clipped stochastic m-bit codec (with error
    feedback), all_gather the packed frames, decode each and return the fp32 average (in the
    bucket's dtype) as a future. See the module docstring."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    p = dist.get_world_size(group)
    buf = bucket.buffer()
    idx = bucket.index()
    state.bucket_numel[idx] = buf.numel()
    step = state.iteration
    if bucket.is_last():
        state.iteration += 1
    payload = _encode_bucket(state, idx, step, buf)
    dev = group_device(group)
    mine = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev)
    outs = [torch.empty_like(mine) for _ in range(p)]
    state.counter.up_sent += len(payload)
    state.counter.up_recv += (p - 1) * len(payload)
    state.counter.messages += 1
    work = dist.all_gather(outs, mine, group=group, async_op=True)
    shape, dtype, out_dev = tuple(buf.shape), buf.dtype, buf.device

    def _average(fut: torch.futures.Future) -> torch.Tensor:
        fut.wait()
        total = torch.zeros(shape, dtype=torch.float32, device=out_dev)
        for r, t in enumerate(outs):
            try:
                f = Frame.from_bytes(t, expect_kind="grad", expect_shape=shape, expect_key=idx)
                if f.step != step:
                    raise FrameError(f"frame carries step {f.step}, expected {step}")
                total += decode_frame(f, out_dev).float()
            except FrameError as e:
                raise FrameError(f"lowbit_hook: bucket {idx} from rank {r} at iteration {step}: {e}") from e
        return total.div_(p).to(dtype)

    return work.get_future().then(_average)

