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
_active_positions: torch.Tensor | None = None


def set_active_mask(mask: torch.Tensor | None) -> None:
    """Set the (B, T) padding mask that observers apply, or clear it with None."""
    global _active_mask, _active_positions
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"Invalid padding mask of shape {tuple(mask.shape)}: expected (batch, tokens).")
    _active_mask = None if mask is None else mask.bool()
    _active_positions = None


def active_mask() -> torch.Tensor | None:
    """Return the padding mask set by :func:`set_active_mask`, or None."""
    return _active_mask


def active_positions() -> torch.Tensor | None:
    """Return the flat indices of the real positions in the active mask, or None without a mask.

    Row ``i`` of ``x.flatten(0, 1)`` is a real token when ``i`` is in this index. The index is
    computed once per mask and shared by all observers of the step.
    """
    global _active_positions
    if _active_mask is None:
        return None
    if _active_positions is None:
        _active_positions = _active_mask.flatten().nonzero().squeeze(1)
    return _active_positions


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
