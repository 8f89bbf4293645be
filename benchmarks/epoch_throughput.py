"""Real tokens per second of a training epoch: bucketed batches vs random batches vs length-grouped batches.

Run from the repository root: ``python -m benchmarks.epoch_throughput [--datasets bbc_news,banking77] [--timed-batches 8]``.

All three samplers see the same training examples, tokenized by the MiniLM tokenizer with the same
``max_length``, at the same batch size:

- bucketed: ``BucketingDataModule.train_dataloader()`` (``--num-buckets`` buckets with equal token
  counts, ``boundary_strategy="token_mass"``, batches padded to their longest member);
- random: a seeded random permutation cut into batches, each padded to its longest member;
- length-grouped: ``transformers.trainer_pt_utils.LengthGroupedSampler`` over the token lengths,
  cut into batches the same way.

The real-token share counts every batch of the epoch. The epoch time is estimated from
``--timed-batches`` batches per sampler, taken at evenly spaced quantiles of padded batch size
(batch x length), each timed as one fp32 training step of the pretrained all-MiniLM-L6-v2
classifier (forward, backward, AdamW step). The samplers
take turns batch by batch, so load from other processes affects all of them alike. Tokens per
second = real tokens of the epoch / (mean step time x batches in the epoch).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from benchmarks.harness import BANKING77, MINILM, REPO_ROOT, fix_threads, machine_line, minilm_classifier, print_table, save_results
from benchmarks.train_step import train_step
from lightning_dynq.datamodule import BucketingDataModule

DATASETS = {
    # name: (DataModule arguments, batch size, max_length, number of classes)
    "bbc_news": ({"dataset": "bbc_news", "text_column": "text", "label_column": "label"}, 8, 512, 5),
    "banking77": ({"data_files": {"train": str(BANKING77 / "train.csv")}, "text_column": "text", "label_column": "category"}, 16, 128, 77),
}


def load_bbc_news():
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    from bbc_news import load_bbc_news as load

    return load()


def pad_batch(token_ids: list[list[int]], labels: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(token_ids), width, dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels)}


def index_batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def epoch_batches(name: str, seed: int, num_buckets: int) -> tuple[dict[str, list[dict[str, torch.Tensor]]], int]:
    """Return the batches of one epoch for each sampler, and the number of classes."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    settings, batch_size, max_length, num_labels = DATASETS[name]
    settings = dict(settings)
    if settings.get("dataset") == "bbc_news":
        settings["dataset"] = load_bbc_news
    datamodule = BucketingDataModule(
        MINILM, max_length=max_length, batch_size=batch_size, validation_fraction=0.0, seed=seed,
        num_buckets=num_buckets, boundary_strategy="token_mass", **settings,
    )
    datamodule.setup("fit")
    bucketed = [{k: batch[k] for k in ("input_ids", "attention_mask", "labels")} for batch in datamodule.train_dataloader()]

    train = datamodule.raw_splits["train"]
    encoded = datamodule.tokenizer(list(train[settings["text_column"]]), truncation=True, max_length=max_length)["input_ids"]
    labels = list(train[settings["label_column"]])
    lengths = [len(ids) for ids in encoded]
    pad_id = datamodule.tokenizer.pad_token_id

    random_order = np.random.default_rng(seed).permutation(len(encoded)).tolist()
    grouped_order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
    batches = {"bucketed": bucketed}
    for sampler, order in (("random", random_order), ("length-grouped", grouped_order)):
        batches[sampler] = [
            pad_batch([encoded[i] for i in chunk], [labels[i] for i in chunk], pad_id) for chunk in index_batches(order, batch_size)
        ]
    real = {sampler: sum(int(b["attention_mask"].sum()) for b in items) for sampler, items in batches.items()}
    if len(set(real.values())) != 1:
        raise RuntimeError(f"The samplers saw different real token counts {real}: they must cover the same examples.")
    return batches, num_labels


def measure(name: str, args) -> list[dict]:
    batches, num_labels = epoch_batches(name, args.seed, args.num_buckets)
    step_times: dict[str, list[float]] = {sampler: [] for sampler in batches}
    if args.timed_batches > 0:
        model = minilm_classifier(num_labels).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for items in batches.values():
            train_step(model, optimizer, items[0], qat=False)

    # Timed batch k is the one at quantile (k + 0.5) / timed_batches of the sampler's batches sorted
    # by padded size, so each timed batch represents an equal share of the epoch.
    by_size = {sampler: np.argsort([b["input_ids"].numel() for b in items], kind="stable") for sampler, items in batches.items()}
    for k in range(args.timed_batches):
        for sampler, items in batches.items():
            batch = items[int(by_size[sampler][int((k + 0.5) * len(items) / args.timed_batches)])]
            start = time.perf_counter()
            train_step(model, optimizer, batch, qat=False)
            step_times[sampler].append(time.perf_counter() - start)

    rows = []
    for sampler, items in batches.items():
        real = sum(int(b["attention_mask"].sum()) for b in items)
        padded = sum(b["attention_mask"].numel() for b in items)
        epoch_seconds = float(np.mean(step_times[sampler])) * len(items) if step_times[sampler] else None
        rows.append({
            "dataset": name, "sampler": sampler, "batches": len(items), "real_tokens": real,
            "real_share": real / padded, "epoch_seconds_estimate": epoch_seconds,
            "tokens_per_second": real / epoch_seconds if epoch_seconds else None,
        })
        print(f"  {name} {sampler}: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="bbc_news,banking77", help="comma-separated: bbc_news, banking77")
    parser.add_argument("--timed-batches", type=int, default=8, help="batches timed per sampler, spread over the epoch; 0 reports the real-token shares only")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=42, help="seed of the batch orders")
    parser.add_argument("--num-buckets", type=int, default=8, help="target number of length buckets of the bucketed sampler")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    fix_threads(args.threads)
    print(machine_line(args.threads), flush=True)

    rows = []
    for name in args.datasets.split(","):
        rows += measure(name.strip(), args)
    print()
    table = []
    for row in rows:
        bucketed = next(r for r in rows if r["dataset"] == row["dataset"] and r["sampler"] == "bucketed")
        timed = row["tokens_per_second"] is not None
        table.append([
            row["dataset"], row["sampler"], row["batches"], f"{100 * row['real_share']:.1f}%",
            row["tokens_per_second"] if timed else "-",
            f"{bucketed['tokens_per_second'] / row['tokens_per_second']:.2f}x" if timed else "-",
        ])
    print_table(["dataset", "sampler", "batches", "real tokens", "real tokens/s", "bucketed / this"], table)
    save_results(args.output, {"machine": machine_line(args.threads), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
