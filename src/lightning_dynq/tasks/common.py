"""Pieces shared by the task modules: batch splitting, learning-rate schedule, per-bucket metrics."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Keys that the bucketing DataModule adds to each batch for bookkeeping; models never see them.
BATCH_METADATA_KEYS = ("bucket", "example_index", "valid")


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a batch into the model's keyword arguments and the bookkeeping tensors."""
    model_inputs = {key: value for key, value in batch.items() if key not in BATCH_METADATA_KEYS}
    metadata = {key: batch[key] for key in BATCH_METADATA_KEYS if key in batch}
    return model_inputs, metadata


def valid_mask(metadata: dict[str, torch.Tensor], batch_size: int, device: torch.device) -> torch.Tensor:
    """Return the boolean mask of examples that count for loss and metrics.

    Filler duplicates that even out the number of batches across DDP ranks carry ``valid=False``.
    """
    if "valid" in metadata:
        return metadata["valid"].to(device=device, dtype=torch.bool)
    return torch.ones(batch_size, dtype=torch.bool, device=device)


def count_buckets(trainer: Any) -> int:
    """Return the number of length buckets of the trainer's DataModule, or 0 when it has none."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    boundaries = getattr(datamodule, "bucket_boundaries", None)
    return len(boundaries) if boundaries else 0


def linear_warmup_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Build a schedule that rises linearly for ``warmup_ratio`` of the steps, then decays to zero."""
    warmup_steps = int(total_steps * warmup_ratio)

    def scale(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        remaining = max(total_steps - warmup_steps, 1)
        return max(0.0, (total_steps - step) / remaining)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)


def decoupled_weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Group parameters so that biases and normalisation weights get no weight decay."""
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or "norm" in name.lower():
            not_decayed.append(parameter)
        else:
            decayed.append(parameter)
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]


def adamw_with_warmup(module: Any) -> dict[str, Any]:
    """Build AdamW with a linear warm-up and decay over the run, from the module's hyperparameters.

    Reads ``learning_rate``, ``weight_decay`` and ``warmup_ratio`` from ``module.hparams`` and the
    number of optimizer steps from its trainer; the schedule steps once per optimizer step.
    """
    groups = decoupled_weight_decay_groups(module, module.hparams.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=module.hparams.learning_rate)
    total_steps = max(int(module.trainer.estimated_stepping_batches), 1)
    scheduler = linear_warmup_schedule(optimizer, total_steps, module.hparams.warmup_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
