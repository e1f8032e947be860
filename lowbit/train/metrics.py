"""What a run reports, in one place for every transport: the per-step record (``OUT/metrics.jsonl``),
the progress bar, periodic evaluation and the summary (``OUT/summary.json``).

Bytes are the frames' bytes as the transports counted them; their fp32 equivalents scale them by the
ratio of one full fp32 frame set to one full quantized frame set of the plan (:func:`plan_bytes`),
the weights down as the whole frames the delta-coded ones stand for (``down_full``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from lowbit.progress import progress
from lowbit.train.checkpoint import write_json
from lowbit.train.config import Config


def step_record(step: int, losses: list[float], skipped: int, up: float, down: float, plan_bytes: dict,
                step_s: float, lr: float | None, workers: int, down_full: float | None = None,
                up_full: float | None = None) -> dict:
    """One line of ``metrics.jsonl``: step (1-based), mean loss over the workers that took part, lr,
    bytes up and down this step and their fp32 equivalents, the step's wall time. ``down_full``: the
    bytes down had every weight frame gone whole (default ``down``); ``up_full`` the same for the
    gradients up (row-sparse frames are smaller than whole ones)."""
    pb = plan_bytes
    full = down if not down_full else down_full
    up_full = up if not up_full else up_full
    return {"step": step, "loss": sum(losses) / max(1, len(losses)), "lr": lr,
            "bytes_up": int(up), "bytes_down": int(down), "bytes_up_whole": int(up_full), "bytes_down_whole": int(full),
            "fp32_bytes_up": int(up_full * pb["fp32_frames"] / pb["grad_frames"]),
            "fp32_bytes_down": int(full * pb["fp32_frames"] / pb["weight_frames"]),
            "step_s": step_s, "skipped_grads": int(skipped), "workers": workers}


class WholeFrames:
    """What the bytes sent stand for as whole frames (delta-coded weights and row-sparse gradients are
    smaller), kept by the leader from each step's ratios: the workers' for the gradients (each knows
    its upload before sending it), the owners' encoders' for the weights (every weight frame is sent
    or forwarded the same number of times, so one ratio over all of them holds for the bytes down)."""

    def __init__(self):
        self.sent = [0.0, 0.0]
        self.whole = [0.0, 0.0]

    def step(self, up: float, down: float, up_ratio: float, down_ratio: float) -> tuple[float, float]:
        """This step's (up, down) as whole frames."""
        out = (up * up_ratio, down * down_ratio)
        for i, (s, w) in enumerate(zip((up, down), out)):
            self.sent[i] += s
            self.whole[i] += w
        return out

    def scaled(self, up: float, down: float) -> tuple[float, float]:
        """Totals sent (over more steps than this leader saw, after a change of leader) as whole frames."""
        return tuple(x * w / s if s else x for x, s, w in zip((up, down), self.sent, self.whole))


class RunLog:
    """Kept by the one process that reports (the leading worker, or the Ray driver): appends to
    ``metrics.jsonl`` (a run that takes over the lead, or resumes, appends to the same file), draws
    the progress bar on ``console`` and evaluates every ``eval_every`` steps with ``evaluate()``."""

    def __init__(self, cfg: Config, start: int, first_step: int, evaluate: Callable[[], dict], console=None):
        self.cfg, self.evaluate = cfg, evaluate
        self.out = Path(cfg.run.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if first_step == start:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
        fresh = first_step == start and not cfg.run.resume
        self.fh = open(self.out / "metrics.jsonl", "w" if fresh else "a")
        c = cfg.codec
        self.bar = progress(cfg.run.steps, initial=first_step, desc=f"{cfg.transport.kind} w{c.w_bits}/g{c.g_bits}",
                            enabled=cfg.run.progress, file=console)
        self.t_start = time.time()

    def step(self, rec: dict, last: bool) -> None:
        r = self.cfg.run
        if r.eval_every and rec["step"] % r.eval_every == 0 and not last:
            rec.update({f"eval_{k}": v for k, v in self.evaluate().items()})
        if rec["step"] % max(1, r.log_every) == 0 or last:
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", MB=f"{(rec['bytes_up'] + rec['bytes_down']) / 1e6:.2f}",
                                 workers=rec["workers"], refresh=False)
            self.bar.update(1)

    def close(self, *, evaluate: bool = True) -> dict | None:
        """Close the file and the bar; the final evaluation (None when ``evaluate`` is false: a run
        that was asked to stop skips it)."""
        if self.bar is not None:
            self.bar.close()
        self.fh.close()
        return self.evaluate() if evaluate else None

    def summary(self, ev: dict | None, *, start: int, steps_done: int, up: float, down: float, plan_bytes: dict,
                down_full: float | None = None, up_full: float | None = None, **extra) -> dict:
        """``OUT/summary.json``: accuracy, bytes (and their fp32 equivalents), the run's shape; written
        atomically and returned."""
        cfg, pb = self.cfg, plan_bytes
        fp32_up = (up_full or up) * pb["fp32_frames"] / pb["grad_frames"]
        fp32_down = (down_full or down) * pb["fp32_frames"] / pb["weight_frames"]
        s = {
            "accuracy": ev["accuracy"] if ev else None, "eval_loss": ev["eval_loss"] if ev else None,
            "eval_n": ev["n"] if ev else 0,
            "steps": cfg.run.steps, "steps_done": steps_done, "start_step": start, "transport": cfg.transport.kind,
            "workers": cfg.transport.workers, "servers": cfg.transport.n_servers,
            "w_bits": cfg.codec.w_bits, "g_bits": cfg.codec.g_bits,
            "bytes_up": int(up), "bytes_down": int(down),
            "fp32_bytes_up": int(fp32_up), "fp32_bytes_down": int(fp32_down),
            "compression": float((fp32_up + fp32_down) / max(1.0, up + down)),
            "wall_s": time.time() - self.t_start, "model": cfg.run.model, "task": cfg.run.task,
            "numel": pb["numel"], "grad_frame_bytes": pb["grad_frames"], "weight_frame_bytes": pb["weight_frames"],
            "fp32_frame_bytes": pb["fp32_frames"], **extra,
        }
        write_json(self.out / "summary.json", s, sort_keys=False)
        return s
