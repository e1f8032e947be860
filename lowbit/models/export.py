"""Packed low-bit checkpoints: one safetensors file, loaded back without pickle or network.

File layout (``safetensors``; every value a tensor, metadata all strings):

- for each quantized layer ``<name>`` (a QuantLinear / QuantEmbedding with a weight quantizer):
  ``<name>.weight.__codes`` = the QTensor codes packed with :func:`lowbit.codec.pack.pack_bits`
  (uint8, ceil(n·bits/8) bytes: 4 ternary values per byte, 1 byte per 8-bit value) and
  ``<name>.weight.__scale`` = float32 scale(s) (one per tensor, or one per row);
- every other entry of the model's ``state_dict`` as is (float32, or float16 with
  ``fp_dtype=torch.float16``), including activation-quantizer state (Q8BERT EMA ranges);
- metadata: ``format`` ("lowbit-packed/1"), ``architecture`` (the transformers class name),
  ``config`` (the HF config JSON), ``scheme`` (name + JSON options) and ``quantized`` (per tensor
  shape, bits, grid, per_row).

What stays large, and why: LayerNorm weights/biases and all biases (tiny, and quantizing them saves
nothing while hurting accuracy); the position and token-type embeddings (TernaryBERT quantizes only
the word embedding; for MiniLM the 512×384 position table is ~0.8 MB in fp32, the largest fp item);
the task classifier (hidden×labels, kept fp32 by default in both schemes). Each quantized tensor also
carries its float32 scale(s). For MiniLM with ternary (2-2-8) weights this gives ~6–7 MB against
the 90.9 MB fp32 checkpoint.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.codec.pack import pack_bits, unpack_bits
from lowbit.errors import ConfigError
from lowbit.models.layers import QuantEmbedding, QuantLinear
from lowbit.models.registry import SUPPORTED_MODEL_TYPES, wrap, wrap_low_bit
from lowbit.quant.qtensor import QTensor

__all__ = ["export_packed", "load_packed", "FORMAT"]

FORMAT = "lowbit-packed/1"
_CODES, _SCALE = ".__codes", ".__scale"


def _quant_layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and m.enabled and m.weight_quant is not None:
            yield name, m


def export_packed(model: nn.Module, path: str | os.PathLike, fp_dtype: torch.dtype = torch.float32) -> int:
    """Write ``model`` (a transformers model wrapped by :func:`lowbit.models.wrap`) as a packed
    safetensors file; returns its size in bytes. ``fp_dtype`` (float32 | float16) is the storage
    type of the parameters that are not quantized."""
    from safetensors.torch import save_file

    scheme = getattr(model, "_lowbit_scheme", None)
    if scheme is None:
        raise ConfigError(f"{type(model).__name__} is not wrapped: call lowbit.models.wrap(model, scheme) first")
    if not hasattr(model, "config"):
        raise ConfigError(f"{type(model).__name__} has no transformers config to store")
    if fp_dtype not in (torch.float32, torch.float16):
        raise ConfigError(f"fp_dtype must be torch.float32 or torch.float16, got {fp_dtype}")
    tensors: dict[str, torch.Tensor] = {}
    qmeta: dict[str, dict] = {}
    skip = set()
    for name, m in _quant_layers(model):
        q = m.quantized_state()
        if q is None:
            continue
        key = f"{name}.weight"
        skip.add(key)
        tensors[key + _CODES] = pack_bits(q.codes.detach().cpu().contiguous(), q.bits)
        tensors[key + _SCALE] = q.scale.detach().to("cpu", torch.float32).reshape(-1).contiguous()
        qmeta[key] = {"shape": list(q.shape), "bits": q.bits, "grid": q.grid, "per_row": q.per_row}
    params = {n for n, _ in model.named_parameters()}
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        t = t.detach().cpu()
        if t.is_floating_point() and fp_dtype != torch.float32 and key in params:
            t = t.to(fp_dtype)
        tensors[key] = t.contiguous().clone()
    meta = {
        "format": FORMAT,
        "architecture": type(model).__name__,
        "config": model.config.to_json_string(use_diff=False),
        "scheme": json.dumps(scheme),
        "quantized": json.dumps(qmeta),
        "fp_dtype": str(fp_dtype).replace("torch.", ""),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    default_mode(path)
    return path.stat().st_size


def default_mode(path: Path) -> None:
    """Give the file the permissions a plain ``open(path, "w")`` would (0666 less the umask):
    safetensors creates it owner-only."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _model_class(arch: str):
    import transformers
    from transformers import PreTrainedModel

    cls = getattr(transformers, arch, None) if arch.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ConfigError(f"packed checkpoint names architecture {arch!r}, which is not a transformers model class")
    return cls


