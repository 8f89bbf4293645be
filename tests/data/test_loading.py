import json

import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, DatasetDict

from lightning_dynq.data import (
    carve_validation_split,
    infer_label_names,
    load_raw_dataset,
    token_lengths,
    tokenize_split,
)
from lightning_dynq.data.loading import encode_labels, select_subset

ROWS = [
    {"text": "short one", "label": "b"},
    {"text": "a somewhat longer sentence here", "label": "a"},
    {"text": "third", "label": "c"},
]


def write_files(folder):
    frame = pd.DataFrame(ROWS)
    paths = {
        "csv": folder / "rows.csv",
        "jsonl": folder / "rows.jsonl",
        "json": folder / "rows.json",
        "parquet": folder / "rows.parquet",
        "txt": folder / "rows.txt",
    }
    frame.to_csv(paths["csv"], index=False)
    frame.to_json(paths["jsonl"], orient="records", lines=True)
    paths["json"].write_text(json.dumps(ROWS))
    frame.to_parquet(paths["parquet"])
    paths["txt"].write_text("\n".join(r["text"] for r in ROWS) + "\n")
    return paths


@pytest.mark.parametrize("kind", ["csv", "jsonl", "json", "parquet", "txt"])
def test_load_raw_dataset_local_formats(tmp_path, kind):
    path = write_files(tmp_path)[kind]
    splits = load_raw_dataset(data_files=str(path))
    assert list(splits) == ["train"]
    assert splits["train"]["text"] == [r["text"] for r in ROWS]


def test_load_raw_dataset_split_mapping(tmp_path):
    path = str(write_files(tmp_path)["csv"])
    splits = load_raw_dataset(data_files={"train": path, "test": [path]})
    assert sorted(splits) == ["test", "train"]
    assert len(splits["test"]) == 3


def test_load_raw_dataset_rejects_unknown_extension(tmp_path):
    path = tmp_path / "rows.xml"
    path.write_text("<rows/>")
    with pytest.raises(ValueError, match=r"extension among"):
        load_raw_dataset(data_files=str(path))


def test_load_raw_dataset_from_loader_file(tmp_path):
    loader = tmp_path / "my_loader.py"
    loader.write_text(
        "from datasets import Dataset\n"
        "def build():\n"
        "    return Dataset.from_dict({'text': ['x', 'y'], 'label': [0, 1]})\n"
    )
    splits = load_raw_dataset(f"{loader}:build")
    assert splits["train"]["label"] == [0, 1]


def test_load_raw_dataset_missing_loader_function(tmp_path):
    loader = tmp_path / "my_loader.py"
    loader.write_text("x = 1\n")
    with pytest.raises(ValueError, match="has no function 'build'"):
        load_raw_dataset(f"{loader}:build")


def test_load_raw_dataset_passes_objects_and_callables():
    table = Dataset.from_dict({"text": ["x"], "label": [0]})
    assert load_raw_dataset(table)["train"] is table
    assert len(load_raw_dataset(lambda: DatasetDict({"train": table, "test": table}))) == 2


def test_carve_validation_split_seeded():
    table = Dataset.from_dict({"text": [str(i) for i in range(100)], "label": [0] * 100})
    first = carve_validation_split(DatasetDict({"train": table}), "train", "validation", 0.2, seed=5)
    second = carve_validation_split(DatasetDict({"train": table}), "train", "validation", 0.2, seed=5)
    assert len(first["validation"]) == 20
    assert len(first["train"]) == 80
    assert first["validation"]["text"] == second["validation"]["text"]
    assert not set(first["validation"]["text"]) & set(first["train"]["text"])


def test_carve_validation_split_keeps_existing():
    table = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    splits = DatasetDict({"train": table, "validation": table})
    assert carve_validation_split(splits, "train", "validation", 0.5, seed=0) is splits


def test_label_names_sorted_strings_across_splits():
    splits = DatasetDict({
        "train": Dataset.from_dict({"text": ["x", "y"], "label": ["spam", "ham"]}),
        "test": Dataset.from_dict({"text": ["z"], "label": ["eggs"]}),
    })
    names = infer_label_names(splits, "label")
    assert names == ["eggs", "ham", "spam"]
    encoded = encode_labels(splits, "label", names)
    assert encoded["train"]["label"] == [2, 1]
    assert encoded["test"]["label"] == [0]


def test_label_names_from_class_label_order():
    table = Dataset.from_dict({"text": ["x"], "label": [1]}).cast_column("label", ClassLabel(names=["zeta", "alpha"]))
    assert infer_label_names(DatasetDict({"train": table}), "label") == ["zeta", "alpha"]


def test_label_names_missing_column():
    table = Dataset.from_dict({"text": ["x"], "intent": [1]})
    with pytest.raises(ValueError, match="Label column 'label' not found"):
        infer_label_names(DatasetDict({"train": table}), "label")


def test_tokenize_split_truncates_and_keeps_labels(tokenizer):
    table = Dataset.from_dict({"text": ["hello world", "word " * 100], "label": [1, 0]})
    tokens = tokenize_split(table, tokenizer, "text", max_length=16, label_column="label")
    assert tokens.column_names == ["input_ids", "token_type_ids", "labels"]
    assert token_lengths(tokens).tolist() == [4, 16]
    assert tokens["labels"] == [1, 0]


def test_token_lengths_match_python_after_select(tokenizer):
    table = Dataset.from_dict({"text": [" ".join(["w"] * i) for i in range(1, 40)]})
    tokens = tokenize_split(table, tokenizer, "text", max_length=64).select([5, 1, 30])
    assert token_lengths(tokens).tolist() == [len(ids) for ids in tokens["input_ids"]]
    assert token_lengths(tokens) is token_lengths(tokens)


def test_select_subset_seeded_in_order():
    table = Dataset.from_dict({"text": [str(i) for i in range(50)]})
    subset = select_subset(table, 10, seed=1)
    values = [int(t) for t in subset["text"]]
    assert len(values) == 10
    assert values == sorted(values)
    assert values == [int(t) for t in select_subset(table, 10, seed=1)["text"]]
    assert select_subset(table, None, seed=1) is table
