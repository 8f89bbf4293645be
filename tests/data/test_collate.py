import numpy as np
import torch
from datasets import Dataset

from lightning_dynq.data import EXTRA_KEYS, IGNORE_INDEX, BucketCollator, BucketedSplit, encode_filler


def sample_split() -> BucketedSplit:
    table = Dataset.from_dict({
        "input_ids": [[101, 5, 102], [101, 5, 6, 7, 102], [101, 9, 9, 9, 9, 9, 9, 102]],
        "token_type_ids": [[0] * 3, [0] * 5, [0] * 8],
        "labels": [2, 0, 1],
    })
    return BucketedSplit(table, np.array([0, 1, 1]))


def test_collator_pads_to_longest_member():
    split = sample_split()
    batch = BucketCollator(pad_token_id=0, bucket_lengths=[4, 8])(split.__getitems__([1, 2]))
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 8]
    assert batch["input_ids"][0, 5:].tolist() == [0, 0, 0]
    assert batch["labels"].tolist() == [0, 1]
    assert batch["bucket"].tolist() == [1, 1]
    assert batch["example_index"].tolist() == [1, 2]
    assert batch["valid"].tolist() == [True, True]
    assert set(EXTRA_KEYS) <= set(batch)


def test_collator_pad_multiple_and_static_shapes():
    split = sample_split()
    columns = split.__getitems__([1])
    assert BucketCollator(0, [4, 8], pad_to_multiple_of=8)(columns)["input_ids"].shape == (1, 8)
    static = BucketCollator(0, [4, 12], static_shapes=True)
    assert static(columns)["input_ids"].shape == (1, 12)
    assert static(split.__getitems__([0]))["input_ids"].shape == (1, 4)


def test_collator_truncates_overflow_to_bucket():
    split = BucketedSplit(sample_split().split, np.array([0, 0, 0]))
    batch = BucketCollator(0, [4])(split.__getitems__([2]))
    assert batch["input_ids"].tolist() == [[101, 9, 9, 9]]


def test_collator_language_modeling_labels():
    batch = BucketCollator(0, [4, 8], task="language_modeling")(sample_split().__getitems__([0, 1]))
    assert batch["labels"][0].tolist() == [101, 5, 102, IGNORE_INDEX, IGNORE_INDEX]
    assert torch.equal(batch["labels"][1], batch["input_ids"][1])


def test_split_marks_filler_rows_invalid():
    entries = [0, int(encode_filler(np.array([2]))[0])]
    batch = BucketCollator(0, [4, 8])(sample_split().__getitems__(entries))
    assert batch["example_index"].tolist() == [0, 2]
    assert batch["valid"].tolist() == [True, False]
