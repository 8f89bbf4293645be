"""Padding and shape statistics of a bucket plan, computed without loading a model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lightning_dynq.data.plan import decode_rows


def padding_statistics(
    lengths: np.ndarray,
    batches: Sequence[np.ndarray],
    padded_length: Callable[[int, int], int],
    buckets: np.ndarray,
) -> dict[str, Any]:
    """Count real and padded tokens of ``batches`` (arrays of encoded plan entries).

    Args:
        lengths: token count of every row.
        batches: encoded rows of each batch. Filler duplicates count as padding.
        padded_length: ``(longest, bucket) -> padded length``, as the collator computes it.
        buckets: bucket index of every row.

    Returns:
        ``real_tokens``, ``padded_tokens`` (batch size x padded length, summed), ``real_token_share``
        and ``shapes`` (sorted distinct ``(batch size, padded length)`` pairs).
    """
    real = 0
    padded = 0
    shapes = set()
    for batch in batches:
        rows, valid = decode_rows(batch)
        batch_lengths = lengths[rows]
        width = padded_length(int(batch_lengths.max()), int(buckets[rows].max()))
        real += int(batch_lengths[valid].sum())
        padded += width * len(rows)
        shapes.add((len(rows), width))
    return {
        "real_tokens": real,
        "padded_tokens": padded,
        "real_token_share": real / padded if padded else 0.0,
        "shapes": sorted(shapes),
    }


def random_batches(num_rows: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Split a seeded permutation of ``num_rows`` rows into batches of ``batch_size`` (the baseline without buckets)."""
    order = np.random.default_rng(seed).permutation(num_rows)
    return [order[start : start + batch_size] for start in range(0, num_rows, batch_size)]


def bucket_table(lengths: np.ndarray, buckets: np.ndarray, boundaries: Sequence[int], batch_sizes: Sequence[int]) -> list[dict[str, int]]:
    """Return one row per bucket: boundary, batch size, examples and tokens in it."""
    table = []
    for index, boundary in enumerate(boundaries):
        members = buckets == index
        table.append({
            "bucket": index,
            "max_length": int(boundary),
            "batch_size": int(batch_sizes[index]),
            "examples": int(members.sum()),
            "tokens": int(lengths[members].sum()),
        })
    return table


def format_data_report(report: dict[str, Any] | Any) -> str:
    """Render a :func:`lightning_dynq.datamodule.data_report` dict as a plain-text table.

    ``report`` may also be an object with a ``report()`` method returning that dict, such as a
    ``BucketingDataModule``. Its report is built first.
    """
    if not isinstance(report, dict):
        report = report.report()

    lines = [
        f"bucket boundaries: {report['bucket_boundaries']}",
        (
            f"training rows sorted by length in windows of {report['sort_window']} batches"
            if report["sort_window"] > 1
            else "training rows not sorted by length (sort_window 0 or 1)"
        ),
        f"overflow ({report['overflow_policy']}): {report['overflow']}",
    ]
    for split, stats in report["splits"].items():
        lines.append("")
        lines.append(f"{split}: {stats['examples']} examples, {stats['tokens']} tokens, {stats['steps']} batches per epoch")
        lines.append(f"  {'bucket':>6} {'max_len':>7} {'batch':>5} {'examples':>8} {'tokens':>9}")
        for row in stats["buckets"]:
            lines.append(
                f"  {row['bucket']:>6} {row['max_length']:>7} {row['batch_size']:>5} {row['examples']:>8} {row['tokens']:>9}"
            )
        lines.append(f"  distinct shapes: {len(stats['shapes'])} {stats['shapes'][:8]}{' ...' if len(stats['shapes']) > 8 else ''}")
        lines.append(
            f"  real-token share: bucketed {stats['real_token_share']:.3f}, "
            f"random batches (same mean batch size, {stats['random_batch_size']}) {stats['random_real_token_share']:.3f}"
        )
    return "\n".join(lines)
