"""The quantizer: additive codebooks with per-(row, group) scales, and an RTN baseline.

``quantize(model, config, calibration=...)`` quantizes a causal LM block by
block; ``quantize_linear(linear, config, inputs=...)`` one layer.
"""

from codegemm.quant.driver import LayerReport, QuantReport, quantize
from codegemm.quant.layer import quantize_linear
from codegemm.quant.options import PRESET_DATA, PRESETS, QuantOptions, make_options
from codegemm.quant.rtn import rtn_fake_quant, rtn_quantize

__all__ = [
    "PRESETS",
    "PRESET_DATA",
    "LayerReport",
    "QuantOptions",
    "QuantReport",
    "make_options",
    "quantize",
    "quantize_linear",
    "rtn_fake_quant",
    "rtn_quantize",
]
