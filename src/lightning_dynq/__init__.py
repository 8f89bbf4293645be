"""Quantization-aware fine-tuning with PyTorch Lightning, exported as int8 models for x86 CPUs."""

from lightning_dynq.callback import DynamicQuantCallback, load_qat_checkpoint
from lightning_dynq.datamodule import BucketingDataModule
from lightning_dynq.qat_checkpoint import QATCheckpointMixin
from lightning_dynq.quantization import QuantRecipe, load_quantized

__all__ = [
    "BucketingDataModule",
    "DynamicQuantCallback",
    "QATCheckpointMixin",
    "QuantRecipe",
    "load_qat_checkpoint",
    "load_quantized",
]
