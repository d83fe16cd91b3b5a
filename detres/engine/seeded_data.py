"""Reproducible training data: per-epoch permutations and per-(epoch or iteration, image) random seeds.

Classification: every random choice of the input pipeline (the permutation, scale, crop, flip, PCA
colour noise) is a function of (seed, epoch, index). Detection: every random draw (scale choice,
flip, and the model's RPN / RoI sampling, through the ``seed`` each sample carries into its target)
is a function of (seed, iteration, index); the localizer's RPN stage uses the same wrappers (scale,
crop window, flip, anchor sampling). So a run resumed at any iteration sees exactly the batches and
draws an uninterrupted run would have seen, whatever the number of loader workers or (for detection
and localization) data-parallel processes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

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

    def __init__(
        self, size: int, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0, drop_last: bool = True
    ) -> None:
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


class IterationKeyedBatches(Sampler[list[tuple[int, int]]]):
    """Batch ``k`` of ``batches`` (counting from ``start_iter``) as keys ``(start_iter + k, index)``.

    ``batches`` is a batch sampler already positioned at iteration ``start_iter`` (e.g. one built
    with ``start_batch=start_iter``); the keys tell :class:`IterationSeededDataset` which iteration
    each image is drawn for.
    """

    def __init__(self, batches: Iterable[list[int]], *, start_iter: int = 0) -> None:
        self.batches = batches
        self.start_iter = int(start_iter)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for iteration, batch in enumerate(self.batches, start=self.start_iter):
            yield [(iteration, int(index)) for index in batch]


class IterationSeededDataset(Dataset):
    """Wraps a detection dataset: key ``(iteration, index)`` reads ``index`` with its transform reseeded
    by ``item_seed(seed, iteration, index)`` and stores that seed in the sample (``"seed"``), which the
    collate function passes on to the model's samplers.

    Only the transform's own generator is reseeded (its ``set_random_seed`` hook), never the global
    ones, so the training loop's process state is untouched.
    """

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Dataset metadata (class names, image_hw, ...) is the wrapped dataset's.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        iteration, index = key
        seed = item_seed(self.seed, iteration, index)
        transform = getattr(self.dataset, "transforms", None) or getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_seed"):
            transform.set_random_seed(seed)
        sample = self.dataset[index]
        if not isinstance(sample, dict):
            raise TypeError(
                f"IterationSeededDataset: {type(self.dataset).__name__}[{index}] is a "
                f"{type(sample).__name__}, expected a detection sample dict"
            )
        return {**sample, "seed": seed}
