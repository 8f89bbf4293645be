import time

import numpy as np
import pytest

from lightning_dynq.data import (
    BucketBatchSampler,
    TrainProgress,
    batch_sizes_for_buckets,
    build_eval_plan,
    build_train_plan,
    decode_rows,
)


def random_buckets(n: int, num_buckets: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 200, size=n)
    buckets = np.minimum(lengths // (200 // num_buckets + 1), num_buckets - 1)
    return buckets, lengths


def valid_rows_of(steps) -> np.ndarray:
    rows = []
    for step in steps:
        for batch in step:
            decoded, valid = decode_rows(batch)
            rows.append(decoded[valid])
    return np.concatenate(rows)


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 8])
@pytest.mark.parametrize("epoch", [0, 5])
def test_train_plan_each_row_once_across_ranks(num_replicas, epoch):
    buckets, _ = random_buckets(1003, 4)
    steps = build_train_plan(buckets, [16, 8, 8, 5], seed=7, epoch=epoch, num_replicas=num_replicas)
    rows = valid_rows_of(steps)
    assert len(rows) == 1003
    assert np.array_equal(np.sort(rows), np.arange(1003))


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_train_plan_same_bucket_per_step(num_replicas):
    buckets, _ = random_buckets(1003, 4)
    steps = build_train_plan(buckets, [16, 8, 8, 5], seed=7, epoch=0, num_replicas=num_replicas)
    for step in steps:
        assert len(step) == num_replicas
        step_buckets = {int(buckets[decode_rows(batch)[0]].max()) for batch in step}
        step_buckets |= {int(buckets[decode_rows(batch)[0]].min()) for batch in step}
        assert len(step_buckets) == 1


def test_train_plan_filler_only_in_padded_steps():
    buckets, _ = random_buckets(1003, 4)
    steps = build_train_plan(buckets, [16, 8, 8, 5], seed=7, epoch=0, num_replicas=3)
    filler_batches = sum(int((~decode_rows(b)[1]).all()) for step in steps for b in step)
    partial_batches = sum(int((~decode_rows(b)[1]).any() and decode_rows(b)[1].any()) for step in steps for b in step)
    assert 0 < filler_batches <= 4 * 2
    assert partial_batches == 0


def test_train_plan_tail_drop_has_no_filler():
    buckets, _ = random_buckets(1003, 4)
    steps = build_train_plan(buckets, [16, 8, 8, 5], seed=7, epoch=0, num_replicas=3, tail="drop")
    assert all(decode_rows(b)[1].all() for step in steps for b in step)
    rows = valid_rows_of(steps)
    assert len(np.unique(rows)) == len(rows)
    assert len(rows) > 1003 - 4 * 2 * 16


def test_train_plan_deterministic_and_reshuffled():
    buckets, _ = random_buckets(500, 3)
    first = build_train_plan(buckets, [8, 8, 8], seed=1, epoch=0)
    again = build_train_plan(buckets, [8, 8, 8], seed=1, epoch=0)
    next_epoch = build_train_plan(buckets, [8, 8, 8], seed=1, epoch=1)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, next_epoch))


def test_train_plan_drop_last_keeps_full_batches():
    buckets, _ = random_buckets(500, 3)
    steps = build_train_plan(buckets, [8, 8, 8], seed=1, epoch=0, drop_last=True)
    assert {len(step[0]) for step in steps} == {8}


def test_train_plan_skips_negative_buckets():
    buckets = np.array([0, -1, 0, 1, -1, 1])
    rows = valid_rows_of(build_train_plan(buckets, [2, 2], seed=0, epoch=0))
    assert sorted(rows.tolist()) == [0, 2, 3, 5]


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 8])
@pytest.mark.parametrize(("tail", "drop_last"), [("pad", False), ("pad", True), ("drop", False)])
def test_sorted_plan_each_row_at_most_once(num_replicas, tail, drop_last):
    buckets, lengths = random_buckets(1003, 4)
    sizes = [16, 8, 8, 5]
    steps = build_train_plan(
        buckets, sizes, seed=7, epoch=3, num_replicas=num_replicas, tail=tail, drop_last=drop_last,
        lengths=lengths, sort_window=4,
    )
    unsorted = build_train_plan(
        buckets, sizes, seed=7, epoch=3, num_replicas=num_replicas, tail=tail, drop_last=drop_last,
    )
    rows = valid_rows_of(steps)
    assert len(np.unique(rows)) == len(rows)
    # Sorting reorders rows inside windows but keeps and drops the same rows as the unsorted plan.
    assert np.array_equal(np.sort(rows), np.sort(valid_rows_of(unsorted)))
    assert len(steps) == len(unsorted)
    for step in steps:
        assert len(step) == num_replicas
        assert len({int(b) for batch in step for b in buckets[decode_rows(batch)[0]]}) == 1
    if not drop_last and tail == "pad":
        assert len(rows) == 1003


def test_sorted_plan_tail_drop_empties_small_bucket():
    buckets = np.array([0] * 40 + [1] * 5)
    lengths = np.arange(45)
    steps = build_train_plan(buckets, [8, 8], seed=0, epoch=0, num_replicas=2, tail="drop", lengths=lengths, sort_window=4)
    assert len(steps) == 2
    assert set(valid_rows_of(steps).tolist()) <= set(range(40))


