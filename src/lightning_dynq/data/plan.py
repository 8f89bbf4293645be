"""Batch plans: which rows form each batch, for every rank, in which order.

A plan is a pure function of the bucket of each row, the batch size of each bucket, the seed,
the epoch and the number of ranks, so every rank can build the same plan without talking to
the others. Rows are encoded as ints. A row that is only a filler duplicate, added so that every
rank gets the same number of batches, is encoded as ``-1 - row`` (see :func:`encode_filler`),
and the loss and the metrics must ignore it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np

TailPolicy = Literal["pad", "drop"]
TAIL_POLICIES = ("pad", "drop")


def encode_filler(rows: np.ndarray) -> np.ndarray:
    """Mark ``rows`` as filler duplicates: ``row`` becomes ``-1 - row``."""
    return -1 - np.asarray(rows, dtype=np.int64)


def decode_rows(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rows, valid)`` for encoded plan entries; ``valid`` is False for filler duplicates."""
    encoded = np.asarray(encoded, dtype=np.int64)
    valid = encoded >= 0
    rows = np.where(valid, encoded, -1 - encoded)
    return rows, valid


def batch_sizes_for_buckets(
    padded_lengths: Sequence[int],
    batch_size: int | None = None,
    max_tokens: int | None = None,
    bucket_batch_sizes: Sequence[int] | None = None,
) -> list[int]:
    """Return the batch size of every bucket.

    The first source given wins: ``bucket_batch_sizes`` (one per bucket), then ``max_tokens``,
    then the fixed ``batch_size``. With ``max_tokens``, a bucket gets the largest batch size for
    which ``batch size x padded length <= max_tokens`` at the bucket's longest padded length, so
    no batch of that bucket exceeds ``max_tokens``.

    Raises:
        ValueError: no source is given, a size is below 1, or the list has the wrong length.
    """
    if bucket_batch_sizes is not None:
        sizes = [int(s) for s in bucket_batch_sizes]
        if len(sizes) != len(padded_lengths):
            raise ValueError(
                f"bucket_batch_sizes has {len(sizes)} entries but there are {len(padded_lengths)} buckets "
                f"(padded lengths {list(padded_lengths)}); pass one batch size per bucket."
            )
    elif max_tokens is not None:
        sizes = [max(1, int(max_tokens) // int(length)) for length in padded_lengths]
    elif batch_size is not None:
        sizes = [int(batch_size)] * len(padded_lengths)
    else:
        raise ValueError("Set batch_size, max_tokens or bucket_batch_sizes to size the batches.")

    if min(sizes) < 1:
        raise ValueError(f"Every batch size must be >= 1, got {sizes}.")
    return sizes


def build_train_plan(
    buckets: np.ndarray,
    batch_sizes: Sequence[int],
    seed: int,
    epoch: int,
    num_replicas: int = 1,
    tail: TailPolicy = "pad",
    drop_last: bool = False,
    lengths: np.ndarray | None = None,
    sort_window: int = 0,
) -> list[list[np.ndarray]]:
    """Build the shuffled training plan of one epoch as a list of steps.

    Each step holds ``num_replicas`` batches of the same bucket, one per rank, so all ranks run
    the same shapes in lockstep. Rows are shuffled inside each bucket and the steps are shuffled,
    both from a generator seeded by ``(seed, epoch)``.

    With ``sort_window > 1``, the shuffled rows of each bucket are cut into windows of
    ``sort_window`` batches' worth of rows, and each window is sorted by length (stable, so equal
    lengths keep their shuffled order) before it is cut into batches. A batch then contains rows of
    similar length and pads much less, while the window contents and the step order still change
    every epoch. This is the mega-batch sort of ``group_by_length`` in ``transformers``
    (``get_length_grouped_indices``, 50 batches per mega-batch by default), applied inside each bucket.

    Rows removed by ``drop_last`` or ``tail="drop"`` are taken from the end of the shuffled order
    before sorting, so they are a random sample and not the longest rows of a window.

    Args:
        buckets: bucket index of every row. Rows with a negative index are left out.
        batch_sizes: batch size of every bucket.
        seed: base seed. The same seed, epoch and inputs give the same plan.
        epoch: epoch number, mixed into the seed.
        num_replicas: number of ranks.
        tail: when a bucket's batch count is not a multiple of ``num_replicas``, ``"pad"`` adds
            batches of filler duplicates drawn from the same bucket, ``"drop"`` drops the extra batches.
        drop_last: drop the incomplete last batch of every bucket.
        lengths: token count of every row. Required when ``sort_window > 1``.
        sort_window: batches per sorted window. 0 or 1 turns the sort off.

    Returns:
        ``steps[i][rank]`` is the array of encoded rows of that rank's batch in step ``i``.

    Raises:
        ValueError: unknown ``tail``, negative ``sort_window``, or ``sort_window > 1`` without ``lengths``.
    """
    if tail not in TAIL_POLICIES:
        raise ValueError(f"Unknown tail policy {tail!r}; expected one of {TAIL_POLICIES}.")
    if sort_window < 0:
        raise ValueError(f"sort_window must be >= 0 (0 or 1 turns the sort off), got {sort_window}.")
    sorting = sort_window > 1
    if sorting and lengths is None:
        raise ValueError(f"sort_window={sort_window} sorts by length, so pass lengths (one token count per row).")
    rng = np.random.default_rng([int(seed), int(epoch)])
    buckets = np.asarray(buckets, dtype=np.int64)
    if sorting:
        lengths = np.asarray(lengths, dtype=np.int64)

    steps: list[list[np.ndarray]] = []
    for bucket, rows in enumerate(_rows_by_bucket(buckets, len(batch_sizes))):
        if len(rows) == 0:
            continue
        size = batch_sizes[bucket]
        shuffled = rng.permutation(rows)
        kept, missing = _kept_row_count(len(shuffled), size, num_replicas, tail, drop_last)
        rows = shuffled[:kept]
        if sorting and len(rows):
            rows = _sort_windows(rows, lengths, size * sort_window)
        batches = [rows[start : start + size] for start in range(0, len(rows), size)]

        for _ in range(missing):
            duplicates = rng.choice(shuffled, size=size, replace=len(shuffled) < size)
            batches.append(encode_filler(duplicates))

        steps.extend(batches[start : start + num_replicas] for start in range(0, len(batches), num_replicas))

    order = rng.permutation(len(steps))
    return [steps[i] for i in order]


def _kept_row_count(
    num_rows: int, size: int, num_replicas: int, tail: TailPolicy, drop_last: bool
) -> tuple[int, int]:
    """Return how many shuffled rows of a bucket to keep, and how many filler batches to add."""
    kept = num_rows - num_rows % size if drop_last else num_rows
    num_batches = -(-kept // size)
    missing = -num_batches % num_replicas
    if missing and tail == "drop":
        # The dropped batches include the incomplete last one, so every kept batch is full.
        kept = (num_batches - (num_replicas - missing)) * size
        missing = 0
    return kept, missing


def count_dropped_tail(
    buckets: np.ndarray, batch_sizes: Sequence[int], num_replicas: int, drop_last: bool = False
) -> tuple[int, int]:
    """Return ``(batches, rows)`` that ``tail="drop"`` removes from every epoch of the training plan.

    Batches removed by ``drop_last`` alone are not counted. The counts do not depend on the seed or the epoch.
    """
    buckets = np.asarray(buckets, dtype=np.int64)
    counts = np.bincount(buckets[buckets >= 0], minlength=len(batch_sizes))[: len(batch_sizes)]
    dropped_batches = 0
    dropped_rows = 0
    for count, size in zip(counts.tolist(), batch_sizes):
        padded_kept, _ = _kept_row_count(count, size, num_replicas, "pad", drop_last)
        kept, _ = _kept_row_count(count, size, num_replicas, "drop", drop_last)
        batches_before = -(-padded_kept // size)
        batches_after = -(-kept // size)
        dropped_batches += batches_before - batches_after
        dropped_rows += padded_kept - kept
    return dropped_batches, dropped_rows


def _sort_windows(rows: np.ndarray, lengths: np.ndarray, window: int) -> np.ndarray:
    """Sort each run of ``window`` consecutive rows by length, keeping the order of equal lengths.

    One stable argsort on the key ``window id x (max length + 1) + length`` does it. For 1,000,000
    rows it took 0.17 s against 0.46 s for ``np.lexsort`` on the two keys (numpy 2.4, shared 2-core CPU).
    """
    row_lengths = lengths[rows]
    window_ids = np.arange(len(rows), dtype=np.int64) // window
    keys = window_ids * (int(row_lengths.max()) + 1) + row_lengths
    return rows[np.argsort(keys, kind="stable")]


def build_eval_plan(
    buckets: np.ndarray,
    lengths: np.ndarray,
    batch_sizes: Sequence[int],
    num_replicas: int = 1,
) -> list[list[np.ndarray]]:
    """Build the evaluation plan: rows sorted by length, each row exactly once across ranks.

    Batches never mix buckets. Batch ``j`` goes to rank ``j % num_replicas``, so every rank sees
    its rows in increasing length. When the batch count is not a multiple of ``num_replicas``,
    the last step is completed with copies of the last batch marked as filler.

    Returns:
        ``steps[i][rank]`` as in :func:`build_train_plan`.
    """
    buckets = np.asarray(buckets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)

    batches: list[np.ndarray] = []
    for bucket, rows in enumerate(_rows_by_bucket(buckets, len(batch_sizes))):
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        size = batch_sizes[bucket]
        batches.extend(rows[start : start + size] for start in range(0, len(rows), size))

    missing = -len(batches) % num_replicas
    if batches and missing:
        batches.extend(encode_filler(batches[-1]) for _ in range(missing))
    return [batches[start : start + num_replicas] for start in range(0, len(batches), num_replicas)]


def fingerprint_plan_inputs(
    buckets: np.ndarray, batch_sizes: Sequence[int], lengths: np.ndarray | None = None, **settings: object
) -> str:
    """Return a short hash of everything a plan depends on, to compare plans across ranks cheaply.

    Pass ``lengths`` when the plan sorts by length (``sort_window > 1``), because the plan then depends on them.
    """
    digest = hashlib.sha256(np.ascontiguousarray(buckets, dtype=np.int64).tobytes())
    if lengths is not None:
        digest.update(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
    digest.update(repr([int(s) for s in batch_sizes]).encode())
    digest.update(repr(sorted(settings.items())).encode())
    return digest.hexdigest()[:16]


def _rows_by_bucket(buckets: np.ndarray, num_buckets: int) -> list[np.ndarray]:
    """Split the row indices by bucket with one stable sort, so the cost does not grow with the bucket count."""
    order = np.argsort(buckets, kind="stable")
    starts = np.searchsorted(buckets[order], np.arange(num_buckets + 1), side="left")
    return [order[starts[b] : starts[b + 1]] for b in range(num_buckets)]
