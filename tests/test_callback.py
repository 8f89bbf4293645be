"""DynamicQuantCallback with a real Lightning Trainer, a tiny random BERT and toy models."""

from __future__ import annotations

import json
import types

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from lightning_dynq import DynamicQuantCallback, load_quantized
from lightning_dynq.quantization import backend, boundaries

SHORT, LONG = 6, 12  # lengths at most SHORT are bucket 0, the rest bucket 1


def make_examples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(3, LONG + 1, (1,), generator=generator))
        ids = torch.randint(5, 100, (length,), generator=generator)
        label = int(ids.float().mean() > 52)
        examples.append({"input_ids": ids, "label": label})
    return sorted(examples, key=lambda e: len(e["input_ids"]))


def pad_batch(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros(len(examples), longest, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example["input_ids"])] = example["input_ids"]
        mask[row, : len(example["input_ids"])] = 1
    labels = torch.tensor([e["label"] for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=2
    )
    return BertForSequenceClassification(config)


class BertClassifier(pl.LightningModule):
    """Minimal classification module that logs test metrics overall and per length bucket."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"]))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        bucket = 0 if batch["input_ids"].shape[1] <= SHORT else 1
        self.log("test_accuracy", accuracy)
        self.log(f"test_accuracy/bucket_{bucket}", accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class BucketedData(pl.LightningDataModule):
    bucket_boundaries = [SHORT]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_examples(48, seed=1), batch_size=8, shuffle=True, collate_fn=pad_batch)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_examples(16, seed=2), batch_size=8, collate_fn=pad_batch)

    def test_dataloader(self) -> DataLoader:
        # Sorted by length and batched so that every batch falls in one bucket.
        examples = make_examples(32, seed=3)
        short = [e for e in examples if len(e["input_ids"]) <= SHORT]
        long = [e for e in examples if len(e["input_ids"]) > SHORT]
        return DataLoader(short + long, batch_sampler=[list(range(len(short))), list(range(len(short), 32))],
                          collate_fn=pad_batch)


def make_trainer(tmp_path, callback, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=1,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=[callback], **options)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One short QAT run of the tiny BERT, shared by the tests that inspect its results."""
    tmp_path = tmp_path_factory.mktemp("fit")
    callback = DynamicQuantCallback(freeze_observers_at="1 epochs")
    module = BertClassifier()
    datamodule = BucketedData()
    trainer = make_trainer(tmp_path, callback, max_epochs=2, limit_train_batches=4)
    trainer.fit(module, datamodule=datamodule)
    return types.SimpleNamespace(callback=callback, module=module, trainer=trainer, datamodule=datamodule)


def test_fit_prepares_linears_keeps_embeddings_float(fitted):
    prepared = boundaries(fitted.module)
    # 2 layers x (query, key, value, attention output, intermediate, output) + pooler + classifier
    assert len(prepared) == 14
    assert "model.classifier" in prepared
    assert "model.bert.encoder.layer.1.attention.self.query" in prepared
    assert type(fitted.module.model.bert.embeddings.word_embeddings) is nn.Embedding
    assert type(fitted.module.model.bert.embeddings.LayerNorm) is nn.LayerNorm


def test_optimizer_holds_prepared_parameters(fitted):
    optimizer_ids = {id(p) for group in fitted.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_ids == {id(p) for p in fitted.module.parameters()}
    query = boundaries(fitted.module)["model.bert.encoder.layer.0.attention.self.query"]
    assert id(query.module.weight) in optimizer_ids


def test_fit_converts_copy_to_int8(fitted):
    quantized = fitted.callback.quantized_model
    int8_query = boundaries(quantized)["model.bert.encoder.layer.0.attention.self.query"]
    assert backend.quantized_type_name(int8_query.module) == "torch.ao.nn.quantized.modules.linear.Linear"
    assert float(int8_query.quant.scale) > 0
    # The LightningModule keeps training in fake-quant form.
    qat_query = boundaries(fitted.module)["model.bert.encoder.layer.0.attention.self.query"]
    assert type(qat_query.module).__module__ == "torch.ao.nn.qat.modules.linear"
    # Observers were frozen from epoch 1 on, fake quantization stayed on.
    flags = backend.observer_flags(fitted.module)
    assert flags and all(flags_pair == (False, True) for flags_pair in flags.values())


def test_int8_matches_fake_quant_on_unseen_lengths(fitted):
    module = fitted.module.eval()
    quantized = fitted.callback.quantized_model
    generator = torch.Generator().manual_seed(5)
    for length in (3, 9, 17, 30):  # training lengths were 3..12
        ids = torch.randint(5, 100, (4, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, length // 2 :] = 0
        with torch.no_grad():
            fake_quant_logits = module(ids, mask)
            with backend.quantized_engine("fbgemm"):
                int8_logits = quantized(ids, mask)
        assert int8_logits.shape == (4, 2)
        assert torch.allclose(int8_logits, fake_quant_logits, atol=0.1), (length, int8_logits, fake_quant_logits)


def test_artifacts_written(fitted):
    directory = fitted.callback.artifact_dir
    assert directory == tmp_int8_dir(fitted.trainer)
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["engine"] == "fbgemm"
    assert metadata["mode"] == "static"
    assert metadata["bucket_boundaries"] == [SHORT]
    assert metadata["versions"]["torch"] == torch.__version__
    names = {entry["name"]: entry["type"] for entry in metadata["quantized_modules"]}
    assert names["model.classifier"] == "torch.ao.nn.quantized.modules.linear.Linear"
    report = json.loads((directory / "report.json").read_text())
    assert 0 < report["int8_size_bytes"] < report["fp32_size_bytes"]


def tmp_int8_dir(trainer: pl.Trainer):
    from pathlib import Path

    return Path(trainer.default_root_dir) / "int8"


def test_fake_quant_and_int8_report(fitted):
    before = {k: v.clone() for k, v in fitted.module.state_dict().items()}
    report = fitted.callback.test_fake_quant_and_int8(fitted.trainer, fitted.module, fitted.datamodule)
    for key in ("fake_quant", "int8"):
        assert set(report[key]["overall"]) == {"test_accuracy"}
        assert set(report[key]["per_bucket"]) == {"0", "1"}
        assert 0.0 <= report[key]["per_bucket"]["1"]["test_accuracy"] <= 1.0
    assert abs(report["int8"]["overall"]["test_accuracy"] - report["fake_quant"]["overall"]["test_accuracy"]) <= 0.1
    on_disk = json.loads((fitted.callback.artifact_dir / "report.json").read_text())
    assert on_disk == report
    # Testing changed no weight, observer range or flag, and the QAT modules are back in place.
    after = fitted.module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_validate_leaves_observer_state_unchanged(tmp_path):
    callback = DynamicQuantCallback()
    module = BertClassifier()
    trainer = make_trainer(tmp_path, callback, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule=BucketedData())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flags_before = backend.observer_flags(module)
    assert all(observer for observer, _ in flags_before.values())
    trainer.validate(module, datamodule=BucketedData(), verbose=False)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert backend.observer_flags(module) == flags_before


def test_load_quantized_round_trip(fitted):
    loaded = load_quantized(fitted.callback.artifact_dir, BertClassifier())
    ids = torch.randint(5, 100, (2, 7))
    mask = torch.ones_like(ids)
    with backend.quantized_engine("fbgemm"):
        assert torch.equal(loaded(ids, mask), fitted.callback.quantized_model(ids, mask))


def test_load_quantized_errors(fitted, tmp_path):
    with pytest.raises(FileNotFoundError, match="Missing model.pt"):
        load_quantized(tmp_path, BertClassifier())
    with pytest.raises(ValueError, match="not in the model"):
        load_quantized(fitted.callback.artifact_dir, nn.Sequential(nn.Linear(4, 4)))


# ----------------------------------------------------------------------------------------------
# Toy models for schedule, lazy modules and errors


class ToyModule(pl.LightningModule):
    def __init__(self, unused_layer: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.unused = nn.Linear(4, 4) if unused_layer else None
        self.events: list[tuple[int, bool, bool]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        fake_quant = backend.activation_fake_quants(self.net)[0]
        self.events.append((self.global_step, bool(fake_quant.fake_quant_enabled[0]), bool(fake_quant.observer_enabled[0])))
        return self.net(batch).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(16, 4), batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_schedule_steps_and_epochs(tmp_path):
    callback = DynamicQuantCallback(fake_quant_start=2, freeze_observers_at="1 epochs")
    module = ToyModule()
    make_trainer(tmp_path, callback, max_epochs=2).fit(module)
    assert module.events == [
        (0, False, True), (1, False, True), (2, True, True), (3, True, True),
        (4, True, False), (5, True, False), (6, True, False), (7, True, False),
    ]
    schedule_state = {key: value for key, value in callback.state_dict().items() if key != "rng_state"}
    assert schedule_state == {
        "fake_quant_enabled": True, "observers_frozen": True, "bn_frozen": False, "fake_quant_ever_enabled": True
    }


def test_schedule_restored_from_checkpoint(tmp_path):
    callback = DynamicQuantCallback(freeze_observers_at=4)
    trainer = make_trainer(tmp_path, callback, max_epochs=1, enable_checkpointing=True)
    trainer.fit(ToyModule())
    checkpoint = trainer.checkpoint_callback.best_model_path
    resumed_callback = DynamicQuantCallback(freeze_observers_at=4)
    resumed_module = ToyModule()
    make_trainer(tmp_path, resumed_callback, max_epochs=2).fit(resumed_module, ckpt_path=checkpoint)
    assert [event[2] for event in resumed_module.events] == [False] * 4
    assert resumed_callback.state_dict()["observers_frozen"] is True


def test_fake_quant_never_enabled_warns(tmp_path):
    callback = DynamicQuantCallback(fake_quant_start="5 epochs")
    with pytest.warns(UserWarning, match="fake quantization never ran"):
        make_trainer(tmp_path, callback).fit(ToyModule())


class LazyModule(ToyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_configure_model_modules_prepared(tmp_path):
    callback = DynamicQuantCallback()
    module = LazyModule()
    trainer = make_trainer(tmp_path, callback)
    trainer.fit(module)
    assert set(boundaries(module)) == {"net.0", "net.2"}
    optimizer_ids = {id(p) for p in trainer.optimizers[0].param_groups[0]["params"]}
    assert optimizer_ids == {id(p) for p in module.parameters()}
    assert set(boundaries(callback.quantized_model)) == {"net.0", "net.2"}


def test_unmatched_pattern_fails_at_setup(tmp_path):
    module = ToyModule()
    trainer = make_trainer(tmp_path, DynamicQuantCallback(overrides={"decoder.*": None}))
    with pytest.raises(ValueError, match=r"'decoder\.\*' in overrides matches no quantizable module"):
        trainer.fit(module)
    assert module.events == []


def test_unused_module_named_at_convert(tmp_path):
    trainer = make_trainer(tmp_path, DynamicQuantCallback())
    with pytest.raises(RuntimeError, match=r"\['unused'\] never ran during training"):
        trainer.fit(ToyModule(unused_layer=True))


class TunedFSDPStrategy(FSDPStrategy):
    pass


# Lightning rejects strategy="fsdp" on a CPU accelerator when the Trainer is built, so this CPU
# test passes the callback a stand-in Trainer with a real FSDPStrategy object.
@pytest.mark.parametrize("strategy_class", [FSDPStrategy, TunedFSDPStrategy])
def test_sharded_strategy_rejected_at_setup(strategy_class):
    callback = DynamicQuantCallback()
    module = ToyModule()
    trainer = types.SimpleNamespace(strategy=strategy_class())
    with pytest.raises(ValueError, match=f"does not support {strategy_class.__name__}.*strategy='ddp'"):
        callback.setup(trainer, module, stage="fit")
    # Rejected before anything was prepared.
    assert not boundaries(module)


def test_int8_swapped_before_fit_raises():
    with pytest.raises(RuntimeError, match="No int8 model yet"):
        with DynamicQuantCallback().int8_swapped(ToyModule()):
            pass


@pytest.mark.parametrize(
    ("options", "int8_type"),
    [
        ({"mode": "dynamic"}, "torch.ao.nn.quantized.dynamic.modules.linear.Linear"),
        ({"qconfig": "x86"}, "torch.ao.nn.quantized.modules.linear.Linear"),
    ],
)
def test_mode_and_engine_reach_metadata(tmp_path, options, int8_type):
    callback = DynamicQuantCallback(output_dir=str(tmp_path / "artifact"), fuse=False, **options)
    make_trainer(tmp_path, callback).fit(ToyModule())
    metadata = json.loads((tmp_path / "artifact" / "metadata.json").read_text())
    assert metadata["engine"] == callback.recipe.engine
    assert metadata["mode"] == callback.recipe.mode
    assert {entry["type"] for entry in metadata["quantized_modules"]} == {int8_type}
    loaded = load_quantized(tmp_path / "artifact", ToyModule())
    batch = torch.randn(3, 4)
    with backend.quantized_engine(callback.recipe.engine):
        assert torch.equal(loaded.net(batch), callback.quantized_model.net(batch))
