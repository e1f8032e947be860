"""Scheme registry and the generic wrapper over BERT-family transformers models.

A *scheme* decides, per module, which weight quantizer and input-activation quantizer to use:

    @register_scheme("myscheme")
    def myscheme(**options) -> Scheme:
        return Scheme(name="myscheme", linear=lambda name, mod: (wq, aq) | None,
                      embedding=lambda name, mod: (wq, aq) | None, setup=None, options=options)

``wrap(model, "myscheme", **options)`` then replaces every ``nn.Linear`` / ``nn.Embedding`` for which
the scheme returns a pair by a :class:`QuantLinear` / :class:`QuantEmbedding` holding a copy of its
weights (``None`` keeps the fp module). A new scheme is one file that imports this module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from lowbit.errors import ConfigError
from lowbit.models.layers import QuantEmbedding, QuantLinear, attention_modules

__all__ = ["Scheme", "register_scheme", "get_scheme", "list_schemes", "wrap", "wrap_low_bit", "set_quant_enabled",
           "SUPPORTED_MODEL_TYPES", "check_supported"]

Pair = Optional[tuple]  # (weight_quant | None, act_quant module | None) or None = leave fp

#: transformers ``config.model_type`` values whose modules are nn.Linear / nn.Embedding only
#: (MiniLM checkpoints are model_type "bert").
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")

# weight-bearing leaf modules left alone without complaint (normalisation, dropout has no weight)
_FP_OK = (nn.LayerNorm,)


@dataclass
class Scheme:
    """What ``wrap`` needs from a scheme. ``linear(name, module)`` / ``embedding(name, module)``
    return ``(weight_quant, act_quant)`` or None; ``setup(model)`` runs after replacement (e.g. to
    install attention-matmul quantizers); ``options`` are recorded on the model (for export)."""

    name: str
    linear: Callable[[str, nn.Linear], Pair]
    embedding: Callable[[str, nn.Embedding], Pair]
    setup: Callable[[nn.Module], None] | None = None
    options: dict[str, Any] = field(default_factory=dict)


_SCHEMES: dict[str, Callable[..., Scheme]] = {}


def register_scheme(name: str):
    """Decorator: register ``factory(**options) -> Scheme`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"scheme name must be a non-empty string, got {name!r}")

    def deco(factory: Callable[..., Scheme]) -> Callable[..., Scheme]:
        _SCHEMES[name] = factory
        return factory

    return deco


def list_schemes() -> tuple[str, ...]:
    return tuple(sorted(_SCHEMES))


def get_scheme(scheme: str | Callable[..., Scheme] | Scheme, **options) -> Scheme:
    """Resolve a scheme name, a factory, or a ready Scheme into a Scheme."""
    if isinstance(scheme, Scheme):
        if options:
            raise ConfigError("options cannot be passed together with a ready Scheme object")
        return scheme
    if isinstance(scheme, str):
        if scheme not in _SCHEMES:
            raise ConfigError(f"unknown quantization scheme {scheme!r}; registered: {sorted(_SCHEMES)}")
        out = _SCHEMES[scheme](**options)
    elif callable(scheme):
        out = scheme(**options)
    else:
        raise ConfigError(f"scheme must be a name, a factory or a Scheme, got {type(scheme).__name__}")
    if not isinstance(out, Scheme):
        raise ConfigError(f"scheme factory {scheme!r} returned {type(out).__name__}, expected a Scheme")
    return out


def check_supported(model: nn.Module) -> None:
    """Raise ConfigError naming the model type or the module that cannot be wrapped."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if cfg is not None and mtype is not None and mtype not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model type {mtype!r} ({type(model).__name__}) is not supported by lowbit.models.wrap; "
                          f"supported BERT-family types: {SUPPORTED_MODEL_TYPES}")
    n_linear = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            n_linear += isinstance(m, nn.Linear)
            continue
        if isinstance(m, _FP_OK):
            continue
        w = m._parameters.get("weight")
        if w is not None and w.dim() >= 2:
            raise ConfigError(f"module {name or '<root>'!r} of type {type(m).__module__}.{type(m).__name__} "
                              f"holds a {w.dim()}-D weight but is neither nn.Linear nor nn.Embedding; "
                              "lowbit.models.wrap cannot quantize it")
    if n_linear == 0:
        raise ConfigError(f"model {type(model).__name__} has no nn.Linear layers to quantize")


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def wrap(model: nn.Module, scheme: str | Callable[..., Scheme] | Scheme, **options) -> nn.Module:
    """Replace, in place, the nn.Linear / nn.Embedding layers of a BERT-family model by quantized
    ones as ``scheme`` decides; returns the same model object.

    ``scheme``: a registered name ("ternarybert", "q8bert"), a factory ``(**options) -> Scheme`` or a
    Scheme. Raises :class:`ConfigError` for an unsupported model type (e.g. "gpt2"), a weight-bearing
    module that is not Linear/Embedding (e.g. transformers' GPT-2 ``Conv1D``), a model without any
    nn.Linear, or a model that is already wrapped.
    """
    if getattr(model, "_lowbit_scheme", None) is not None:
        raise ConfigError(f"model is already wrapped with scheme {model._lowbit_scheme['name']!r}")
    check_supported(model)
    sch = get_scheme(scheme, **options)
    replaced = 0
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear:
            pair = sch.linear(name, m)
            if pair is not None:
                _set_child(model, name, QuantLinear.from_float(m, *pair))
                replaced += 1
        elif type(m) is nn.Embedding:
            pair = sch.embedding(name, m)
            if pair is not None:
                _set_child(model, name, QuantEmbedding.from_float(m, *pair))
                replaced += 1
    if replaced == 0:
        raise ConfigError(f"scheme {sch.name!r} selected no layer of {type(model).__name__} to quantize")
    if sch.setup is not None:
        sch.setup(model)
    json_opts = {}
    for k, v in sch.options.items():
        try:
            json.dumps(v)
            json_opts[k] = v
        except TypeError:
            pass  # e.g. an optimizer handle: runtime only, not part of the saved scheme
    model._lowbit_scheme = {"name": sch.name, "options": json_opts, "n_quantized": replaced}
    return model


def wrap_low_bit(model: nn.Module, scheme: str | Callable[..., Scheme] | Scheme, **options) -> dict[str, int]:
    """:func:`wrap` for a model whose weights arrive already quantized (a distributed worker's, a
    run export's): the scheme's activation (and attention-matmul) quantizers, but no weight
    quantizer, so the weights are used exactly as they are, never quantized a second time and with
    no full-precision copy. Returns the bits of every parameter the scheme quantizes (name -> bits,
    read off the scheme's weight quantizer); the other parameters stay full precision."""
    wrap(model, scheme, **options)
    bits: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and m.weight_quant is not None:
            q = m.quantized_state()
            if q is not None:
                bits[f"{name}.weight" if name else "weight"] = int(q.bits)
            m.weight_quant = None
            m._qcache = None
    model._lowbit_scheme["weights"] = "low-bit"
    return bits


def set_quant_enabled(model: nn.Module, flag: bool) -> nn.Module:
    """Turn every weight and activation quantizer of a wrapped model on or off (off = fp forward)."""
    flag = bool(flag)
    for _, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            m.enabled = flag
        elif hasattr(m, "enabled") and type(m).__module__.startswith("lowbit."):
            m.enabled = flag
    for _, m in attention_modules(model):
        if hasattr(m, "lowbit_matmul_quant"):
            m.lowbit_quant_enabled = flag
    return model