def load_packed(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model of a packed checkpoint (config from the metadata, no hub access), wrap it
    with the stored scheme and load the weights; quantized layers get the stored codes and scales
    exactly, so predictions equal those of the fake-quantized model that was exported (with
    ``fp_dtype=float32``). Returns the model in eval mode."""
    from safetensors import safe_open
    from transformers import CONFIG_MAPPING

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"packed checkpoint {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a lowbit packed checkpoint (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"packed checkpoint has model type {mtype!r}; supported: {SUPPORTED_MODEL_TYPES}")
    config = CONFIG_MAPPING[mtype].from_dict(cfg)
    cls = _model_class(meta["architecture"])
    model = cls(config)
    if "frames" in meta:
        name = json.loads(meta["scheme"]).get("name", "none")
        if name != "none":
            wrap_low_bit(model, name)
        return _load_frames(model, tensors, json.loads(meta["frames"]))
    scheme = json.loads(meta["scheme"])
    opts = dict(scheme.get("options", {}))
    if "skip" in opts:
        opts["skip"] = tuple(opts["skip"])
    wrap(model, scheme["name"], **opts)
    qmeta = json.loads(meta["quantized"])
    fp = {k: v for k, v in tensors.items() if not (k.endswith(_CODES) or k.endswith(_SCALE))}
    sd_keys = set(model.state_dict().keys())
    unexpected = set(fp) - sd_keys
    if unexpected:
        raise ConfigError(f"packed checkpoint holds tensors the model does not have: {sorted(unexpected)[:5]}")
    missing = sd_keys - set(fp) - set(qmeta)
    if missing:
        raise ConfigError(f"packed checkpoint lacks tensors the model needs: {sorted(missing)[:5]}")
    ref = model.state_dict()
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in fp.items()}, strict=False)
    for key, info in qmeta.items():
        name = key[: -len(".weight")]
        m = model.get_submodule(name)
        if not isinstance(m, (QuantLinear, QuantEmbedding)) or m.weight_quant is None:
            raise ConfigError(f"packed tensor {key!r} is quantized but the rebuilt layer is not")
        shape = tuple(info["shape"])
        if shape != tuple(m.weight.shape):
            raise ConfigError(f"packed tensor {key!r} has shape {shape}, the model expects {tuple(m.weight.shape)}")
        codes = unpack_bits(tensors[key + _CODES], int(info["bits"]), math.prod(shape)).reshape(shape)
        scale = tensors[key + _SCALE].to(torch.float32)
        scale = scale.reshape(()) if not info.get("per_row") else scale
        m.set_quantized_state(QTensor(codes=codes, scale=scale, bits=int(info["bits"]), grid=info["grid"]))
    return model.eval()


def _load_frames(model: nn.Module, tensors: dict[str, torch.Tensor], pieces: list[dict]) -> nn.Module:
    """A run export (:func:`lowbit.train.export.export_run`): each frame decoded, as the workers
    decode it, into the parameter rows it covers."""
    from lowbit.codec.decode import decode_frame
    from lowbit.codec.frame import Frame

    params = dict(model.named_parameters())
    covered: dict[str, int] = {}
    with torch.no_grad():
        for piece in pieces:
            name, rows = piece["param"], piece.get("rows")
            if name not in params:
                raise ConfigError(f"packed frame {piece['key']} fills {name!r}, which the model does not have")
            dst = params[name] if rows is None else params[name][rows[0]:rows[1]]
            buf = tensors.get(f"frame.{piece['key']}")
            if buf is None:
                raise ConfigError(f"packed checkpoint lacks frame {piece['key']} ({name})")
            f = Frame.from_bytes(buf.numpy().tobytes(), expect_shape=tuple(dst.shape))
            dst.copy_(decode_frame(f, dst.device).to(dst.dtype).reshape(dst.shape))
            covered[name] = covered.get(name, 0) + dst.numel()
    missing = [n for n, p in params.items() if covered.get(n, 0) != p.numel()]
    if missing:
        raise ConfigError(f"packed checkpoint does not cover parameters {missing[:5]}")
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for k, t in tensors.items():
            if k.startswith("buffer."):
                if k[7:] not in buffers:
                    raise ConfigError(f"packed checkpoint holds state {k[7:]!r} the model does not have")
                buffers[k[7:]].copy_(t)
    return model.eval()
