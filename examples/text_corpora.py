"""Load real English text that is already on the machine as a ``DatasetDict`` for language modelling.

Two sources, both without any download from a model or data hub:

- :func:`load_stdlib_docstrings`: paragraphs of the docstrings in the Python standard library's
  source files. Every CPython installation has them, so CI needs nothing extra. The text
  depends on the Python version (the figures in ``docs/llm.md`` used CPython 3.11.7).
- :func:`load_fortunes`: the quotations of the Debian ``fortunes`` package
  (``apt-get install fortunes``), read from ``/usr/share/games/fortunes``.

Both return ``train`` and ``test`` splits with a ``text`` column (and a ``source`` column naming
the file a text came from). The split is by source file, decided by a hash of its name, so it
does not change between runs and no paragraph of a test file is seen in training.

Use them from a DataModule configuration as ``dataset: examples/text_corpora.py:load_stdlib_docstrings``.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset, DatasetDict

# Folders of the standard library that contain test suites: their docstrings describe test cases,
# not the library, and some of their files are deliberately invalid Python.
_TEST_FOLDERS = {"test", "tests", "idle_test", "__pycache__"}

FORTUNES_FOLDER = Path("/usr/share/games/fortunes")


@functools.lru_cache(maxsize=4)
def load_stdlib_docstrings(test_percent: int = 10, min_words: int = 8) -> DatasetDict:
    """Read the docstring paragraphs of the standard library and split them into ``train`` and ``test``.

    Parsing the library takes a few seconds, so the result is cached per process: a Trainer
    loads the data again for every stage it runs (fit, then test of fake quant and of int8).

    Module, class and function docstrings are split at blank lines. A paragraph with a doctest
    (``>>>``) or fewer than ``min_words`` words is dropped, so is a paragraph seen before (many
    methods share docstrings such as "Return self==value.").

    Args:
        test_percent: share of the source files, in percent, whose paragraphs form the test split.
        min_words: minimum number of words of a kept paragraph.

    Raises:
        FileNotFoundError: the standard library's source files are not installed (some minimal
            Python distributions ship only compiled files).
    """
    _check_test_percent(test_percent)
    records: list[tuple[str, str]] = []
    seen: set[str] = set()
    for module_name, path in _stdlib_source_files():
        for paragraph in _docstring_paragraphs(path):
            if paragraph in seen or ">>>" in paragraph or len(paragraph.split()) < min_words:
                continue
            seen.add(paragraph)
            records.append((module_name, paragraph))

    if not records:
        raise FileNotFoundError(
            f"No docstrings found in the standard library of {sys.executable}: its .py source files are missing. "
            "Install the Python source files or use load_fortunes."
        )
    return _split_by_source(records, test_percent)


def load_fortunes(test_percent: int = 10, min_words: int = 8) -> DatasetDict:
    """Read the quotations of the Debian ``fortunes`` package and split them into ``train`` and ``test``.

    Each fortune file contains quotations separated by lines with a single ``%``. Files under
    ``off/`` (the offensive collection of ``fortunes-off``) are not read.

    Args:
        test_percent: share of the fortune files, in percent, whose quotations form the test split.
        min_words: minimum number of words of a kept quotation.

    Raises:
        FileNotFoundError: the ``fortunes`` package is not installed.
    """
    _check_test_percent(test_percent)
    files = sorted(path for path in FORTUNES_FOLDER.glob("*") if path.is_file() and not path.suffix)
    if not files:
        raise FileNotFoundError(
            f"No fortune files found in {FORTUNES_FOLDER}. Install them with `apt-get install fortunes`."
        )

    records: list[tuple[str, str]] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for quotation in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            quotation = quotation.strip()
            if len(quotation.split()) >= min_words:
                records.append((path.name, quotation))
    return _split_by_source(records, test_percent)


def _check_test_percent(test_percent: int) -> None:
    if not 0 < test_percent < 100:
        raise ValueError(f"test_percent must be between 1 and 99, got {test_percent}.")


def _stdlib_source_files() -> Iterator[tuple[str, Path]]:
    """Yield (module name, source path) for every public standard-library module, sorted by name.

    Modules are located with :func:`importlib.util.find_spec` and never imported, because
    importing some of them has side effects (``antigravity`` opens a web browser).
    """
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_"):
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue  # built into the interpreter, or a compiled extension module
        origin = Path(spec.origin)
        if not spec.submodule_search_locations:
            yield name, origin
            continue
        package_folder = origin.parent
        for path in sorted(package_folder.rglob("*.py")):
            relative = path.relative_to(package_folder)
            if _TEST_FOLDERS.intersection(relative.parts[:-1]):
                continue
            yield ".".join((name, *relative.with_suffix("").parts)), path


def _docstring_paragraphs(path: Path) -> Iterator[str]:
    """Yield the blank-line separated paragraphs of every docstring in one source file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return  # a few library files are templates or use another encoding
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        for paragraph in re.split(r"\n\s*\n", docstring):
            yield " ".join(paragraph.split())


def _split_by_source(records: list[tuple[str, str]], test_percent: int) -> DatasetDict:
    """Put every record of a source into ``test`` when the CRC-32 of the source name falls below ``test_percent``."""
    splits: dict[str, dict[str, list[str]]] = {
        "train": {"text": [], "source": []},
        "test": {"text": [], "source": []},
    }
    for source, text in records:
        split = "test" if zlib.crc32(source.encode()) % 100 < test_percent else "train"
        splits[split]["text"].append(text)
        splits[split]["source"].append(source)
    return DatasetDict({name: Dataset.from_dict(columns) for name, columns in splits.items()})


if __name__ == "__main__":
    for loader in (load_stdlib_docstrings, load_fortunes):
        try:
            corpus = loader()
        except FileNotFoundError as error:
            print(f"{loader.__name__}: {error}")
            continue
        print(f"{loader.__name__}: {corpus}")
        print("first test text:", corpus["test"][0]["text"])
