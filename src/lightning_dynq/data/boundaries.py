"""Bucket boundaries: estimate them from sequence lengths and assign each example to a bucket.

A boundary list ``[b_0, b_1, ..., b_{k-1}]`` is strictly increasing. Bucket ``i`` contains the
examples with ``b_{i-1} < length <= b_i`` (``b_{-1} = 0``), so ``b_i`` is the longest sequence the
bucket can contain. A length above ``b_{k-1}`` is an overflow, assigned the bucket index ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

BoundaryStrategy = Literal["quantile", "token_mass", "ladder"]
BOUNDARY_STRATEGIES = ("quantile", "token_mass", "ladder")


def validate_boundaries(boundaries: Sequence[int]) -> list[int]:
    """Return ``boundaries`` as a list of ints, raising ``ValueError`` unless they are positive and strictly increasing."""
    values = [int(b) for b in boundaries]
    if not values:
        raise ValueError("bucket_boundaries is empty; pass at least one maximum length, for example [32, 64, 128].")
    if values[0] < 1 or any(later <= earlier for earlier, later in zip(values, values[1:])):
        raise ValueError(f"bucket_boundaries must be positive and strictly increasing, got {values}.")
    return values


def snap_to_multiple(boundaries: Sequence[int], multiple: int) -> list[int]:
    """Round each boundary up to a multiple of ``multiple`` and remove the duplicates this creates."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}.")
    snapped = sorted({int(-(-b // multiple) * multiple) for b in boundaries})
    return snapped


def quantile_boundaries(lengths: np.ndarray, num_buckets: int) -> list[int]:
    """Estimate boundaries that put about the same number of examples in each of ``num_buckets`` buckets.

    Equal lengths cannot be split, so fewer buckets come back when the length distribution has
    fewer distinct values than ``num_buckets``. The last boundary is always the maximum length.

    Example::

        >>> quantile_boundaries(np.array([1, 2, 3, 4, 5, 6, 7, 8]), 4)
        [2, 4, 6, 8]
    """
    lengths = _check_lengths(lengths)
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}.")

    fractions = np.arange(1, num_buckets) / num_buckets
    cuts = np.quantile(lengths, fractions, method="inverted_cdf") if num_buckets > 1 else np.array([])
    return sorted({int(c) for c in cuts} | {int(lengths.max())})


def token_mass_boundaries(lengths: np.ndarray, num_buckets: int) -> list[int]:
    """Estimate boundaries that put about the same number of tokens (sum of lengths) in each bucket.

    Compared with :func:`quantile_boundaries`, long sequences get narrower buckets, which lowers
    the padding where most of the compute goes.

    Example::

        >>> token_mass_boundaries(np.array([1, 1, 1, 1, 2, 2, 4, 8]), 2)
        [4, 8]
    """
    lengths = _check_lengths(lengths)
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}.")

    ordered = np.sort(lengths)
    cumulative = np.cumsum(ordered, dtype=np.float64)
    targets = cumulative[-1] * np.arange(1, num_buckets) / num_buckets
    positions = np.searchsorted(cumulative, targets, side="left")
    cuts = ordered[np.minimum(positions, len(ordered) - 1)]
    return sorted({int(c) for c in cuts} | {int(ordered[-1])})


def ladder_boundaries(max_length: int, multiple: int) -> list[int]:
    """Return every multiple of ``multiple`` up to the first one that is ``>= max_length``.

    Example::

        >>> ladder_boundaries(40, 16)
        [16, 32, 48]
    """
    if multiple < 1 or max_length < 1:
        raise ValueError(f"ladder_boundaries needs max_length >= 1 and multiple >= 1, got {max_length} and {multiple}.")
    top = -(-max_length // multiple) * multiple
    return list(range(multiple, top + 1, multiple))


def estimate_boundaries(
    lengths: np.ndarray,
    strategy: BoundaryStrategy = "quantile",
    num_buckets: int = 4,
    multiple: int | None = None,
    sample_size: int | None = 100_000,
    seed: int = 0,
    max_length: int | None = None,
) -> list[int]:
    """Estimate bucket boundaries from ``lengths`` with one of the :data:`BOUNDARY_STRATEGIES`.

    Args:
        lengths: token count of every example (1-D integer array).
        strategy: ``"quantile"`` (equal example counts), ``"token_mass"`` (equal token counts) or
            ``"ladder"`` (every multiple of ``multiple`` up to the maximum length).
        num_buckets: target number of buckets for ``quantile`` and ``token_mass``.
        multiple: with ``ladder``, the step of the ladder (required). With the other strategies,
            each boundary is rounded up to this multiple (for example 8 for tensor cores).
        sample_size: above this many lengths, estimate from a random sample of this size, seeded
            by ``seed``. The maximum length is always taken from all lengths. ``None`` uses all.
        seed: seed of the sample.
        max_length: last boundary, when it must cover more than ``lengths`` (for example the
            longest sequence of every split, while the other boundaries come from the train split).

    Raises:
        ValueError: unknown strategy, empty lengths, or ``ladder`` without ``multiple``.
    """
    lengths = _check_lengths(lengths)
    if strategy not in BOUNDARY_STRATEGIES:
        raise ValueError(f"Unknown boundary strategy {strategy!r}; expected one of {BOUNDARY_STRATEGIES}.")

    max_length = max(int(lengths.max()), max_length or 0)
    if strategy == "ladder":
        if multiple is None:
            raise ValueError("The 'ladder' boundary strategy needs a step; set boundary_multiple (for example 16).")
        return ladder_boundaries(max_length, multiple)

    sample = lengths
    if sample_size is not None and len(lengths) > sample_size:
        rng = np.random.default_rng(seed)
        sample = lengths[rng.choice(len(lengths), size=sample_size, replace=False)]

    estimator = quantile_boundaries if strategy == "quantile" else token_mass_boundaries
    boundaries = estimator(sample, num_buckets)
    boundaries = sorted(set(boundaries[:-1]) | {max_length}) if boundaries[-1] < max_length else boundaries
    if multiple is not None:
        boundaries = snap_to_multiple(boundaries, multiple)
    return boundaries


def assign_buckets(lengths: np.ndarray, boundaries: Sequence[int]) -> np.ndarray:
    """Return the bucket index of every length; lengths above the last boundary get ``len(boundaries)``."""
    return np.searchsorted(np.asarray(boundaries), np.asarray(lengths), side="left").astype(np.int64)


def merge_small_buckets(lengths: np.ndarray, boundaries: Sequence[int], min_examples: int) -> list[int]:
    """Merge every bucket holding fewer than ``min_examples`` examples into a neighbour.

    A small bucket joins the next longer bucket (its boundary is removed), except the last bucket,
    which joins the next shorter one. Merging repeats from the shortest bucket until every bucket
    is large enough or a single bucket is left. Overflow lengths are not counted.

    Example::

        >>> merge_small_buckets(np.array([1, 1, 1, 5, 9, 9, 9]), [2, 6, 10], min_examples=2)
        [2, 10]
    """
    merged = validate_boundaries(boundaries)
    counts = np.bincount(assign_buckets(lengths, merged), minlength=len(merged) + 1)[: len(merged)].tolist()

    index = 0
    while len(merged) > 1 and index < len(merged):
        if counts[index] >= min_examples:
            index += 1
            continue
        small_count = counts.pop(index)
        if index < len(merged) - 1:
            counts[index] += small_count
            merged.pop(index)
        else:
            counts[index - 1] += small_count
            merged.pop(index - 1)
            index = max(index - 2, 0)
    return merged


def _check_lengths(lengths: np.ndarray) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or len(lengths) == 0:
        raise ValueError(f"lengths must be a non-empty 1-D array, got shape {lengths.shape}.")
    return lengths
