"""Padding mask shared with the activation observers during one training step.

The Lightning callback sets the mask of the current batch before the forward pass and clears it
afterwards. Observers of activations shaped (B, T, ...) then see only positions where the mask
is nonzero, so padded positions never widen the quantization range.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_active_mask: torch.Tensor | None = None


def set_active_mask(mask: torch.Tensor | None) -> None:
    """Set the (B, T) padding mask that observers apply, or clear it with None."""
    global _active_mask
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"Invalid padding mask of shape {tuple(mask.shape)}: expected (batch, tokens).")
    _active_mask = None if mask is None else mask.bool()


def active_mask() -> torch.Tensor | None:
    """Return the padding mask set by :func:`set_active_mask`, or None."""
    return _active_mask


@contextlib.contextmanager
def padding_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Make observers skip padded positions inside the block.

    Example::

        >>> import torch
        >>> with padding_mask(torch.tensor([[1, 1, 0]])):
        ...     active_mask().tolist()
        [[True, True, False]]
    """
    previous = _active_mask
    set_active_mask(mask)
    try:
        yield
    finally:
        set_active_mask(previous)
