"""Checks that reject QAT state for a module that was not prepared, naming the right loader.

Kept apart from :mod:`lightning_dynq.callback` so that the task modules can use it without
importing the callback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_dynq.quantization import backend
from lightning_dynq.quantization.prepare import boundaries


def check_qat_state_dict(module: torch.nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Raise ValueError when a QAT state_dict is about to be loaded into a module that was not prepared.

    Without this check ``load_state_dict`` fails with a long list of unexpected
    ``activation_post_process`` and ``weight_fake_quant`` keys.
    """
    if any(backend.is_quant_state_key(key) for key in state_dict) and not boundaries(module):
        raise ValueError(
            f"This is a quantization-aware training state, but {type(module).__name__} was not prepared for QAT. "
            "Load the checkpoint with lightning_dynq.load_qat_checkpoint(path, module), which prepares the module "
            "with the stored plan and then loads it, or pass ckpt_path to a Trainer that has DynamicQuantCallback."
        )


class QATCheckpointMixin:
    """LightningModule mixin: loading a QAT checkpoint into an unprepared module names the right loader.

    Put it before ``LightningModule`` in the bases. ``MyModule.load_from_checkpoint(path)`` on a
    QAT checkpoint then raises the ValueError of :func:`check_qat_state_dict` instead of torch's
    list of unexpected fake-quant keys. A module that was prepared first, by the callback in
    ``trainer.fit(ckpt_path=...)`` or by :func:`load_qat_checkpoint`, loads as usual.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:
            check_qat_state_dict(self, checkpoint["state_dict"])
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
