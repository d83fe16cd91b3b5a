"""Tests for detres/engine/seeded_data.py: per-(epoch, index) seeding, epoch batch order, worker error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from detres.data.image_io import ImageReadError, read_image_rgb
from detres.data.transforms.classification import Normalize, ScaleAugmentTrainTransform
from detres.data.transforms.color_pca import PCAColorNoise
from detres.data.worker_errors import original_worker_message, readable_worker_errors
from detres.engine.seeded_data import EpochBatchSampler, EpochSeededDataset, item_seed


class RecordingNoise(PCAColorNoise):
    """PCA colour noise that remembers the RGB offsets it drew."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.offsets: list[np.ndarray] = []

    def sample_offset(self, rng=None):
        offset = super().sample_offset(rng)
        self.offsets.append(offset)
        return offset


class RecordingTransform(ScaleAugmentTrainTransform):
    """Scale augmentation that remembers the (scale, top, left, flip) it drew."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.params: list[tuple] = []

    def crop_and_flip(self, image, *, scale, top, left, flip):
        self.params.append((scale, top, left, flip))
        return super().crop_and_flip(image, scale=scale, top=top, left=left, flip=flip)


class ArrayDataset(Dataset):
    """In-memory RGB images with a transform attribute, as ImageFolderDataset has."""

    def __init__(self, images, transform):
        self.images = images
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), index


def _dataset(num_images: int = 6) -> ArrayDataset:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(40, 52, 3), dtype=np.uint8) for _ in range(num_images)]
    noise = RecordingNoise([0.02, 0.01, 0.005], np.eye(3), alphastd=0.1)
    transform = RecordingTransform(
        normalize=Normalize(mean=(0.0, 0.0, 0.0)), scale_min=32, scale_max=48, crop=24, color_noise=noise, seed=0
    )
    return ArrayDataset(images, transform)


def test_item_seed_depends_on_every_part():
    assert item_seed(0, 1, 2) == item_seed(0, 1, 2)
    assert len({item_seed(0, 1, 2), item_seed(0, 2, 1), item_seed(1, 1, 2), item_seed(0, 1, 3)}) == 4


def test_same_key_gives_the_same_augmentation_even_after_other_items():
    base = _dataset()
    seeded = EpochSeededDataset(base, seed=7)
    first, _ = seeded[(3, 2)]
    params, offset = base.transform.params[-1], base.transform.color_noise.offsets[-1]
    for key in [(0, 0), (3, 1), (5, 2)]:  # reading other items in between must not matter
        seeded[key]
    again, _ = seeded[(3, 2)]
    assert torch.equal(first, again)
    assert base.transform.params[-1] == params
    np.testing.assert_array_equal(base.transform.color_noise.offsets[-1], offset)
    # A different base seed is a different run.
    other, _ = EpochSeededDataset(base, seed=8)[(3, 2)]
    assert not torch.equal(first, other)


def test_each_epoch_draws_new_crop_flip_and_colour_noise():
    base = _dataset()
    seeded = EpochSeededDataset(base, seed=0)
    outputs = [seeded[(epoch, 4)][0] for epoch in range(8)]
    params = base.transform.params
    offsets = np.stack(base.transform.color_noise.offsets)
    assert len(params) == len(offsets) == 8
    assert len({p[0] for p in params}) > 1  # scale
    assert len({(p[1], p[2]) for p in params}) > 1  # crop position
    assert {p[3] for p in params} == {True, False}  # flip
    assert len({tuple(np.round(o, 6)) for o in offsets}) == 8  # alpha drawn anew every epoch
    assert all(not torch.equal(outputs[0], out) for out in outputs[1:])
    # The noise has the requested scale: alpha ~ N(0, 0.1) times eigval / value_scale, per channel.
    assert np.all(np.abs(offsets) < 5 * 0.1 * np.array([0.02, 0.01, 0.005]) * 255)


def test_batches_are_identical_with_and_without_loader_workers():
    base = _dataset(num_images=8)
    sampler = EpochBatchSampler(8, 3, seed=1, epoch=2)
    plain = [b for b, _ in DataLoader(EpochSeededDataset(base, seed=1), batch_sampler=sampler, num_workers=0)]
    workers = [b for b, _ in DataLoader(EpochSeededDataset(base, seed=1), batch_sampler=sampler, num_workers=2)]
    assert len(plain) == len(workers) == 2
    for a, b in zip(plain, workers):
        assert torch.equal(a, b)


def test_epoch_batch_sampler_covers_each_index_once_and_drops_the_tail():
    sampler = EpochBatchSampler(10, 3, seed=5, epoch=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 and all(len(b) == 3 for b in batches)
    indices = [i for b in batches for _, i in b]
    assert len(set(indices)) == 9 and set(indices) <= set(range(10))
    assert all(e == 0 for b in batches for e, _ in b)
    full = list(EpochBatchSampler(10, 3, seed=5, epoch=0, drop_last=False))
    assert [len(b) for b in full] == [3, 3, 3, 1]
    assert sorted(i for b in full for _, i in b) == list(range(10))
    assert full[:3] == batches  # the same permutation, only the tail differs


def test_epoch_batch_sampler_order_depends_on_seed_and_epoch_only():
    first = list(EpochBatchSampler(50, 5, seed=0, epoch=1))
    assert first == list(EpochBatchSampler(50, 5, seed=0, epoch=1))
    order = [i for b in first for _, i in b]
    assert order != [i for b in EpochBatchSampler(50, 5, seed=0, epoch=2) for _, i in b]
    assert order != [i for b in EpochBatchSampler(50, 5, seed=1, epoch=1) for _, i in b]
    assert all(e == 2 for b in EpochBatchSampler(50, 5, seed=0, epoch=2) for e, _ in b)


@pytest.mark.parametrize("start", [0, 1, 4, 9, 10])
def test_start_batch_skips_exactly_that_many_batches(start):
    full = list(EpochBatchSampler(23, 2, seed=3, epoch=4))
    resumed = EpochBatchSampler(23, 2, seed=3, epoch=4, start_batch=start)
    assert list(resumed) == full[start:]
    assert len(resumed) == 11 - start


def test_epoch_batch_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        EpochBatchSampler(5, 8, seed=0, epoch=0)
    with pytest.raises(ValueError, match="start_batch"):
        EpochBatchSampler(10, 2, seed=0, epoch=0, start_batch=6)


class CorruptAt(Dataset):
    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.from_numpy(read_image_rgb(self.path)).float()


def test_worker_errors_come_back_with_the_original_one_line_message(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ImageReadError) as wrapped:
        next(iter(DataLoader(CorruptAt(bad), batch_size=1, num_workers=1)))
    assert "DataLoader worker" in str(wrapped.value) and "Traceback" in str(wrapped.value)  # what torch does
    with pytest.raises(ImageReadError) as clean:
        with readable_worker_errors():
            next(iter(DataLoader(CorruptAt(bad), batch_size=1, num_workers=1)))
    message = str(clean.value)
    assert message == f"image file '{bad}' is corrupt or not an image format OpenCV can decode"
    assert original_worker_message(clean.value) is None


def test_errors_from_the_main_process_pass_unchanged():
    with pytest.raises(ValueError, match="^plain message$"):
        with readable_worker_errors():
            raise ValueError("plain message")