def test_sorted_plan_window_covering_bucket_sorts_it():
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 100, size=203)
    buckets = np.zeros(203, dtype=np.int64)
    steps = build_train_plan(buckets, [8], seed=0, epoch=0, lengths=lengths, sort_window=100)
    batches = sorted((lengths[step[0]] for step in steps), key=lambda batch: (batch.min(), batch.max()))
    for earlier, later in zip(batches, batches[1:]):
        assert earlier.max() <= later.min()


def test_sorted_plan_deterministic_and_reshuffled():
    buckets, lengths = random_buckets(2000, 3)
    settings = dict(buckets=buckets, batch_sizes=[8, 8, 8], seed=1, lengths=lengths, sort_window=10)
    first = build_train_plan(**settings, epoch=0)
    again = build_train_plan(**settings, epoch=0)
    next_epoch = build_train_plan(**settings, epoch=1)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))
    first_batches = {frozenset(step[0].tolist()) for step in first}
    next_batches = {frozenset(step[0].tolist()) for step in next_epoch}
    assert len(first_batches & next_batches) < 0.1 * len(first_batches)


@pytest.mark.parametrize("sort_window", [0, 1])
def test_sort_window_zero_or_one_is_unsorted(sort_window):
    buckets, lengths = random_buckets(500, 3)
    plain = build_train_plan(buckets, [8, 8, 8], seed=1, epoch=2, num_replicas=2)
    windowed = build_train_plan(buckets, [8, 8, 8], seed=1, epoch=2, num_replicas=2, lengths=lengths, sort_window=sort_window)
    assert len(plain) == len(windowed)
    for a, b in zip(plain, windowed):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_sort_window_checks_arguments():
    buckets, lengths = random_buckets(50, 2)
    with pytest.raises(ValueError, match="pass lengths"):
        build_train_plan(buckets, [8, 8], seed=0, epoch=0, sort_window=50)
    with pytest.raises(ValueError, match="sort_window must be >= 0"):
        build_train_plan(buckets, [8, 8], seed=0, epoch=0, lengths=lengths, sort_window=-1)


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_eval_plan_sorted_once_equal_steps(num_replicas):
    buckets, lengths = random_buckets(1001, 4, seed=2)
    steps = build_eval_plan(buckets, lengths, [32, 32, 32, 32], num_replicas)
    rows = valid_rows_of(steps)
    assert np.array_equal(np.sort(rows), np.arange(1001))
    for rank in range(num_replicas):
        rank_rows = np.concatenate([decode_rows(step[rank])[0][decode_rows(step[rank])[1]] for step in steps])
        assert np.all(np.diff(lengths[rank_rows]) >= 0)
    for step in steps:
        for batch in step:
            assert len(np.unique(buckets[decode_rows(batch)[0]])) == 1


def test_batch_sizes_from_max_tokens():
    assert batch_sizes_for_buckets([16, 32, 128, 1024], max_tokens=512) == [32, 16, 4, 1]
    assert batch_sizes_for_buckets([16, 32], batch_size=8) == [8, 8]
    assert batch_sizes_for_buckets([16, 32], batch_size=8, bucket_batch_sizes=[64, 16]) == [64, 16]
    with pytest.raises(ValueError, match="one batch size per bucket"):
        batch_sizes_for_buckets([16, 32], bucket_batch_sizes=[4])


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_sampler_len_matches_iteration_on_every_rank(num_replicas):
    buckets, lengths = random_buckets(777, 3)
    lengths_seen = set()
    for rank in range(num_replicas):
        sampler = BucketBatchSampler(
            buckets=buckets, lengths=lengths, bucket_batch_sizes=[8, 8, 8], seed=3,
            num_replicas=num_replicas, rank=rank,
        )
        sampler.set_epoch(2)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        lengths_seen.add(len(batches))
    assert len(lengths_seen) == 1


def test_sampler_resume_yields_remaining_batches():
    buckets, lengths = random_buckets(777, 3)
    kwargs = dict(buckets=buckets, lengths=lengths, bucket_batch_sizes=[8, 8, 8], seed=3)
    reference = BucketBatchSampler(**kwargs)
    reference.set_epoch(4)
    full = list(reference)

    progress = TrainProgress()
    progress.resume_from(epoch=4, batches_consumed=17)
    resumed = BucketBatchSampler(**kwargs, progress=progress)
    resumed.set_epoch(4)
    assert list(resumed) == full[17:]
    assert progress.batches_consumed == 17
    # The skip applies once; the next pass over the epoch is complete again.
    assert list(resumed) == full


def test_train_plan_million_lengths_under_one_second():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, size=1_000_000)
    buckets = np.minimum(lengths // 64, 7)
    start = time.perf_counter()
    steps = build_train_plan(buckets, [16] * 8, seed=0, epoch=0, num_replicas=2, lengths=lengths, sort_window=50)
    elapsed = time.perf_counter() - start
    assert sum(len(b) for step in steps for b in step) >= 1_000_000
    assert elapsed < 1.0, f"plan took {elapsed:.2f} s"
