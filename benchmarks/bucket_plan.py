"""Time the bucket plan for 1,000,000 sequence lengths: boundaries, bucket assignment and one epoch's plan.

Run: ``python benchmarks/bucket_plan.py [--num-lengths N] [--num-replicas R] [--sort-window W]``. The lengths are
synthetic (log-normal, median about 20 tokens, capped at 512), so no data or model is needed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lightning_dynq.data.boundaries import assign_buckets, estimate_boundaries, merge_small_buckets
from lightning_dynq.data.plan import batch_sizes_for_buckets, build_eval_plan, build_train_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-lengths", type=int, default=1_000_000, help="number of sequences")
    parser.add_argument("--num-replicas", type=int, default=2, help="number of ranks the plan is split over")
    parser.add_argument("--num-buckets", type=int, default=8, help="target bucket count")
    parser.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch")
    parser.add_argument(
        "--sort-window", type=int, default=50, help="batches per length-sorted window in the train plan (0: no sort)"
    )
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3.0, 0.7, size=args.num_lengths), 1, 512).astype(np.int64)

    start = time.perf_counter()
    boundaries = estimate_boundaries(lengths, "token_mass", args.num_buckets, multiple=8)
    boundaries = merge_small_buckets(lengths, boundaries, min_examples=64)
    buckets = assign_buckets(lengths, boundaries)
    batch_sizes = batch_sizes_for_buckets(boundaries, max_tokens=args.max_tokens)
    boundaries_done = time.perf_counter()
    train_steps = build_train_plan(
        buckets, batch_sizes, seed=0, epoch=0, num_replicas=args.num_replicas,
        lengths=lengths, sort_window=args.sort_window,
    )
    train_done = time.perf_counter()
    eval_steps = build_eval_plan(buckets, lengths, batch_sizes, num_replicas=args.num_replicas)
    eval_done = time.perf_counter()

    print(f"lengths: {args.num_lengths:,}, ranks: {args.num_replicas}, boundaries: {boundaries}, batch sizes: {batch_sizes}")
    print(f"boundaries + buckets: {boundaries_done - start:.3f} s")
    print(f"train plan ({len(train_steps):,} steps, sort window {args.sort_window}): {train_done - boundaries_done:.3f} s")
    print(f"eval plan ({len(eval_steps):,} steps): {eval_done - train_done:.3f} s")
    print(f"total: {eval_done - start:.3f} s")


if __name__ == "__main__":
    main()
