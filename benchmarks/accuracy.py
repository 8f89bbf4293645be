"""Test accuracy per length bucket of MiniLM after fp32 fine-tuning, QAT and post-training quantization.

Run from the repository root: ``python -m benchmarks.accuracy [--datasets bbc_news,banking77] [--max-train-examples ...]``.

For each data set, in one process and with the same ``BucketingDataModule`` settings:

1. fp32: ``TextClassifier`` (pretrained all-MiniLM-L6-v2) fine-tuned without quantization.
2. QAT static and QAT dynamic: the same fine-tuning with ``DynamicQuantCallback(mode=...)``,
   observers frozen after 75% of the steps, or halfway through the fake-quant phase when
   ``--fake-quant-start`` is above 0.5; the int8 model is tested through
   ``test_fake_quant_and_int8``.
3. Post-training quantization of the fp32 model from step 1, with the same quantization package
   (``prepare_model`` with fake quantization off, observation, ``convert_copy``):

   - PTQ static, random calibration: observers see random token ids of one fixed shape
     (``eval_batch_size`` x ``max_length``, full attention mask), the common naive recipe;
   - PTQ static, real calibration: observers see real training batches of every bucket, with the
     padding mask active so padded positions are not observed;
   - PTQ dynamic: int8 weights, activations quantized per batch at run time.

Every run starts from the same seed. The settings of a run are printed with its table.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.epoch_throughput import load_bbc_news
from benchmarks.harness import (
    BANKING77,
    MINILM,
    add_fine_tuning_options,
    machine_line,
    parse_per_dataset,
    print_table,
    save_results,
    start_fine_tuning_run,
)
from lightning_dynq import DynamicQuantCallback
from lightning_dynq.datamodule import BucketingDataModule
from lightning_dynq.quantization import QuantRecipe, backend, convert_copy, padding, prepare_model
from lightning_dynq.tasks import TextClassifier
from lightning_dynq.tasks.common import split_batch

ENGINE = "fbgemm"
# Lightning writes the QAT artifacts (int8/model.pt, report.json, report.md, report.png) here.
RUN_DIR = tempfile.mkdtemp(prefix="lightning_dynq_accuracy_")
DATASETS = {
    "bbc_news": {"dataset": load_bbc_news, "text_column": "text", "label_column": "label"},
    "banking77": {
        "data_files": {"train": str(BANKING77 / "train.csv"), "test": str(BANKING77 / "test.csv")},
        "text_column": "text",
        "label_column": "category",
    },
}


def make_datamodule(name: str, args) -> BucketingDataModule:
    datamodule = BucketingDataModule(
        MINILM, max_length=args.max_length, num_buckets=args.num_buckets, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, validation_fraction=0.0, seed=args.seed,
        max_train_examples=args.max_train_examples.get(name), max_eval_examples=args.max_test_examples.get(name),
        **DATASETS[name],
    )
    datamodule.setup("fit")
    datamodule.setup("test")
    return datamodule


def make_trainer(callbacks: list | None = None, epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks or [], default_root_dir=RUN_DIR,
    )


def measure_accuracy(trainer: pl.Trainer, module: pl.LightningModule, datamodule: BucketingDataModule) -> dict[str, float]:
    trainer.test(module, datamodule=datamodule, verbose=False)
    return accuracy_by_bucket({k: float(v) for k, v in trainer.callback_metrics.items()})


def accuracy_by_bucket(metrics: dict[str, float]) -> dict[str, float]:
    """Return ``{"all": ..., "0": ..., "1": ...}`` from ``test_accuracy`` metric names."""
    result = {"all": metrics["test_accuracy"]}
    for key, value in metrics.items():
        if key.startswith("test_accuracy/bucket_"):
            result[key.rsplit("_", 1)[1]] = value
    return result


def fine_tune(name: str, args, callback: DynamicQuantCallback | None = None) -> tuple[TextClassifier, pl.Trainer, BucketingDataModule]:
    pl.seed_everything(args.seed, verbose=False)
    datamodule = make_datamodule(name, args)
    module = TextClassifier(MINILM, num_labels=datamodule.num_labels, learning_rate=args.learning_rate[name])
    trainer = make_trainer([callback] if callback else None, epochs=args.epochs[name])
    trainer.fit(module, datamodule=datamodule)
    return module, trainer, datamodule


def post_training_quantization(
    module: pl.LightningModule, mode: str, calibration: list[dict[str, torch.Tensor]]
) -> pl.LightningModule:
    """Return an int8 copy of a float LightningModule, calibrated on ``calibration`` batches."""
    prepared = copy.deepcopy(module, {id(module._trainer): None})
    prepare_model(prepared, QuantRecipe(qconfig=ENGINE, mode=mode))
    prepared.eval()
    backend.enable_fake_quant(prepared, False)
    with torch.inference_mode():
        for batch in calibration:
            inputs, _ = split_batch(batch)
            inputs.pop("labels", None)
            padding.set_active_mask(inputs["attention_mask"])
            try:
                prepared(**inputs)
            finally:
                padding.set_active_mask(None)
    return convert_copy(prepared, ENGINE)


def random_calibration(datamodule: BucketingDataModule, args) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.eval_batch_size, args.max_length)
    vocabulary = datamodule.tokenizer.vocab_size
    return [
        {
            "input_ids": torch.randint(1000, vocabulary, shape, generator=generator),
            "attention_mask": torch.ones(shape, dtype=torch.long),
            "token_type_ids": torch.zeros(shape, dtype=torch.long),
        }
        for _ in range(args.calibration_batches)
    ]


def real_calibration(datamodule: BucketingDataModule, args) -> list[dict[str, torch.Tensor]]:
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) == args.calibration_batches:
            break
    return batches


def evaluate_dataset(name: str, args) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    start = time.perf_counter()

    fp32_module, _, datamodule = fine_tune(name, args)
    results["fp32"] = measure_accuracy(make_trainer(), fp32_module, datamodule)
    print(f"  {name} fp32: {results['fp32']} ({time.perf_counter() - start:.0f} s)", flush=True)

    variants = {
        "PTQ static, random fixed-shape calibration": ("static", random_calibration(datamodule, args)),
        "PTQ static, real-batch calibration": ("static", real_calibration(datamodule, args)),
        "PTQ dynamic": ("dynamic", real_calibration(datamodule, args)[:1]),
    }
    for label, (mode, calibration) in variants.items():
        quantized = post_training_quantization(fp32_module, mode, calibration)
        with backend.quantized_engine(ENGINE):
            results[label] = measure_accuracy(make_trainer(), quantized, datamodule)
        print(f"  {name} {label}: {results[label]}", flush=True)

    for mode in ("static", "dynamic"):
        steps = len(make_datamodule(name, args).train_dataloader()) * args.epochs[name]
        freeze_share = max(0.75, (1 + args.fake_quant_start) / 2)
        callback = DynamicQuantCallback(
            qconfig=ENGINE, mode=mode, fake_quant_start=int(args.fake_quant_start * steps),
            freeze_observers_at=max(1, int(freeze_share * steps)), output_dir=f"{RUN_DIR}/{name}_{mode}/int8",
        )
        module, trainer, datamodule = fine_tune(name, args, callback)
        report = callback.test_fake_quant_and_int8(trainer, module, datamodule)
        for variant in ("fake_quant", "int8"):
            metrics = dict(report[variant]["overall"])
            metrics.update({f"{k}/bucket_{b}": v["test_accuracy"] for b, v in report[variant]["per_bucket"].items() for k in ["test_accuracy"]})
            label = f"QAT {mode} {'int8' if variant == 'int8' else 'fake-quant'}"
            results[label] = accuracy_by_bucket(metrics)
            print(f"  {name} {label}: {results[label]} ({time.perf_counter() - start:.0f} s)", flush=True)

    results["_settings"] = {
        "bucket_boundaries": datamodule.bucket_boundaries,
        "train_examples": len(datamodule.raw_splits["train"]),
        "test_examples": len(datamodule.raw_splits["test"]),
        "train_batches": len(datamodule.train_dataloader()),
        "seconds": time.perf_counter() - start,
    }
    return results


def print_results(name: str, results: dict[str, Any]) -> None:
    settings = results["_settings"]
    print(
        f"\n{name}: {settings['train_examples']} training examples ({settings['train_batches']} batches), "
        f"{settings['test_examples']} test examples, bucket boundaries {settings['bucket_boundaries']}, "
        f"{settings['seconds']:.0f} s"
    )
    buckets = [str(i) for i in range(len(settings["bucket_boundaries"]))]
    fp32 = results["fp32"]
    header = ["variant", "all"] + [f"bucket {b} (<= {settings['bucket_boundaries'][int(b)]})" for b in buckets]
    rows = []
    for label, accuracy in results.items():
        if label.startswith("_"):
            continue
        cells = [label]
        for key in ["all"] + buckets:
            value = accuracy.get(key)
            if value is None:
                cells.append("-")
            elif label == "fp32":
                cells.append(f"{100 * value:.2f}")
            else:
                cells.append(f"{100 * value:.2f} ({100 * (value - fp32[key]):+.2f})")
        rows.append(cells)
    print_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="bbc_news,banking77", help="comma-separated: bbc_news, banking77")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text after truncation")
    parser.add_argument("--num-buckets", type=int, default=4, help="target number of length buckets")
    parser.add_argument("--epochs", type=parse_per_dataset, default=parse_per_dataset("bbc_news=1,banking77=1"),
                        help="training epochs per data set, such as bbc_news=1,banking77=3")
    parser.add_argument("--calibration-batches", type=int, default=16, help="batches observed by static PTQ")
    add_fine_tuning_options(
        parser, max_train_examples="bbc_news=600,banking77=3000", max_test_examples="",
        learning_rate="bbc_news=1e-4,banking77=2e-4", fake_quant_start=0.0,
    )
    args = start_fine_tuning_run(parser)

    all_results = {}
    for name in args.datasets.split(","):
        all_results[name] = evaluate_dataset(name.strip(), args)
        print_results(name.strip(), all_results[name])
    save_results(args.output, {"machine": machine_line(args.threads), "args": {k: v for k, v in vars(args).items()}, "results": all_results})


if __name__ == "__main__":
    main()
