"""Samplers for detection training: aspect-ratio grouped batches, a resumable infinite shuffled stream, and
their data-parallel split (each rank takes a disjoint slice of every global batch)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

__all__ = [
    "compute_aspect_ratio_groups",
    "AspectRatioGroupedBatchSampler",
    "InfiniteSampler",
    "RankSlicedBatchSampler",
    "rank_share",
]


def compute_aspect_ratio_groups(dataset: Any) -> list[int]:
    """Group id per image: 1 for landscape or square (W / H >= 1), 0 for portrait (W / H < 1).

    Uses ``dataset.image_hw(i)`` so no image is decoded. Images of one group resize to similar
    shapes, so batching within a group wastes little padding.
    """
    if not hasattr(dataset, "image_hw"):
        raise TypeError(f"{type(dataset).__name__} has no image_hw(i) method; aspect-ratio grouping needs it")
    groups = []
    for i in range(len(dataset)):
        h, w = dataset.image_hw(i)
        if h <= 0 or w <= 0:
            raise ValueError(f"{type(dataset).__name__}.image_hw({i}) = {(h, w)}: height and width must be positive")
        groups.append(1 if w >= h else 0)
    return groups


class AspectRatioGroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images all share one aspect-ratio group.

    Indices come from ``sampler`` in its order and wait in a per-group buffer; a buffer that reaches
    ``batch_size`` is yielded. When ``sampler`` is exhausted the part-filled buffers are yielded
    (group by group) unless ``drop_last``, so with ``drop_last=False`` every index of a finite
    sampler is yielded exactly once per pass. Works with an infinite sampler too (no ``len`` then).

    Args:
        sampler: yields dataset indices (RandomSampler, SequentialSampler, InfiniteSampler, ...).
        group_ids: group of every dataset index, e.g. ``compute_aspect_ratio_groups(dataset)``.
        batch_size: images per batch.
        drop_last: drop the part-filled batches left at the end of a pass.
        start_batch: skip the first ``start_batch`` batches of the first pass (resuming iteration-based
            training; the skipped batches are computed from indices only, no data is loaded). Exact only
            for a deterministic ``sampler`` such as ``InfiniteSampler`` with a fixed seed.
    """

    def __init__(
        self,
        sampler: Iterable[int],
        group_ids: Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        start_batch: int = 0,
    ):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if start_batch < 0:
            raise ValueError(f"start_batch: expected >= 0, got {start_batch!r}")
        self.sampler = sampler
        self.group_ids = [int(g) for g in group_ids]
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.start_batch = int(start_batch)

    def _group_of(self, idx: int) -> int:
        if not 0 <= idx < len(self.group_ids):
            raise IndexError(f"sampler yielded index {idx}, but group_ids covers {len(self.group_ids)} images")
        return self.group_ids[idx]

    def _batches(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = {}
        for idx in self.sampler:
            idx = int(idx)
            group = self._group_of(idx)
            buf = buffers.setdefault(group, [])
            buf.append(idx)
            if len(buf) == self.batch_size:
                yield buf
                buffers[group] = []
        if not self.drop_last:
            for group in sorted(buffers):
                if buffers[group]:
                    yield buffers[group]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.start_batch = self.start_batch, 0  # only the first pass resumes mid-way
        for n, batch in enumerate(self._batches()):
            if n >= skip:
                yield batch

    def __len__(self) -> int:
        """Batches per pass (minus ``start_batch``, if not yet consumed); needs a finite sampler."""
        # Group sizes of one pass: a sampler over a subset exposes ``indices``; a full-range sampler
        # (RandomSampler, SequentialSampler) covers every index once; otherwise walk it once.
        if hasattr(self.sampler, "indices"):
            indices: Iterable[int] = self.sampler.indices
        elif len(self.sampler) == len(self.group_ids):  # type: ignore[arg-type]
            indices = range(len(self.group_ids))
        else:
            indices = list(self.sampler)
        counts = Counter(self._group_of(int(i)) for i in indices)
        if self.drop_last:
            total = sum(n // self.batch_size for n in counts.values())
        else:
            total = sum(-(-n // self.batch_size) for n in counts.values())
        return max(total - self.start_batch, 0)


class InfiniteSampler(Sampler[int]):
    """An endless stream of dataset indices: pass ``e`` is a permutation of ``range(size)`` drawn from
    ``(seed, e)`` alone (or plain ``0..size-1`` without shuffling), so the stream is reproducible and can
    be resumed exactly from any position.

    Args:
        size: number of dataset items.
        shuffle: reshuffle every pass.
        seed: seed of the permutations.
        start: number of items this sampler has already yielded (e.g. ``iteration * batch_size`` when
            resuming); the stream continues from there.
        rank, world_size: for data-parallel training each rank takes every ``world_size``-th item of the
            shared stream, starting at ``rank``; ``start`` counts this rank's items.
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: int = 0,
        *,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size: expected a positive int (dataset length), got {size!r}")
        if start < 0:
            raise ValueError(f"start: expected >= 0, got {start!r}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, got {rank=}, {world_size=}")
        self.size = size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.start = int(start)
        self.rank = rank
        self.world_size = world_size

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of pass ``epoch`` (0-based) of the shared stream."""
        if not self.shuffle:
            return np.arange(self.size, dtype=np.int64)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return rng.permutation(self.size)

    def __iter__(self) -> Iterator[int]:
        pos = self.start * self.world_size + self.rank  # position in the shared stream
        epoch, offset = divmod(pos, self.size)
        while True:
            order = self.permutation(epoch)
            while offset < self.size:
                yield int(order[offset])
                offset += self.world_size
            epoch += 1
            offset -= self.size


def rank_share(batch: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Slice ``rank`` of ``world_size`` equal, contiguous slices of a global ``batch`` (an error if it does not
    split)."""
    if len(batch) % world_size:
        raise ValueError(
            f"a global batch of {len(batch)} does not split over {world_size} processes: the batch "
            f"size must be a multiple of the world size"
        )
    share = len(batch) // world_size
    return list(batch[rank * share : (rank + 1) * share])


class RankSlicedBatchSampler(Sampler[list[int]]):
    """One rank's share of a stream of *global* batches: rank ``r`` of ``W`` takes slice ``r`` of ``W`` equal,
    contiguous slices of every batch ``batch_sampler`` yields.

    Every rank builds the same global ``batch_sampler`` (same seed; it only computes indices), so the ranks'
    slices of one batch are disjoint and together are exactly the batch a single process would train on:
    aspect-ratio grouping, seeding and resuming (``start_batch`` / ``start`` of the wrapped samplers) carry
    over unchanged. This is detectron2's convention: the configured batch size is the global one and each
    rank trains on ``batch / W`` images. A global batch that does not split evenly is an error.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], rank: int, world_size: int) -> None:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, got {rank=}, {world_size=}")
        self.batch_sampler = batch_sampler
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            yield rank_share(batch, self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]
