"""Checkpoints that cannot lie.

Layout under ``OUT/ckpt``::

    step_N/shard_R.safetensors    owner R's fp32 weights, optimizer state and LAQ warm starts
    step_N/worker_R.safetensors   worker R's error-feedback residuals (when it keeps any)
    step_N/manifest.json          every file's size and xxh3-128 digest, the step, the run's fingerprint
    latest.json                   {"step": N}: the newest complete checkpoint

Every file is written atomically (a temporary name in the same folder, fsync, rename, fsync of the
folder). A rank reports each file's size and digest when it has written it; once every rank has,
the manifest is written, then ``latest.json``, so both only ever name files that are complete.
:meth:`Checkpointer.resume_point` verifies a checkpoint's files against its manifest before anything
is loaded and falls back to the newest one that verifies; an unreadable ``latest.json`` falls back to
scanning the ``step_N`` folders. :meth:`Checkpointer.prune` keeps the newest few.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lowbit.errors import ConfigError

MANIFEST = "manifest.json"
LATEST = "latest.json"
FORMAT = "lowbit-checkpoint/2"
_CHUNK = 4 << 20


def file_digest(path: str | os.PathLike) -> str:
    """xxh3-128 of a file's bytes, hex (a fast non-cryptographic hash: it finds corruption, not forgery)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - a folder that cannot be opened (some file systems)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> dict:
    """``write(tmp)`` writes the file under a temporary name next to ``path``; it is then fsynced and
    renamed to ``path``. Returns ``{"bytes", "xxh3_128"}`` of what was written. On any error the
    temporary file is removed and the error raised (``path`` keeps what it had)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        rec = {"bytes": tmp.stat().st_size, "xxh3_128": file_digest(tmp)}
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return rec


def write_json(path: str | os.PathLike, obj, *, sort_keys: bool = True) -> dict:
    """``obj`` as JSON, atomically (sorted keys: ranks that write the same content write the same bytes)."""
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, sort_keys=sort_keys)))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> dict:
    """One safetensors file (``metadata`` as JSON under "lowbit"), atomically; returns its manifest record."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()} or {"_": torch.zeros(0)}
    meta = {"lowbit": json.dumps(metadata)} if metadata is not None else None
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k != "_"}


@dataclass(frozen=True)
class ResumePoint:
    """Where ``--resume`` continues: the checkpoint's step (None: nothing to resume, start at 0), its
    manifest, and one line per checkpoint passed over and why."""

    step: int | None
    manifest: dict | None
    skipped: tuple[str, ...] = ()

    @staticmethod
    def start_of(rp: "ResumePoint | None") -> int:
        """The first step a run resuming from ``rp`` (None: not resuming) trains."""
        return rp.step if rp is not None and rp.step is not None else 0


