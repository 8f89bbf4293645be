"""Quantization-aware training on plain torch modules: recipe, preparation, conversion, artifacts.

Nothing here imports Lightning; :mod:`lightning_dynq.callback` adapts it to the Trainer.
"""

from lightning_dynq.quantization.artifacts import load_quantized
from lightning_dynq.quantization.backend import QuantBoundary
from lightning_dynq.quantization.convert import check_ready_to_convert, convert_copy, quantized_modules
from lightning_dynq.quantization.padding import padding_mask
from lightning_dynq.quantization.prepare import Preparation, boundaries, check_patterns, prepare_model, set_submodule
from lightning_dynq.quantization.recipe import QuantRecipe, ScheduleMoment

__all__ = [
    "Preparation",
    "QuantBoundary",
    "QuantRecipe",
    "ScheduleMoment",
    "boundaries",
    "check_patterns",
    "check_ready_to_convert",
    "convert_copy",
    "load_quantized",
    "padding_mask",
    "prepare_model",
    "quantized_modules",
    "set_submodule",
]
