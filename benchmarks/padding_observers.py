"""Int8 accuracy with padding-aware activation observers (``mask_key``) on and off, on long padding.

Run from the repository root: ``python -m benchmarks.padding_observers [--datasets sms_spam,banking77]``.

Every batch is padded to ``max_length`` (one bucket, ``static_shapes=True``), so most positions
the observers see are padding when texts are short: SMS Spam has a median of 20 tokens, BANKING77
of 13. Each static QAT run of MiniLM trains in float for the first half of the steps while the
observers collect ranges, then with fake quantization, and the observers freeze after three
quarters of the steps. The three runs start from the same seed:

1. padded, ``mask_key="attention_mask"`` (the default): activation observers skip padded positions;
2. padded, ``mask_key=None``: observers take their ranges from every position, padding included;
3. bucketed (4 token-mass buckets, little padding), default mask: the reference of ranges learnt
   on batches with almost no padding.

The table gives the share of real tokens in the training batches, the fake-quant and int8 test
accuracy (test batches padded as in training), and the mean width (max - min) of the observed
activation ranges after training. The settings are printed with the table.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch
from datasets import Dataset, DatasetDict

from benchmarks.harness import (
    BANKING77,
    MINILM,
    REPO_ROOT,
    add_fine_tuning_options,
    machine_line,
    print_table,
    save_results,
    start_fine_tuning_run,
)
from lightning_dynq import DynamicQuantCallback
from lightning_dynq.datamodule import BucketingDataModule
from lightning_dynq.quantization import backend
from lightning_dynq.tasks import TextClassifier

SMS_SPAM = REPO_ROOT.parent / "shared" / "data" / "sms_spam" / "SMSSpamCollection"
RUN_DIR = tempfile.mkdtemp(prefix="lightning_dynq_padding_")
VARIANTS = {
    "padded, observers skip padding": {"padded": True, "mask_key": "attention_mask"},
    "padded, observers see padding": {"padded": True, "mask_key": None},
    "bucketed, observers skip padding": {"padded": False, "mask_key": "attention_mask"},
}


def load_sms_spam() -> DatasetDict:
    """SMS Spam as one table, split into a seeded 80% train and 20% test part."""
    table = Dataset.from_csv(str(SMS_SPAM), sep="\t", quoting=csv.QUOTE_NONE)
    return table.train_test_split(test_size=0.2, seed=0)


DATASETS: dict[str, dict[str, Any]] = {
    "sms_spam": {"dataset": load_sms_spam, "text_column": "SMS", "label_column": "Label"},
    "banking77": {
        "data_files": {"train": str(BANKING77 / "train.csv"), "test": str(BANKING77 / "test.csv")},
        "text_column": "text",
        "label_column": "category",
    },
}


def make_datamodule(name: str, padded: bool, args) -> BucketingDataModule:
    shapes = {"bucket_boundaries": [args.max_length], "static_shapes": True} if padded else {"num_buckets": 4}
    options = DATASETS[name]
    datamodule = BucketingDataModule(
        MINILM, max_length=args.max_length, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        validation_fraction=0.0, seed=args.seed, max_train_examples=args.max_train_examples.get(name),
        max_eval_examples=args.max_test_examples.get(name), **shapes, **options,
    )
    datamodule.setup("fit")
    datamodule.setup("test")
    return datamodule


def real_token_share(datamodule: BucketingDataModule) -> float:
    real = total = 0
    for batch in datamodule.train_dataloader():
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return real / total


def mean_range_width(module: torch.nn.Module) -> float:
    widths = []
    for fake_quant in backend.activation_fake_quants(module):
        observed = backend.observed_range(fake_quant)
        if observed is not None:
            widths.append(float(observed[1] - observed[0]))
    return statistics.fmean(widths)


def run_variant(name: str, padded: bool, mask_key: str | None, test_data: BucketingDataModule, args) -> dict[str, float]:
    pl.seed_everything(args.seed, verbose=False)
    datamodule = make_datamodule(name, padded, args)
    steps = len(datamodule.train_dataloader())
    total_steps = steps * args.epochs
    callback = DynamicQuantCallback(
        mode="static", mask_key=mask_key, fake_quant_start=int(args.fake_quant_start * total_steps),
        freeze_observers_at=max(1, int(0.75 * total_steps)),
        output_dir=f"{RUN_DIR}/{name}_{'padded' if padded else 'bucketed'}_{mask_key}",
    )
    module = TextClassifier(MINILM, num_labels=datamodule.num_labels, learning_rate=args.learning_rate[name])
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[callback], default_root_dir=RUN_DIR,
    )
    trainer.fit(module, datamodule=datamodule)
    # Every variant is tested on the same padded test batches.
    report = callback.test_fake_quant_and_int8(trainer, module, test_data)
    return {
        "real_tokens": real_token_share(datamodule),
        "fake_quant": report["fake_quant"]["overall"]["test_accuracy"],
        "int8": report["int8"]["overall"]["test_accuracy"],
        "range_width": mean_range_width(module),
        "steps": total_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="sms_spam", help="comma-separated: sms_spam, banking77")
    parser.add_argument("--max-length", type=int, default=128, help="every batch is padded to this many tokens")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per run")
    add_fine_tuning_options(
        parser, max_train_examples="sms_spam=1000,banking77=3000", max_test_examples="sms_spam=600,banking77=1000",
        learning_rate="sms_spam=1e-4,banking77=2e-4", fake_quant_start=0.5,
    )
    args = start_fine_tuning_run(parser)

    all_results: dict[str, Any] = {}
    for name in (item.strip() for item in args.datasets.split(",")):
        start = time.perf_counter()
        test_data = make_datamodule(name, True, args)
        results = {}
        for label, variant in VARIANTS.items():
            results[label] = run_variant(name, variant["padded"], variant["mask_key"], test_data, args)
            print(f"  {name} {label}: {results[label]} ({time.perf_counter() - start:.0f} s)", flush=True)
        all_results[name] = results
        print(f"\n{name}: {results[label]['steps']} training steps, test batches padded to {args.max_length} tokens")
        rows = [
            [label, f"{100 * r['real_tokens']:.1f}%", f"{100 * r['fake_quant']:.2f}", f"{100 * r['int8']:.2f}",
             f"{r['range_width']:.2f}"]
            for label, r in results.items()
        ]
        print_table(["variant", "real tokens (train)", "fake-quant acc %", "int8 acc %", "mean activation range width"], rows)
    save_results(args.output, {"machine": machine_line(args.threads), "args": vars(args), "results": all_results})


if __name__ == "__main__":
    main()
