"""A batch sampler that yields single-bucket batches from a precomputed plan, for one rank."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from lightning_dynq.data.plan import TailPolicy, build_eval_plan, build_train_plan


@dataclass
class TrainProgress:
    """Position in the training plan, shared between the batch sampler and its owner.

    The owner counts finished batches in ``batches_consumed`` and saves ``(epoch,
    batches_consumed)`` in checkpoints. After :meth:`resume_from`, the next pass over
    ``resume_epoch`` skips the batches consumed before the checkpoint.
    """

    epoch: int = 0
    batches_consumed: int = 0
    resume_epoch: int | None = None
    resume_batches: int = 0

    def resume_from(self, epoch: int, batches_consumed: int) -> None:
        """Skip the first ``batches_consumed`` batches the next time ``epoch`` starts."""
        self.epoch = epoch
        self.batches_consumed = batches_consumed
        self.resume_epoch = epoch
        self.resume_batches = batches_consumed

    def start_epoch(self, epoch: int) -> int:
        """Record that ``epoch`` starts and return how many of its batches to skip."""
        skip = self.resume_batches if self.resume_epoch == epoch else 0
        self.resume_epoch = None
        self.resume_batches = 0
        self.epoch = epoch
        self.batches_consumed = skip
        return skip


class EpochSampler(Sampler[int]):
    """Placeholder ``sampler`` of :class:`BucketBatchSampler` that stores the epoch.

    Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (not on the batch
    sampler itself) at the start of every epoch, so the epoch is stored here.
    """

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.num_rows))

    def __len__(self) -> int:
        return self.num_rows


class BucketBatchSampler(BatchSampler):
    """Yield the batches of one rank from a bucket plan (see :mod:`lightning_dynq.data.plan`).

    Training plans (``shuffle=True``) are reshuffled every epoch from ``(seed, epoch)``, with each
    window of ``sort_window`` batches sorted by length, and evaluation plans are sorted by length.
    On ``N`` ranks, each rank yields the same number of batches and step ``i`` comes from the same
    bucket on every rank.

    The number of ranks and this rank come from, in this order: ``num_replicas``/``rank``, a
    ``DistributedSampler`` passed as ``sampler``, an initialized ``torch.distributed`` group, or
    a single process. Lightning (2.6, ``use_distributed_sampler=True``) re-creates a
    ``BatchSampler`` subclass with its ``DistributedSampler`` as ``sampler``. This class then takes
    only ``num_replicas``, ``rank`` and ``epoch`` from it and ignores its order, so the plan
    is neither reshuffled nor resharded.

    Args:
        sampler: ``DistributedSampler`` to read the rank and the epoch from, or ``None``.
        batch_size: nominal batch size (the largest per-bucket size), kept for the ``BatchSampler`` interface.
        drop_last: in training, drop the incomplete last batch of every bucket.
        buckets: bucket index of every row. Negative indices are left out.
        lengths: token count of every row, for sorting training windows and evaluation batches.
        bucket_batch_sizes: batch size of every bucket.
        shuffle: ``True`` for a training plan, ``False`` for a sorted evaluation plan.
        seed: base seed of the training order.
        sort_window: in training, sort each bucket's shuffled rows by length in windows of this
            many batches before cutting them into batches (0 or 1: no sort). See :func:`build_train_plan`.
        tail: on several ranks, ``"pad"`` fills the last step of a bucket with masked duplicates,
            ``"drop"`` drops it (training only; evaluation always pads).
        num_replicas: number of ranks, overriding the sources above.
        rank: this rank, overriding the sources above.
        progress: shared :class:`TrainProgress` for exact mid-epoch resume (training only).

    Example::

        >>> sampler = BucketBatchSampler(buckets=np.array([0, 1, 0, 1]), lengths=np.array([3, 9, 2, 8]),
        ...                              bucket_batch_sizes=[2, 2], shuffle=False)
        >>> list(sampler)
        [[2, 0], [3, 1]]
    """

    def __init__(
        self,
        sampler: Sampler | None = None,
        batch_size: int | None = None,
        drop_last: bool = False,
        *,
        buckets: np.ndarray,
        lengths: np.ndarray,
        bucket_batch_sizes: Sequence[int],
        shuffle: bool = True,
        seed: int = 0,
        sort_window: int = 50,
        tail: TailPolicy = "pad",
        num_replicas: int | None = None,
        rank: int | None = None,
        progress: TrainProgress | None = None,
    ) -> None:
        self.buckets = np.asarray(buckets, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.bucket_batch_sizes = [int(s) for s in bucket_batch_sizes]
        self.sampler = sampler if sampler is not None else EpochSampler(len(self.buckets))
        self.batch_size = batch_size if batch_size is not None else max(self.bucket_batch_sizes)
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.sort_window = sort_window
        self.tail = tail
        self.num_replicas = num_replicas
        self.rank = rank
        self.progress = progress
        self._cached_plan: tuple[tuple[int, int, int], list[list[np.ndarray]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next pass (also called by Lightning through ``sampler.set_epoch``)."""
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def world(self) -> tuple[int, int]:
        """Return ``(num_replicas, rank)`` from the sources listed in the class docstring."""
        if self.num_replicas is not None:
            return self.num_replicas, self.rank if self.rank is not None else 0
        if isinstance(self.sampler, DistributedSampler):
            return self.sampler.num_replicas, self.sampler.rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def plan(self, epoch: int | None = None) -> list[list[np.ndarray]]:
        """Return the steps of ``epoch`` (default: the current one) for all ranks."""
        if epoch is None:
            epoch = self.epoch
        num_replicas, _ = self.world()
        key = (epoch if self.shuffle else 0, num_replicas, id(self.buckets))
        if self._cached_plan is not None and self._cached_plan[0] == key:
            return self._cached_plan[1]

        if self.shuffle:
            steps = build_train_plan(
                self.buckets, self.bucket_batch_sizes, self.seed, epoch, num_replicas, self.tail, self.drop_last,
                lengths=self.lengths, sort_window=self.sort_window,
            )
        else:
            steps = build_eval_plan(self.buckets, self.lengths, self.bucket_batch_sizes, num_replicas)
        self._cached_plan = (key, steps)
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        steps = self.plan(epoch)
        _, rank = self.world()
        skip = self.progress.start_epoch(epoch) if self.progress is not None and self.shuffle else 0
        for step in steps[skip:]:
            yield step[rank].tolist()

    def __len__(self) -> int:
        return len(self.plan())


class BucketDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the training plan can be saved and restored.

    ``state_dict`` and ``load_state_dict`` read and set the :class:`TrainProgress` of its
    :class:`BucketBatchSampler`. Lightning (2.6) saves them with the fit loop for stateful
    loaders, and recognises the loader as resumable mid-epoch. The owner must count finished
    batches in ``progress.batches_consumed``, because iterating the loader runs ahead of training
    (prefetching and workers).
    """

    def _progress(self) -> TrainProgress | None:
        return getattr(self.batch_sampler, "progress", None)

    def state_dict(self) -> dict[str, int]:
        progress = self._progress()
        if progress is None:
            return {}
        return {"epoch": progress.epoch, "batches_consumed": progress.batches_consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        progress = self._progress()
        if progress is not None and state_dict:
            progress.resume_from(int(state_dict["epoch"]), int(state_dict["batches_consumed"]))
