"""Reproducible iteration-based data order: per-epoch permutations and per-(epoch, image) random seeds.

Every random choice of the input pipeline (the permutation, scale, crop, flip, PCA colour noise)
is a function of (seed, epoch, index), so a run resumed at any iteration sees exactly the batches
an uninterrupted run would have seen, whatever the number of loader workers.
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
    """Wraps a map-style dataset: key ``(epoch, index)`` seeds all generators, then reads ``index``."""

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        seed_everything(item_seed(self.seed, epoch, index))
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_seed"):
            transform.set_random_seed(item_seed(self.seed, epoch, index))  # albumentations keeps its own RNG
        return self.dataset[index]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys for one epoch's seeded permutation, from batch ``start_batch``.

    The last incomplete batch is dropped so every iteration has the same batch size.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0) -> None:
        if size < batch_size:
            raise ValueError(f"the training set has {size} images, fewer than one batch of {batch_size}")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.size // self.batch_size - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch))  # the epoch permutation stream
        order = torch.randperm(self.size, generator=generator).tolist()
        for b in range(self.start_batch, self.size // self.batch_size):
            chunk = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(self.epoch, i) for i in chunk]