class Checkpointer:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.root = self.out / "ckpt"

    # -- paths --------------------------------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def shard_path(self, step: int, rank: int) -> Path:
        return self.step_dir(step) / f"shard_{rank}.safetensors"

    def worker_path(self, step: int, worker: int) -> Path:
        """Worker ``worker``'s (its index among the workers, not its rank) residuals."""
        return self.step_dir(step) / f"worker_{worker}.safetensors"

    def steps(self) -> list[int]:
        """The ``step_N`` folders present, newest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
                out.append(int(p.name[5:]))
        return sorted(out, reverse=True)

    # -- writing ------------------------------------------------------------------------------------
    def commit(self, step: int, files: dict[str, dict], fingerprint: dict) -> None:
        """Write ``step_N/manifest.json`` (the files' records and the run's fingerprint), then
        ``latest.json``. Every rank that saw all files reported may call this: the content is the same."""
        write_json(self.step_dir(step) / MANIFEST, {"format": FORMAT, "step": step, "files": dict(sorted(files.items())),
                                                    "fingerprint": fingerprint, "time": round(time.time(), 3)})
        write_json(self.root / LATEST, {"step": step})

    def prune(self, keep: int, protect: set[int] = frozenset()) -> list[int]:
        """Delete all but the newest ``keep`` committed checkpoints (and step folders older than the
        newest committed one that never got a manifest), never those in ``protect``. Returns the
        steps deleted."""
        committed = [s for s in self.steps() if (self.step_dir(s) / MANIFEST).is_file()]
        if not committed:
            return []
        newest = committed[0]
        drop = [s for s in committed[keep:]] + [s for s in self.steps() if s < newest and s not in committed]
        gone = []
        for s in sorted(set(drop) - set(protect)):
            shutil.rmtree(self.step_dir(s), ignore_errors=True)
            gone.append(s)
        return gone

    # -- reading ------------------------------------------------------------------------------------
    def manifest(self, step: int) -> dict:
        p = self.step_dir(step) / MANIFEST
        try:
            m = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p} is missing: step {step} was never committed") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p} is unreadable: {e}") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
            raise ConfigError(f"{p} is not a lowbit checkpoint manifest (format {FORMAT})")
        return m

    def verify(self, step: int) -> dict:
        """The manifest of ``step`` once every file it lists is present with its size and digest.
        Raises ConfigError naming the first file that is missing, truncated or corrupted."""
        m = self.manifest(step)
        for name, rec in m["files"].items():
            p = self.step_dir(step) / name
            if not p.is_file():
                raise ConfigError(f"{p} is missing")
            size = p.stat().st_size
            if size != rec.get("bytes"):
                raise ConfigError(f"{p} has {size} bytes, the manifest says {rec.get('bytes')} (truncated?)")
            if file_digest(p) != rec.get("xxh3_128"):
                raise ConfigError(f"{p} does not match its checksum (corrupted)")
        return m

    def latest_step(self) -> int | None:
        """The step ``latest.json`` names (None when there is none or it is unreadable)."""
        try:
            step = json.loads((self.root / LATEST).read_text())["step"]
            return int(step)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def resume_point(self) -> ResumePoint:
        """The newest checkpoint that verifies: the one ``latest.json`` names, else (it is unreadable,
        or its files fail) the newest ``step_N`` folder whose manifest and files verify. A folder with
        no manifest that ``latest.json`` does not name is a checkpoint that was never committed (a
        write cut short): it is passed over without counting as damage."""
        skipped: list[str] = []
        latest = self.latest_step()
        if (self.root / LATEST).exists() and latest is None:
            skipped.append(f"{self.root / LATEST} is unreadable: scanning the step folders")
        committed = [s for s in self.steps() if s != latest and (self.step_dir(s) / MANIFEST).exists()]
        order = ([latest] if latest is not None else []) + committed
        for s in order:
            try:
                return ResumePoint(s, self.verify(s), tuple(skipped))
            except ConfigError as e:
                skipped.append(f"step {s}: {e}")
        return ResumePoint(None, None, tuple(skipped))

    def weights(self, step: int) -> dict[int, torch.Tensor]:
        """The fp32 weights of every piece saved at ``step`` (key -> tensor), gathered from all shards."""
        from safetensors.torch import load_file

        files = sorted(self.step_dir(step).glob("shard_*.safetensors"))
        if not files:
            raise ConfigError(f"no checkpoint shards under {self.step_dir(step)}")
        out: dict[int, torch.Tensor] = {}
        for f in files:
            out.update({int(k[2:]): v for k, v in load_file(str(f)).items() if k.startswith("w.")})
        return out

    def shard_files(self, step: int) -> list[Path]:
        return sorted(self.step_dir(step).glob("shard_*.safetensors"))


def fingerprint(cfg) -> dict:
    """What a checkpoint must agree on with the run that resumes it (a mismatch is refused before
    launch), and the layout it was written with (which a resume may change: the owners' state is
    read by key, whatever the shards were)."""
    c, t = cfg.codec, cfg.transport
    return {
        "model": cfg.run.model,
        "codec": {k: getattr(c, k) for k in ("w_bits", "g_bits", "w_scheme", "per_row", "embed_bits", "head_bits",
                                             "small_bits", "small_g_bits", "max_piece_numel", "error_feedback",
                                             "scheme")},
        "optimizer": cfg.optim.name,
        "steps": cfg.run.steps,
        "layout": {"transport": t.kind, "workers": t.workers, "servers": t.n_servers},
    }


def check_compatible(saved: dict, cfg, where: str) -> None:
    """Refuse to resume a checkpoint written by an incompatible run: a different model, codec widths
    or optimizer; a different number of workers when workers keep error-feedback residuals (each
    worker's residual belongs to its data shard). The transport, the servers and (without error
    feedback) the workers may change: the owners' state is repartitioned by key."""
    now = fingerprint(cfg)
    for key in ("model", "optimizer"):
        if saved.get(key) != now[key]:
            raise ConfigError(f"{where} was written with {key} {saved.get(key)!r}, this run has {now[key]!r}")
    for k, v in now["codec"].items():
        was = saved.get("codec", {}).get(k, "none" if k == "scheme" else None)  # written before schemes: none
        if was != v:
            raise ConfigError(f"{where} was written with codec.{k} = {was!r}, this run has {v!r}")
    old_w = saved.get("layout", {}).get("workers")
    if now["codec"]["error_feedback"] and old_w != now["layout"]["workers"]:
        raise ConfigError(f"{where} was written by {old_w} workers with error feedback, this run has "
                          f"{now['layout']['workers']}: the residuals belong to the workers' data shards "
                          "(resume with the same --workers)")
