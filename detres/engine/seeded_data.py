"""Reproducible iteration-based data order: per-epoch permutations and per-(epoch, image) random seeds.

Every random choice of the input pipeline (the permutation, scale, crop, flip, PCA colour noise)
is a function of (seed, epoch, index), so a run resumed at any iteration sees exactly the batches
an uninterrupted run would have seen, whatever the number of loader workers. Also here: turning
an error raised inside a DataLoader worker back into the one-line message of the original error.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def item_seed(*parts: int) -> int:
    """A 32-bit seed that depends on all the given non-negative numbers (SeedSequence mixes them)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (what albumentations and cv2 use)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochSeededDataset(Dataset):
    """Wraps a map-style dataset: key ``(epoch, index)`` seeds all generators, then reads ``index``.

    The wrapped dataset's ``transform`` is re-seeded through its ``set_random_seed`` hook (the
    detres train transforms draw scale, crop, flip and colour noise from one generator).
    """

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        seed = item_seed(self.seed, epoch, index)
        seed_everything(seed)
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_seed"):
            transform.set_random_seed(seed)
        return self.dataset[index]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys for one epoch's seeded permutation, from batch ``start_batch``.

    ``drop_last=True`` (training) drops the last incomplete batch so every iteration has the same
    batch size; ``drop_last=False`` yields every index exactly once (e.g. BN statistics over the set).
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0,
                 drop_last: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and size < batch_size:
            raise ValueError(f"the training set has {size} images, fewer than one batch of {batch_size}")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.drop_last = drop_last
        if not 0 <= start_batch <= self._num_batches():
            raise ValueError(f"start_batch must lie in [0, {self._num_batches()}], got {start_batch}")
        self.start_batch = start_batch

    def _num_batches(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        return self._num_batches() - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch))  # the epoch permutation stream
        order = torch.randperm(self.size, generator=generator).tolist()
        for b in range(self.start_batch, self._num_batches()):
            chunk = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(self.epoch, i) for i in chunk]
