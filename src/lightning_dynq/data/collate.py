"""Fetch planned rows from a tokenized split and pad them into a batch of tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import Dataset as TorchDataset

from lightning_dynq.data.plan import decode_rows

Task = Literal["classification", "language_modeling"]
TASKS = ("classification", "language_modeling")

# Metadata keys of a batch, besides the model inputs. Task modules remove them before calling the model.
EXTRA_KEYS = ("bucket", "example_index", "valid")

# Label value that Hugging Face models and `torch.nn.CrossEntropyLoss` ignore.
IGNORE_INDEX = -100


class BucketedSplit(TorchDataset):
    """A tokenized split that returns a whole batch of rows in one Arrow read.

    ``__getitems__`` takes plan entries (see :mod:`lightning_dynq.data.plan`) and returns the
    columns of those rows as lists, with their ``bucket``, ``example_index`` and ``valid`` flags.
    PyTorch's ``DataLoader`` calls it with each batch the batch sampler yields.

    Args:
        split: tokenized split with an ``input_ids`` column.
        buckets: bucket index of every row.
    """

    def __init__(self, split: Dataset, buckets: np.ndarray) -> None:
        if len(split) != len(buckets):
            raise ValueError(f"The split has {len(split)} rows but {len(buckets)} bucket indices were given.")
        self.split = split.with_format(None)
        self.buckets = np.asarray(buckets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, entry: int) -> dict[str, Any]:
        batch = self.__getitems__([entry])
        return {key: values[0] for key, values in batch.items()}

    def __getitems__(self, entries: Sequence[int]) -> dict[str, list]:
        rows, valid = decode_rows(np.asarray(entries))
        columns = self.split[rows.tolist()]
        columns["bucket"] = self.buckets[rows].tolist()
        columns["example_index"] = rows.tolist()
        columns["valid"] = valid.tolist()
        return columns


class BucketCollator:
    """Pad the rows of one batch into tensors a Hugging Face model takes as ``**batch``.

    Output keys: ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the split has them),
    ``labels`` (class ids, or for language modelling a copy of ``input_ids`` with padding set to
    ``-100``), and the :data:`EXTRA_KEYS` ``bucket``, ``example_index`` and ``valid``.

    Args:
        pad_token_id: id written into padded positions of ``input_ids``.
        bucket_lengths: maximum length of each bucket. Longer rows (overflow under the
            ``truncate`` policy) are cut to it.
        task: ``"classification"`` or ``"language_modeling"``.
        pad_to_multiple_of: round the padded length up to this multiple (for example 8).
        static_shapes: pad every batch to its bucket's maximum length, so a bucket always gives
            the same shape.
    """

    def __init__(
        self,
        pad_token_id: int,
        bucket_lengths: Sequence[int],
        task: Task = "classification",
        pad_to_multiple_of: int | None = None,
        static_shapes: bool = False,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
        self.pad_token_id = int(pad_token_id)
        self.bucket_lengths = [int(b) for b in bucket_lengths]
        self.task = task
        self.pad_to_multiple_of = pad_to_multiple_of
        self.static_shapes = static_shapes

    def padded_length(self, longest: int, bucket: int) -> int:
        """Return the sequence length a batch of ``bucket`` whose longest row has ``longest`` tokens is padded to."""
        length = self.bucket_lengths[bucket] if self.static_shapes else longest
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def __call__(self, columns: dict[str, list]) -> dict[str, torch.Tensor]:
        buckets = columns["bucket"]
        limit = max(self.bucket_lengths[b] for b in buckets)
        sequences = [ids[:limit] for ids in columns["input_ids"]]
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        width = self.padded_length(int(lengths.max()), max(buckets))

        attention_mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
        batch = {
            "input_ids": _pad(sequences, width, self.pad_token_id),
            "attention_mask": attention_mask.long(),
        }
        if "token_type_ids" in columns:
            batch["token_type_ids"] = _pad([t[:limit] for t in columns["token_type_ids"]], width, 0)

        if self.task == "language_modeling":
            batch["labels"] = batch["input_ids"].masked_fill(~attention_mask, IGNORE_INDEX)
        elif "labels" in columns:
            batch["labels"] = torch.tensor(columns["labels"], dtype=torch.long)

        batch["bucket"] = torch.tensor(buckets, dtype=torch.long)
        batch["example_index"] = torch.tensor(columns["example_index"], dtype=torch.long)
        batch["valid"] = torch.tensor(columns["valid"], dtype=torch.bool)
        return batch


def _pad(sequences: list[list[int]], width: int, value: int) -> torch.Tensor:
    padded = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return padded
