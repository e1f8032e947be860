"""Pluggable quantization wrappers over BERT-family transformers models.

    from lowbit.models import wrap, load_preset, export_packed, load_packed
    model, tok = load_preset("minilm", num_labels=2)
    wrap(model, "ternarybert", method="twn")        # or "q8bert", or a custom scheme factory
    export_packed(model, "minilm-ternary.safetensors")
    model2 = load_packed("minilm-ternary.safetensors")
"""
from lowbit.models.export import export_packed, load_packed
from lowbit.models.layers import QuantEmbedding, QuantLinear
from lowbit.models.presets import load_preset
from lowbit.models.q8bert import q8bert, quantize_symmetric_max
from lowbit.models.registry import (Scheme, check_supported, get_scheme, list_schemes, register_scheme,
                                    set_quant_enabled, wrap, wrap_low_bit)
from lowbit.models.ternarybert import (TernaryWeightQuant, attach_optimizer, distill_losses, distill_step,
                                       ternarybert)

__all__ = [
    "wrap", "wrap_low_bit", "register_scheme", "get_scheme", "list_schemes", "set_quant_enabled", "check_supported", "Scheme",
    "QuantLinear", "QuantEmbedding", "ternarybert", "q8bert", "TernaryWeightQuant", "attach_optimizer",
    "quantize_symmetric_max", "distill_losses", "distill_step", "export_packed", "load_packed", "load_preset",
]
