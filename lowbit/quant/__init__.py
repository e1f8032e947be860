"""Pure tensor math for low-bit training: weight, gradient and activation quantizers, STE.

No communication, no models. Every quantizer returns a :class:`QTensor` (or a fake-quantized tensor
for activations).
"""
from lowbit.quant.acts import EMASymmetricActQuant, MinMaxActQuant, fake_quant_minmax, fake_quant_symmetric
from lowbit.quant.grads import (
    FINITE_POLICIES,
    QSGD_LEVELS,
    ErrorFeedback,
    cast_half,
    check_finite,
    clip_sigma,
    qsgd,
    quantize_grad_stochastic,
    sign_ef,
    stochastic_round,
    terngrad,
)
from lowbit.quant.qtensor import GRIDS, QTensor, check_grid, grid_k, levels
from lowbit.quant.ste import QuantizeSTE, quantize_ste, round_ste, ste
from lowbit.quant.weights import (
    WEIGHT_SCHEMES,
    binarize,
    laq_project,
    quantize_weight,
    ternarize_lat,
    ternarize_twn,
    weight_objective,
)

__all__ = [
    "QTensor", "GRIDS", "levels", "grid_k", "check_grid",
    "binarize", "ternarize_twn", "ternarize_lat", "laq_project", "weight_objective", "quantize_weight",
    "WEIGHT_SCHEMES",
    "clip_sigma", "stochastic_round", "quantize_grad_stochastic", "check_finite", "cast_half", "sign_ef",
    "qsgd", "terngrad", "ErrorFeedback", "FINITE_POLICIES", "QSGD_LEVELS",
    "fake_quant_minmax", "fake_quant_symmetric", "MinMaxActQuant", "EMASymmetricActQuant",
    "round_ste", "ste", "QuantizeSTE", "quantize_ste",
]
