"""A worker: low-bit weights in, a quantized gradient out.

The worker holds only the weights it received (dequantized for compute, never the fp32 master
weights nor any optimizer state), runs forward/backward at those quantized weights, and encodes
each gradient with its parameter's gradient codec (clipped stochastic m-bit by default, optional
error feedback)."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.codec.feedback import with_feedback
from lowbit.comm.transport import LazyFrames
from lowbit.quant.grads import ErrorFeedback, check_finite
from lowbit.train.plan import ParamSpec


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu", key: int = 0
                   ) -> torch.Generator:
    """The generator for stochastic rounding of one gradient (rank, step, key): a pure function of its
    arguments, so a resumed run draws exactly what the uninterrupted one drew, and the draws do not
    depend on the order the keys are encoded in (a transport reading :class:`LazyFrames` decides it)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank * 7_919 + step * 104_729 + key * 15_485_863) % (2**63 - 1))
    return g


class Worker:
    def __init__(self, model: nn.Module, plan: list[ParamSpec], rank: int, seed: int = 0,
                 error_feedback: bool = False, nonfinite: str = "error", device: torch.device | str = "cpu",
                 distiller=None):
        self.model = model.to(device)
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.device = torch.device(device)
        self.params = [p for _, p in model.named_parameters()]
        for p in self.params:
            p.requires_grad_(True)
            if p.data_ptr() % 64:
                # A model loaded from safetensors may keep its weights in the mapped file, at any
                # offset; the worker owns its weights (received weights are decoded into them in
                # place, with wide aligned writes), so it takes a private, aligned copy once.
                p.data = p.data.clone()
        self.ef = ErrorFeedback() if error_feedback else None
        self.nonfinite = nonfinite
        self.skipped = 0  # gradients dropped by the 'skip' non-finite policy
        self.up_whole = 1.0  # this step's upload as whole frames / as sent, once encoded (row-sparse and
        # entropy-coded frames are smaller)
        self.distiller = distiller  # (model, batch, positions) -> loss; None: the model's label loss

    def weight_buffers(self) -> dict[int, torch.Tensor]:
        """key -> the piece of the model's own parameter storage (detached views): pass as ``out=``
        to :meth:`Transport.step` and the received weights are decoded in place."""
        return {spec.key: spec.view(self.params[spec.param].detach()) for spec in self.plan}

    def load_weights(self, weights: dict[int, torch.Tensor]) -> None:
        """Overwrite the model's parameters with the dequantized low-bit weights received (pieces
        already decoded in place, into :meth:`weight_buffers`, are left as they are)."""
        with torch.no_grad():
            for k, w in weights.items():
                spec = self.plan[k]
                dst = spec.view(self.params[spec.param])
                if w.data_ptr() == dst.data_ptr() and w.numel() == dst.numel():
                    continue
                dst.copy_(w.reshape(spec.shape))

    def forward_backward(self, batch: dict[str, torch.Tensor], step: int, positions: torch.Tensor | None = None
                         ) -> float:
        """Gradients of this step's loss at the low-bit weights: the labels' cross-entropy, or the
        distiller's loss (``positions``: the examples' places in the training set, for cached logits)."""
        self.model.train()
        torch.manual_seed((self.seed * 31 + self.rank * 1_000_033 + step) % (2**63 - 1))  # dropout
        self.model.zero_grad(set_to_none=True)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        loss = self.model(**batch).loss if self.distiller is None else self.distiller(self.model, batch, positions)
        loss.backward()
        return float(loss.detach())

    def encode_gradients(self, step: int, lazy: bool = False) -> dict[int, bytes] | LazyFrames:
        """Clip, quantize and pack every gradient: key -> frame bytes. A gradient that the
        non-finite policy skips is left out (its owner averages over those that came).

        ``lazy``: screen every gradient for non-finite values now (so :attr:`skipped` is final) but
        return a :class:`LazyFrames` that encodes each key when the transport reads it: the
        parameter server then encodes key group i + 1 while group i is on the wire. Same frames
        either way (one generator per key, :func:`step_generator`)."""
        todo: dict[int, tuple[ParamSpec, torch.Tensor]] = {}
        for spec in self.plan:
            p = self.params[spec.param]
            g = spec.view(p.grad) if p.grad is not None else torch.zeros(spec.shape, device=p.device)
            g = check_finite(g, name=f"{spec.name} (step {step})", policy=self.nonfinite)
            if g is None:
                self.skipped += 1
                continue
            todo[spec.key] = (spec, g)

        sizes = [0, 0]  # this step's frames: as whole frames, as sent (row-sparse and coded are smaller)

        def encode(key: int) -> bytes | None:
            if key not in todo:
                return None  # skipped above
            spec, g = todo[key]
            gen = step_generator(self.seed, self.rank, step, self.device, key)
            f = with_feedback(spec.g_codec, self.ef).encode(g, key=spec.key, step=step, generator=gen, name=spec.name)
            b = f.to_bytes()
            sizes[0] += spec.g_codec.frame_nbytes(spec.shape)
            sizes[1] += len(b)
            self.up_whole = sizes[0] / sizes[1]
            return b

        self.up_whole = 1.0
        if lazy:
            return LazyFrames([spec.key for spec in self.plan], encode)
        return {k: encode(k) for k in todo}

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        self.model.eval()
        correct = total = 0
        loss = 0.0
        for b in batches:
            b = {k: v.to(self.device) for k, v in b.items()}
            out = self.model(**b)
            loss += float(out.loss) * b["labels"].numel()
            correct += int((out.logits.argmax(-1) == b["labels"]).sum())
            total += b["labels"].numel()
        return {"accuracy": correct / max(1, total), "eval_loss": loss / max(1, total), "n": total}
