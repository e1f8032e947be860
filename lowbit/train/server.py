"""The owner of a shard: fp32 weights, optimizer state, and loss-aware weight quantization.

After each averaged gradient arrives (``apply``) the shard takes an optimizer step in full
precision and re-quantizes its weights. With Adam the quantization is loss-aware (LAQ, Hou, Zhang &
Kwok, ICLR 2019): ŵ = argmin ||w − α·b||²_D with D = diag(√v̂) + ε, v̂ = Adam's bias-corrected second
moment of this very shard. With SGD, D = I. The quantized weights are kept as encoded frames, ready
to be sent to every worker.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.codec.codecs import WeightCodec
from lowbit.codec.delta import DeltaEncoder
from lowbit.errors import ConfigError
from lowbit.train.config import OptimConfig
from lowbit.train.plan import ParamSpec


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the peak learning rate, then linear decay to zero at ``total`` steps."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


class ShardServer:
    """Implements :class:`lowbit.comm.transport.Owner` for the keys in ``specs``."""

    def __init__(self, specs: list[ParamSpec], init: dict[int, torch.Tensor], optim: OptimConfig,
                 total_steps: int, device: torch.device | str = "cpu", delta: DeltaEncoder | None = None):
        self.specs = {s.key: s for s in specs}
        self.device = torch.device(device)
        self.params = {k: torch.nn.Parameter(init[k].detach().to(self.device, torch.float32).clone())
                       for k in self.specs}
        self.cfg = optim
        plist = [self.params[k] for k in sorted(self.params)]
        if not plist:
            self.opt = None
        elif optim.name == "adam":
            cls = torch.optim.AdamW if optim.weight_decay else torch.optim.Adam
            self.opt = cls(plist, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                           weight_decay=optim.weight_decay)
        else:
            self.opt = torch.optim.SGD(plist, lr=optim.lr, momentum=optim.momentum,
                                       weight_decay=optim.weight_decay)
        self.sched = (torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(optim.warmup_steps, total_steps))
                      if self.opt else None)
        self.step_done = 0  # number of optimizer steps applied
        self.frames: dict = {}  # key -> Frame of the current quantized weights
        self.warm: dict[int, torch.Tensor] = {}  # the LAQ warm starts behind the current frames (checkpointed)
        self.delta = delta  # sends only the codes that changed since the last frames sent (None: whole frames)
        self._quantize_all()

    # -- Owner protocol ---------------------------------------------------------------------------
    def owned_keys(self):
        return sorted(self.params)

    def apply(self, step: int, grads: dict[int, torch.Tensor], counts: dict[int, int]) -> None:
        self.apply_keys(step, grads, counts, list(self.params), last=True)

    def apply_keys(self, step: int, grads: dict[int, torch.Tensor], counts: dict[int, int], keys,
                   last: bool) -> None:
        """Part of step ``step``: the optimizer step and re-quantization of ``keys`` only (the
        parameter server pipelines a step by key groups). Adam and SGD update each parameter on its
        own, so the parts together equal one whole step; the lr schedule advances after the
        ``last`` part, so every part uses the step's learning rate."""
        if self.opt is None:
            return
        for k in keys:
            g = grads.get(k)
            p = self.params[k]
            p.grad = None if g is None else g.to(self.device, torch.float32).reshape(p.shape)
        self.opt.step()  # parameters without a gradient (other groups, skipped keys) are left alone
        self.opt.zero_grad(set_to_none=True)
        if last:
            self.sched.step()
            self.step_done = step + 1
        self._quantize(keys)

    def weight_frames(self, step: int, keys=None, full: bool = False) -> dict[int, bytes]:
        """The current quantized weights (of ``keys``, default all), serialized for the exchange of
        step ``step`` (the frame header carries that step so receivers can check they got this
        step's weights). With a delta encoder, each key's frame is a delta against the frame sent
        before it (every receiver must have had that one), or a key frame (``full``: always)."""
        out = {}
        for k in (self.frames if keys is None else keys):
            f = self.frames[k]
            f.step = step
            out[k] = f.to_bytes() if self.delta is None else self.delta.encode(f, full=full)
        return out

    def down_nbytes(self) -> tuple[int, int]:
        """(bytes the weight frames made so far would take as whole frames, bytes they took)."""
        return (self.delta.full_nbytes, self.delta.nbytes) if self.delta is not None else (0, 0)

    # -- quantization -----------------------------------------------------------------------------
    def curvature(self, key: int) -> torch.Tensor | None:
        """D = √v̂ + ε from Adam's second moment (None before the first step, or with SGD)."""
        if self.opt is None or self.cfg.name != "adam":
            return None
        st = self.opt.state.get(self.params[key])
        if not st or "exp_avg_sq" not in st:
            return None
        t = float(st["step"])
        v_hat = st["exp_avg_sq"] / (1.0 - self.cfg.betas[1] ** t)
        return v_hat.sqrt().add_(self.cfg.laq_eps)

    def _quantize_all(self) -> None:
        self._quantize(list(self.params))

    def _quantize(self, keys, warm_starts: dict[int, torch.Tensor] | None = None) -> None:
        """Re-quantize the owned weights ``keys``. LAQ's alternating minimisation starts from the scale
        of the frame it replaces (the weights moved by one optimizer step, so α barely changes and a
        few rounds suffice), or from ``warm_starts`` (a checkpoint's, to re-derive its frames)."""
        for k in keys:
            codec = self.specs[k].w_codec
            warm = self._warm_start(k) if warm_starts is None else warm_starts.get(k)
            if warm is None:
                self.warm.pop(k, None)
            else:
                self.warm[k] = warm
            kw = {"d": self.curvature(k), "alpha": warm} if isinstance(codec, WeightCodec) else {}
            self.frames[k] = codec.encode(self.params[k].data, key=k, step=self.step_done, **kw)

    def _warm_start(self, k: int) -> torch.Tensor | None:
        """The scale of key ``k``'s current LAQ frame (None before the first, or for other codecs)."""
        codec, f = self.specs[k].w_codec, self.frames.get(k)
        if f is None or not isinstance(codec, WeightCodec) or codec.scheme not in ("laq-linear", "laq-log"):
            return None
        return f.scales.to(self.device) if codec.per_row and len(f.shape) >= 2 else f.scales.reshape(()).to(self.device)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0] if self.sched else 0.0

    # -- checkpoint -------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {"step_done": self.step_done, "opt_scalars": {}}
        for k, p in self.params.items():
            tensors[f"w.{k}"] = p.data.detach().cpu().contiguous()
            if k in self.warm:  # so a resumed server re-derives exactly the same quantized weights
                tensors[f"alpha.{k}"] = self.warm[k].detach().cpu().reshape(-1).contiguous()
            st = self.opt.state.get(p, {}) if self.opt else {}
            for name, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    tensors[f"opt.{k}.{name}"] = v.detach().cpu().contiguous()
                else:
                    meta["opt_scalars"][f"{k}.{name}"] = float(v)
        if self.sched:
            meta["sched_last_epoch"] = self.sched.last_epoch
        return tensors, meta

    def save(self, path: Path) -> dict:
        """The shard's state to ``path`` (safetensors, written atomically); returns its manifest record."""
        from lowbit.train.checkpoint import save_tensors

        tensors, meta = self.state_tensors()
        return save_tensors(Path(path), tensors, meta)

    def load(self, paths) -> None:
        """Load the owned keys' state from the shard files ``paths`` (one path or several: a run may
        resume with another layout of owners, each key is read from whichever file holds it)."""
        from safetensors import safe_open

        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        tensors: dict[str, torch.Tensor] = {}
        meta = {"opt_scalars": {}}
        mine = {str(k) for k in self.params}
        for path in paths:
            with safe_open(str(path), framework="pt") as fh:
                names = [n for n in fh.keys() if n.count(".") and n.split(".")[1] in mine]
                if not names:
                    continue
                m = json.loads(fh.metadata()["lowbit"])
                meta["opt_scalars"].update(m.get("opt_scalars", {}))
                for key in ("step_done", "sched_last_epoch"):
                    if key in m:
                        meta[key] = m[key]
                tensors.update({n: fh.get_tensor(n) for n in names})
        warm: dict[int, torch.Tensor] = {}
        for k, p in self.params.items():
            if f"w.{k}" not in tensors:
                raise ConfigError(f"checkpoint {[str(p) for p in paths]} lacks weights for key {k} ({self.specs[k].name})")
            p.data.copy_(tensors[f"w.{k}"])
            if f"alpha.{k}" in tensors:
                a = tensors[f"alpha.{k}"].to(self.device)
                warm[k] = a.reshape(()) if a.numel() == 1 and not self.specs[k].w_codec.per_row else a
            if self.opt is not None:
                st = {}
                for name in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                    if f"opt.{k}.{name}" in tensors:
                        st[name] = tensors[f"opt.{k}.{name}"].to(self.device)
                s = meta["opt_scalars"].get(f"{k}.step")
                if s is not None:
                    st["step"] = torch.tensor(s)
                if st:
                    self.opt.state[p] = st
        if "step_done" not in meta:  # an owner of no keys
            return
        self.step_done = int(meta["step_done"])
        if self.sched:
            self.sched.last_epoch = int(meta.get("sched_last_epoch", self.step_done))
            for g, lr in zip(self.opt.param_groups, [self.cfg.lr * self.sched.lr_lambdas[0](self.sched.last_epoch)]):
                g["lr"] = lr
        self._quantize(list(self.params), warm_starts=warm)
