"""Length-bucketed batching on Hugging Face ``datasets``, independent of Lightning and of quantization."""

from lightning_dynq.data.boundaries import (
    BOUNDARY_STRATEGIES,
    assign_buckets,
    estimate_boundaries,
    ladder_boundaries,
    merge_small_buckets,
    quantile_boundaries,
    snap_to_multiple,
    token_mass_boundaries,
    validate_boundaries,
)
from lightning_dynq.data.collate import EXTRA_KEYS, IGNORE_INDEX, BucketCollator, BucketedSplit
from lightning_dynq.data.loading import (
    carve_validation_split,
    infer_label_names,
    load_raw_dataset,
    load_tokenizer,
    token_lengths,
    tokenize_split,
)
from lightning_dynq.data.plan import (
    batch_sizes_for_buckets,
    build_eval_plan,
    build_train_plan,
    count_dropped_tail,
    decode_rows,
    encode_filler,
    fingerprint_plan_inputs,
)
from lightning_dynq.data.sampler import BucketBatchSampler, BucketDataLoader, EpochSampler, TrainProgress

__all__ = [
    "BOUNDARY_STRATEGIES",
    "EXTRA_KEYS",
    "IGNORE_INDEX",
    "BucketBatchSampler",
    "BucketDataLoader",
    "BucketCollator",
    "BucketedSplit",
    "EpochSampler",
    "TrainProgress",
    "assign_buckets",
    "batch_sizes_for_buckets",
    "build_eval_plan",
    "build_train_plan",
    "carve_validation_split",
    "count_dropped_tail",
    "decode_rows",
    "encode_filler",
    "estimate_boundaries",
    "fingerprint_plan_inputs",
    "infer_label_names",
    "ladder_boundaries",
    "load_raw_dataset",
    "load_tokenizer",
    "merge_small_buckets",
    "quantile_boundaries",
    "snap_to_multiple",
    "token_lengths",
    "token_mass_boundaries",
    "tokenize_split",
    "validate_boundaries",
]
