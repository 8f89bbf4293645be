"""TextClassifier on a small randomly initialised BERT: loss masking and per-bucket test metrics."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from lightning_dynq import BucketingDataModule
from lightning_dynq.tasks import TextClassifier

NUM_LABELS = 77


@pytest.fixture(scope="module")
def tiny_bert_path(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> str:
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=NUM_LABELS,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_bert")
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


def test_classifier_starts_in_train_mode(tiny_bert_path):
    module = TextClassifier(tiny_bert_path, num_labels=NUM_LABELS)
    assert module.model.training
    assert all(submodule.training for submodule in module.model.modules())


def test_filler_rows_excluded_from_loss(tiny_bert_path):
    module = TextClassifier(tiny_bert_path, num_labels=NUM_LABELS).eval()
    batch = {
        "input_ids": torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0], [101, 2003, 2004, 102]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]),
        "labels": torch.tensor([3, 5, 7]),
        "bucket": torch.tensor([0, 0, 0]),
        "example_index": torch.tensor([10, 11, 10]),
        "valid": torch.tensor([True, True, False]),
    }
    with torch.no_grad():
        loss, logits, labels, metadata = module._shared_step(batch)
        expected = F.cross_entropy(
            module(input_ids=batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2]),
            batch["labels"][:2],
        )

    torch.testing.assert_close(loss, expected)
    assert logits.shape == (2, NUM_LABELS)
    assert labels.tolist() == [3, 5]
    assert metadata["example_index"].tolist() == [10, 11]


def test_metrics_per_bucket(tiny_bert_path, tokenizer, shared_data):
    datamodule = BucketingDataModule(
        tokenizer=tokenizer,
        data_files={"train": str(shared_data / "banking77" / "train.csv"), "test": str(shared_data / "banking77" / "test.csv")},
        label_column="category",
        max_length=64,
        num_buckets=3,
        batch_size=32,
        max_train_examples=600,
        max_eval_examples=300,
    )
    module = TextClassifier(tiny_bert_path, num_labels=datamodule.num_labels)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]

    buckets = len(datamodule.bucket_boundaries)
    assert buckets >= 2
    counts = [results[f"test_examples/bucket_{b}"] for b in range(buckets)]
    assert sum(counts) == 300
    assert min(counts) > 0
    # The overall accuracy is the example-weighted mean of the per-bucket accuracies.
    weighted = sum(results[f"test_accuracy/bucket_{b}"] * counts[b] for b in range(buckets)) / 300
    assert results["test_accuracy"] == pytest.approx(weighted, abs=1e-5)
    assert 0.0 <= results["test_f1"] <= 1.0


def test_filler_only_batch_skipped(tiny_bert_path):
    # Under DDP the last evaluation step of a rank can hold only filler duplicates.
    module = TextClassifier(tiny_bert_path, num_labels=NUM_LABELS).eval()
    batch = {
        "input_ids": torch.tensor([[101, 2000, 102], [101, 2001, 102]]),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "labels": torch.tensor([1, 2]),
        "bucket": torch.tensor([0, 0]),
        "example_index": torch.tensor([4, 5]),
        "valid": torch.tensor([False, False]),
    }
    with torch.no_grad():
        module.validation_step(batch, 0)
        module.test_step(batch, 0)

    assert module.val_accuracy.update_count == 0
    assert module.test_accuracy.update_count == 0
