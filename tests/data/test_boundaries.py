import numpy as np
import pytest

from lightning_dynq.data import (
    assign_buckets,
    estimate_boundaries,
    ladder_boundaries,
    merge_small_buckets,
    quantile_boundaries,
    snap_to_multiple,
    token_mass_boundaries,
    validate_boundaries,
)


def skewed_lengths(n: int = 20_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=3.0, sigma=0.6, size=n).astype(np.int64), 2, 512)


def test_quantile_boundaries_equal_counts():
    lengths = skewed_lengths()
    boundaries = quantile_boundaries(lengths, 4)
    counts = np.bincount(assign_buckets(lengths, boundaries))
    assert len(boundaries) == 4
    assert boundaries[-1] == lengths.max()
    # Ties at integer lengths make the split inexact, so each bucket gets 25 % +- 5 points.
    assert np.all(np.abs(counts / len(lengths) - 0.25) < 0.05), counts


def test_token_mass_boundaries_equal_tokens():
    lengths = skewed_lengths()
    boundaries = token_mass_boundaries(lengths, 4)
    buckets = assign_buckets(lengths, boundaries)
    mass = np.bincount(buckets, weights=lengths) / lengths.sum()
    assert len(boundaries) == 4
    assert np.all(np.abs(mass - 0.25) < 0.05), mass
    # Equal token mass gives the long tail narrower buckets than equal counts.
    assert boundaries[2] > quantile_boundaries(lengths, 4)[2]


def test_quantile_boundaries_few_distinct_lengths():
    assert quantile_boundaries(np.array([5] * 10 + [7] * 10), 8) == [5, 7]


def test_ladder_boundaries_cover_max_length():
    assert ladder_boundaries(100, 32) == [32, 64, 96, 128]
    assert ladder_boundaries(64, 64) == [64]


def test_snap_to_multiple_removes_duplicates():
    assert snap_to_multiple([3, 7, 9, 30], 8) == [8, 16, 32]


def test_estimate_boundaries_snaps_and_keeps_max():
    lengths = skewed_lengths()
    boundaries = estimate_boundaries(lengths, "quantile", num_buckets=4, multiple=8)
    assert all(b % 8 == 0 for b in boundaries)
    assert boundaries[-1] >= lengths.max()


def test_estimate_boundaries_from_sample_close_to_full():
    lengths = skewed_lengths(n=400_000)
    full = estimate_boundaries(lengths, "quantile", num_buckets=4, sample_size=None)
    sampled = estimate_boundaries(lengths, "quantile", num_buckets=4, sample_size=20_000, seed=3)
    assert sampled[-1] == full[-1] == lengths.max()
    assert np.max(np.abs(np.array(sampled[:-1]) - np.array(full[:-1]))) <= 1
    assert sampled == estimate_boundaries(lengths, "quantile", num_buckets=4, sample_size=20_000, seed=3)


def test_estimate_boundaries_ladder_requires_multiple():
    with pytest.raises(ValueError, match="boundary_multiple"):
        estimate_boundaries(np.array([3, 4]), "ladder")


def test_estimate_boundaries_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="Unknown boundary strategy 'median'"):
        estimate_boundaries(np.array([3, 4]), "median")


def test_assign_buckets_edges_and_overflow():
    buckets = assign_buckets(np.array([1, 8, 9, 16, 17]), [8, 16])
    assert buckets.tolist() == [0, 0, 1, 1, 2]


def test_merge_small_buckets_into_next_longer():
    lengths = np.array([1] * 10 + [5] * 2 + [9] * 10)
    assert merge_small_buckets(lengths, [2, 6, 10], min_examples=5) == [2, 10]


def test_merge_small_buckets_last_into_previous():
    lengths = np.array([1] * 10 + [5] * 10 + [9] * 2)
    assert merge_small_buckets(lengths, [2, 6, 10], min_examples=5) == [2, 10]


def test_merge_small_buckets_all_small_leaves_one():
    assert merge_small_buckets(np.array([1, 5, 9]), [2, 6, 10], min_examples=5) == [10]


def test_validate_boundaries_rejects_unsorted():
    with pytest.raises(ValueError, match="strictly increasing"):
        validate_boundaries([16, 8])
