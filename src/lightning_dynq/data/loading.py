"""Load raw datasets, encode labels, tokenize, and compute token lengths."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightning_dynq.paths import resolve_path

log = logging.getLogger(__name__)

DataFiles = Union[str, Sequence[str], Mapping[str, Union[str, Sequence[str]]]]

# File extension -> (`datasets` builder name, extra builder arguments).
FILE_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}

# Token lengths by dataset fingerprint. `datasets` gives every transformed dataset a new fingerprint.
_LENGTH_CACHE: dict[str, np.ndarray] = {}


def load_tokenizer(tokenizer: str | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a Hugging Face Hub name, a local folder or a ``pkg://`` location.

    A path ending in ``.gguf`` loads the tokenizer stored in that GGUF file (needs the ``gguf``
    package). A tokenizer object passes through. A tokenizer without a padding token (GPT-2
    style) gets its end-of-sequence token as padding token.
    """
    if isinstance(tokenizer, str):
        location = resolve_path(tokenizer)
        if location.endswith(".gguf"):
            folder, _, file_name = location.rpartition("/")
            tokenizer = AutoTokenizer.from_pretrained(folder or ".", gguf_file=file_name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(location)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer {tokenizer.name_or_path!r} has neither a padding nor an end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_raw_dataset(
    dataset: str | Dataset | DatasetDict | Callable[[], Dataset | DatasetDict] | None = None,
    data_files: DataFiles | None = None,
    dataset_config_name: str | None = None,
) -> DatasetDict:
    """Load a dataset as a ``DatasetDict``.

    Args:
        dataset: one of
            - a Hugging Face Hub name (``"banking77"``), loaded with ``datasets.load_dataset``;
            - ``"path/to/loader.py:function"`` or ``"package.module:function"``, a function without
              arguments returning a ``Dataset`` or ``DatasetDict``;
            - a ``Dataset``, ``DatasetDict`` or such a function, in Python;
            - ``None`` with ``data_files``.
        data_files: local files, as ``datasets.load_dataset`` takes them. The format comes from the
            extension: csv, tsv, json, jsonl, parquet or txt. A plain file or list becomes ``train``.
        dataset_config_name: configuration name of a Hub dataset.

    Raises:
        ValueError: neither source is given, or the file extension is unknown.
    """
    if dataset is None and data_files is None:
        raise ValueError("Pass a dataset (Hub name, 'file.py:function' or Dataset) or data_files.")

    if dataset is None:
        builder, builder_kwargs = _builder_for_files(data_files)
        loaded = load_dataset(builder, data_files=_normalise_data_files(data_files), **builder_kwargs)
    elif isinstance(dataset, (Dataset, DatasetDict)):
        loaded = dataset
    elif callable(dataset):
        loaded = dataset()
    elif ":" in dataset:
        loaded = _import_function(dataset)()
    else:
        loaded = load_dataset(dataset, dataset_config_name, data_files=data_files)

    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    if not isinstance(loaded, DatasetDict):
        raise TypeError(f"The dataset source {dataset!r} returned {type(loaded).__name__}, expected a Dataset or DatasetDict.")
    return loaded


def carve_validation_split(
    splits: DatasetDict, train_split: str, validation_split: str, fraction: float, seed: int
) -> DatasetDict:
    """Split ``fraction`` of the train split off as the validation split when it is missing, seeded by ``seed``."""
    if validation_split in splits or fraction <= 0:
        return splits
    if train_split not in splits:
        raise ValueError(f"Split {train_split!r} not found; the dataset has splits {list(splits)}.")

    parts = splits[train_split].train_test_split(test_size=fraction, seed=seed, shuffle=True)
    carved = DatasetDict(dict(splits))
    carved[train_split] = parts["train"]
    carved[validation_split] = parts["test"]
    log.info(
        "Split %d of %d train examples off as the %r split (fraction %.3f, seed %d).",
        len(parts["test"]), len(splits[train_split]), validation_split, fraction, seed,
    )
    return carved


def infer_label_names(splits: DatasetDict, label_column: str) -> list[str]:
    """Return the class names: the ``ClassLabel`` names, the sorted distinct strings, or ``"0"..."n-1"`` for integers.

    Raises:
        ValueError: the label column is missing from a split.
    """
    for name, split in splits.items():
        if label_column not in split.column_names:
            raise ValueError(
                f"Label column {label_column!r} not found in split {name!r}; its columns are {split.column_names}. "
                "Set label_column to the right name."
            )

    first = next(iter(splits.values()))
    feature = first.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)

    values = set()
    for split in splits.values():
        values.update(pc.unique(split.data.column(label_column)).to_pylist())
    values.discard(None)
    if all(isinstance(v, str) for v in values):
        return sorted(values)
    return [str(i) for i in range(int(max(values)) + 1)]


