"""Check a trained QAT model and convert a copy of it to int8."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lightning_dynq.quantization import backend
from lightning_dynq.quantization.prepare import boundaries


def check_ready_to_convert(model: nn.Module) -> None:
    """Raise RuntimeError when a quantized module cannot be converted with valid ranges.

    Two cases are rejected, each naming the modules: a module whose observers never saw a tensor
    (it never ran in training), and a module whose computed scale is NaN, infinite or zero.
    """
    unobserved = sorted({_owner(name, model) for name in backend.unobserved_fake_quants(model)})
    if unobserved:
        raise RuntimeError(
            f"Quantized modules {_name_list(unobserved)} never ran during training, so their observers have no range. "
            "Exclude them from quantization (exclude or overrides with None), or make sure training_step "
            "runs them."
        )
    invalid = sorted({_owner(name, model) for name in backend.invalid_scales(model)})
    if invalid:
        raise RuntimeError(
            f"Quantized modules {_name_list(invalid)} have a NaN, infinite or zero scale: their inputs, outputs or weights "
            "contain NaN/inf values or are all zero. Fix the diverged training (lower the learning rate, clip "
            "gradients) or keep these modules float with overrides."
        )


def convert_copy(model: nn.Module, engine: str, check: bool = True, memo: dict[int, Any] | None = None) -> nn.Module:
    """Return an int8 CPU copy of a prepared model; ``model`` itself stays a trainable QAT model.

    Args:
        model: a model prepared by :func:`~.prepare.prepare_model`.
        engine: quantized engine that packs the int8 weights; inference must use the same one.
        check: run :func:`check_ready_to_convert` first.
        memo: ``copy.deepcopy`` memo, used to leave out objects that must not be copied.
    """
    if check:
        check_ready_to_convert(model)
    memo = dict(memo) if memo is not None else {}
    # Parameters and buffers are copied straight to the CPU, so a model trained on a GPU never
    # needs a second copy in GPU memory; tied parameters stay tied because they share one memo entry.
    for tensor in [*model.parameters(), *model.buffers()]:
        memo[id(tensor)] = _cpu_copy(tensor)
    quantized = copy.deepcopy(model, memo)
    quantized.cpu().eval()
    with backend.quantized_engine(engine):
        for boundary in boundaries(quantized).values():
            backend.convert_boundary(boundary)
    return quantized


def _name_list(names: list[str], limit: int = 10) -> str:
    """Format module names for an error message: all of them up to ``limit``, then a count of the rest."""
    if len(names) <= limit:
        return str(names)
    return f"{names[:limit]} and {len(names) - limit} more ({len(names)} in all)"


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    copied = tensor.detach().to("cpu", copy=True)
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(copied, requires_grad=tensor.requires_grad)
    return copied


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """Return converted module names mapped to their qualified int8 type names."""
    return {
        name: backend.quantized_type_name(boundary.module)
        for name, boundary in boundaries(model).items()
    }


def _owner(fake_quant_name: str, model: nn.Module) -> str:
    """Return the name of the quantized module that owns a fake-quant module."""
    for name in sorted(boundaries(model), key=len, reverse=True):
        if fake_quant_name.startswith(name + "."):
            return name
    return fake_quant_name
