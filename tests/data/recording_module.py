"""A tiny classifier that records every batch it receives, for Trainer-level tests of the DataModule."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import nn


class RecordingClassifier(LightningModule):
    """Bag-of-embeddings classifier; stores ``(example_index, valid, bucket, shape)`` of each batch per stage."""

    def __init__(self, vocab_size: int, num_labels: int) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, 8, mode="mean")
        self.head = nn.Linear(8, num_labels)
        self.seen: dict[str, list[dict]] = {"train": [], "validation": [], "predict": []}

    def _record(self, stage: str, batch: dict) -> None:
        self.seen[stage].append({
            "example_index": batch["example_index"].tolist(),
            "valid": batch["valid"].tolist(),
            "bucket": batch["bucket"].tolist(),
            "shape": list(batch["input_ids"].shape),
        })

    def _loss(self, batch: dict) -> torch.Tensor:
        logits = self.head(self.embedding(batch["input_ids"], per_sample_weights=None))
        losses = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        return (losses * batch["valid"]).sum() / batch["valid"].sum().clamp(min=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._record("train", batch)
        return self._loss(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._record("validation", batch)

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._record("predict", batch)
        return batch["example_index"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