def encode_labels(splits: DatasetDict, label_column: str, label_names: list[str]) -> DatasetDict:
    """Cast a string label column to ``ClassLabel(label_names)`` so that labels become class ids."""
    first = next(iter(splits.values()))
    if first.features[label_column].dtype not in ("string", "large_string"):
        return splits
    return splits.cast_column(label_column, ClassLabel(names=label_names))


def tokenize_split(
    split: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    max_length: int,
    label_column: str | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Tokenize ``text_column`` in a batched ``map``, truncating to ``max_length`` tokens.

    Keeps ``input_ids``, ``token_type_ids`` when the tokenizer makes them, and ``labels`` from
    ``label_column``. The attention mask is left out because the collator rebuilds it from lengths.
    """
    if text_column not in split.column_names:
        raise ValueError(
            f"Text column {text_column!r} not found; the columns are {split.column_names}. Set text_column."
        )

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [text if text is not None else "" for text in batch[text_column]]
        encoded = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False)
        features = {"input_ids": encoded["input_ids"]}
        if "token_type_ids" in encoded:
            features["token_type_ids"] = encoded["token_type_ids"]
        if label_column is not None:
            features["labels"] = batch[label_column]
        return features

    return split.map(
        tokenize,
        batched=True,
        remove_columns=split.column_names,
        num_proc=num_proc,
        desc=f"Tokenizing {text_column!r} (max_length={max_length})",
    )


def token_lengths(split: Dataset, column: str = "input_ids") -> np.ndarray:
    """Return the token count of every row, read from the Arrow list offsets without a loop over rows.

    Results are cached by the dataset's fingerprint, so a second call on the same data is free.
    """
    key = f"{split._fingerprint}:{column}"
    cached = _LENGTH_CACHE.get(key)
    if cached is not None:
        return cached

    table = split.with_format("arrow")[:] if split._indices is not None else split.data
    lengths = pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False).astype(np.int64)
    _LENGTH_CACHE[key] = lengths
    return lengths


def select_subset(split: Dataset, max_examples: int | None, seed: int) -> Dataset:
    """Return a seeded random subset of at most ``max_examples`` rows, kept in their original order."""
    if max_examples is None or max_examples >= len(split):
        return split
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(split), size=max_examples, replace=False))
    return split.select(rows.tolist())


def _builder_for_files(data_files: DataFiles) -> tuple[str, dict[str, Any]]:
    if isinstance(data_files, Mapping):
        paths = [p for value in data_files.values() for p in ([value] if isinstance(value, str) else value)]
    else:
        paths = [data_files] if isinstance(data_files, str) else list(data_files)

    extensions = {Path(p).suffix.lower() for p in paths}
    unknown = extensions - FILE_BUILDERS.keys()
    if unknown or len({FILE_BUILDERS[e][0] for e in extensions}) != 1:
        raise ValueError(
            f"Cannot infer one file format from the extensions {sorted(extensions)} of {paths}; "
            f"use files of one format with an extension among {sorted(FILE_BUILDERS)}, "
            "or pass dataset='loader.py:function' for other formats."
        )
    return FILE_BUILDERS[extensions.pop()]


def _normalise_data_files(data_files: DataFiles) -> DataFiles:
    if isinstance(data_files, Mapping):
        return {split: _absolute(files) for split, files in data_files.items()}
    return {"train": _absolute(data_files)}


def _absolute(files: str | Sequence[str]) -> str | list[str]:
    if isinstance(files, str):
        return os.path.abspath(files)
    return [os.path.abspath(f) for f in files]


def _import_function(reference: str) -> Callable[[], Any]:
    """Import ``"path/to/file.py:function"`` or ``"package.module:function"``."""
    module_ref, _, function_name = reference.rpartition(":")
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_file():
            raise FileNotFoundError(f"Loader file {module_ref!r} of dataset {reference!r} not found.")
        spec = importlib.util.spec_from_file_location(f"_dynq_loader_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_ref)

    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{reference!r}: {module_ref!r} has no function {function_name!r}.")
    return function
