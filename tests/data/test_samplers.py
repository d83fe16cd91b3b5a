"""Tests for detres.data.samplers: homogeneous aspect-ratio batches covering every index, resumable infinite stream."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler, SubsetRandomSampler

from detres.data.samplers import AspectRatioGroupedBatchSampler, InfiniteSampler, compute_aspect_ratio_groups


class _Sizes:
    """Stand-in dataset that only knows its image sizes."""

    def __init__(self, hws: list[tuple[int, int]]):
        self.hws = hws

    def __len__(self) -> int:
        return len(self.hws)

    def image_hw(self, i: int) -> tuple[int, int]:
        return self.hws[i]


def test_groups_split_at_aspect_ratio_one() -> None:
    ds = _Sizes([(480, 640), (640, 480), (100, 100), (101, 100), (99, 100)])
    assert compute_aspect_ratio_groups(ds) == [1, 0, 1, 0, 1]
    with pytest.raises(TypeError, match="image_hw"):
        compute_aspect_ratio_groups([1, 2, 3])


def _mixed_groups(n: int = 23) -> list[int]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 2, size=n).tolist()


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_batches_are_homogeneous_and_cover_every_index_once(batch_size: int) -> None:
    groups = _mixed_groups()
    sampler = RandomSampler(range(len(groups)), generator=torch.Generator().manual_seed(0))
    bs = AspectRatioGroupedBatchSampler(sampler, groups, batch_size)
    batches = list(bs)
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(groups)))
    assert len(bs) == len(batches)
    # At most one part-filled batch per group.
    assert sum(len(b) < batch_size for b in batches) <= 2


def test_drop_last_keeps_only_full_batches() -> None:
    groups = _mixed_groups()
    counts = Counter(groups)
    bs = AspectRatioGroupedBatchSampler(SequentialSampler(range(len(groups))), groups, 4, drop_last=True)
    batches = list(bs)
    assert all(len(b) == 4 for b in batches)
    assert len(batches) == len(bs) == counts[0] // 4 + counts[1] // 4
    assert len(set(itertools.chain.from_iterable(batches))) == 4 * len(batches)


def test_sequential_order_is_kept_within_a_group() -> None:
    groups = [0, 1, 0, 0, 1, 1, 0, 1]
    batches = list(AspectRatioGroupedBatchSampler(SequentialSampler(range(8)), groups, 2))
    assert batches == [[0, 2], [1, 4], [3, 6], [5, 7]]


def test_subset_sampler_length_counts_only_its_indices() -> None:
    groups = [0] * 10 + [1] * 10
    sub = SubsetRandomSampler([0, 1, 2, 15, 16], generator=torch.Generator().manual_seed(0))
    bs = AspectRatioGroupedBatchSampler(sub, groups, 2)
    batches = list(bs)
    assert len(bs) == len(batches) == 3  # group 0: 3 images -> 2 batches, group 1: 2 images -> 1
    assert sorted(itertools.chain.from_iterable(batches)) == [0, 1, 2, 15, 16]


def test_coco128_groups_match_the_json(shared_dir: Path) -> None:
    from detres.data.datasets.coco import CocoDetection

    root = shared_dir / "data" / "coco128"
    ann_file = root / "annotations" / "instances_train2017.json"
    if not ann_file.is_file():
        pytest.skip(f"coco128 not found at {root}")
    ds = CocoDetection(root / "train2017", ann_file)
    groups = compute_aspect_ratio_groups(ds)
    raw = {im["id"]: im for im in json.loads(ann_file.read_text())["images"]}
    expected = [int(raw[i]["width"] >= raw[i]["height"]) for i in ds.ids]
    assert groups == expected and 0 < sum(groups) < len(groups)  # coco128 has both shapes
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(1))
    batches = list(AspectRatioGroupedBatchSampler(sampler, groups, 4))
    for b in batches:
        shapes = {raw[ds.ids[i]]["width"] >= raw[ds.ids[i]]["height"] for i in b}
        assert len(shapes) == 1
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(128))


def test_infinite_sampler_passes_are_fresh_permutations() -> None:
    s = InfiniteSampler(7, seed=3)
    stream = list(itertools.islice(s, 21))
    passes = [stream[0:7], stream[7:14], stream[14:21]]
    assert all(sorted(p) == list(range(7)) for p in passes)
    assert passes[0] != passes[1] or passes[1] != passes[2]
    assert list(itertools.islice(InfiniteSampler(7, seed=3), 21)) == stream  # deterministic
    assert list(itertools.islice(InfiniteSampler(7, seed=4), 21)) != stream
    assert list(itertools.islice(InfiniteSampler(3, shuffle=False), 7)) == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("start", [0, 1, 6, 7, 8, 20])
def test_infinite_sampler_resumes_exactly(start: int) -> None:
    full = list(itertools.islice(InfiniteSampler(7, seed=9), 40))
    resumed = list(itertools.islice(InfiniteSampler(7, seed=9, start=start), 40 - start))
    assert resumed == full[start:]


def test_infinite_sampler_ranks_interleave_the_shared_stream() -> None:
    full = list(itertools.islice(InfiniteSampler(5, seed=1), 30))
    ranks = [list(itertools.islice(InfiniteSampler(5, seed=1, rank=r, world_size=3), 10)) for r in range(3)]
    for r in range(3):
        assert ranks[r] == full[r::3]
    resumed = list(itertools.islice(InfiniteSampler(5, seed=1, rank=2, world_size=3, start=4), 6))
    assert resumed == ranks[2][4:]
    with pytest.raises(ValueError, match="rank"):
        InfiniteSampler(5, rank=3, world_size=3)
    with pytest.raises(ValueError, match="size"):
        InfiniteSampler(0)


def test_grouped_batches_over_infinite_stream_resume_at_a_batch() -> None:
    groups = _mixed_groups(11)
    fresh = AspectRatioGroupedBatchSampler(InfiniteSampler(11, seed=2), groups, 3)
    first = list(itertools.islice(fresh, 12))
    assert all(len(b) == 3 and len({groups[i] for i in b}) == 1 for b in first)
    resumed = AspectRatioGroupedBatchSampler(InfiniteSampler(11, seed=2), groups, 3, start_batch=5)
    assert list(itertools.islice(resumed, 7)) == first[5:]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        AspectRatioGroupedBatchSampler(range(3), [0, 0, 0], 0)
    with pytest.raises(IndexError, match="group_ids covers 3"):
        list(AspectRatioGroupedBatchSampler(range(5), [0, 0, 0], 2))
