"""Tests for detres.data.collate: zero padding to a multiple of the divisibility, targets and metadata lists."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from detres.data.collate import collate_detection, pad_images


def _sample(h: int, w: int, n: int, image_id: int, fill: float) -> dict:
    return {
        "image": torch.full((3, h, w), fill),
        "boxes": torch.arange(4 * n, dtype=torch.float32).reshape(n, 4),
        "labels": torch.arange(1, n + 1),
        "difficult": torch.zeros(n, dtype=torch.bool),
        "image_id": image_id,
        "orig_size": (2 * h, 2 * w),
        "scale": 0.5,
        "scale_xy": (0.5, 0.5),
        "file_name": f"img{image_id}.jpg",
    }


def test_images_padded_with_zeros_to_a_multiple_of_16() -> None:
    a, b = _sample(5, 7, 2, 1, 3.0), _sample(10, 4, 0, 2, 7.0)
    batch = collate_detection([a, b])
    images = batch["images"]
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert batch["image_sizes"] == [(5, 7), (10, 4)]
    assert (images[0, :, :5, :7] == 3).all() and images[0].sum() == 3 * 5 * 7 * 3
    assert (images[1, :, :10, :4] == 7).all() and images[1].sum() == 7 * 10 * 4 * 3


def test_divisibility_choices() -> None:
    a, b = _sample(5, 7, 1, 1, 1.0), _sample(10, 4, 1, 2, 1.0)
    assert collate_detection([a, b], size_divisibility=0)["images"].shape == (2, 3, 10, 7)
    assert collate_detection([a, b], size_divisibility=1)["images"].shape == (2, 3, 10, 7)
    assert collate_detection([a, b], size_divisibility=32)["images"].shape == (2, 3, 32, 32)
    assert pad_images([torch.ones(3, 17, 16)], 16).shape == (1, 3, 32, 16)


@pytest.mark.parametrize("divisibility", [0, 1, 16, 32])
def test_one_image_is_padded_as_in_a_batch(divisibility: int) -> None:
    """A single image takes F.pad (its amounts stay traced under torch.jit.trace): the same values as a batch's slot,
    in a new tensor."""
    image, small = torch.rand(3, 17, 21) * 255, torch.rand(3, 5, 4)
    alone = pad_images([image], divisibility, pad_value=-1.0)
    assert torch.equal(alone, pad_images([image, small], divisibility, pad_value=-1.0)[:1])
    assert alone.data_ptr() != image.data_ptr()


def test_targets_and_metadata_lists() -> None:
    a, b = _sample(5, 7, 2, 11, 1.0), _sample(10, 4, 0, 12, 1.0)
    del b["difficult"]  # non-VOC samples may omit it
    batch = collate_detection([a, b])
    assert batch["image_ids"] == [11, 12]
    assert batch["orig_sizes"] == [(10, 14), (20, 8)]
    assert batch["scales"] == [0.5, 0.5] and batch["scales_xy"] == [(0.5, 0.5), (0.5, 0.5)]
    assert batch["file_names"] == ["img11.jpg", "img12.jpg"]
    t0, t1 = batch["targets"]
    assert t0["boxes"] is a["boxes"] and t0["labels"] is a["labels"]
    assert t1["boxes"].shape == (0, 4) and t1["difficult"].shape == (0,) and t1["difficult"].dtype == torch.bool


def test_works_as_dataloader_collate_fn() -> None:
    data = [_sample(4 + i, 6 - i, i % 2, i, float(i + 1)) for i in range(5)]
    loader = DataLoader(data, batch_size=2, collate_fn=collate_detection)
    batches = list(loader)
    assert [len(b["image_ids"]) for b in batches] == [2, 2, 1]
    last = batches[-1]
    assert last["images"].shape == (1, 3, 16, 16) and last["image_sizes"] == [(8, 2)]
    assert (last["images"][0, :, :8, :2] == 5).all()


def test_bad_batches_raise() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate_detection([])
    s = _sample(4, 4, 1, 1, 1.0)
    del s["labels"]
    with pytest.raises(ValueError, match=r"img1\.jpg.*labels"):
        collate_detection([s])
    with pytest.raises(ValueError, match=r"image 1 must be a \[3, H, W\]"):
        pad_images([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)])


def test_crowd_boxes_go_into_the_targets() -> None:
    a, b = _sample(5, 7, 2, 1, 1.0), _sample(10, 4, 1, 2, 1.0)
    a["crowd_boxes"] = torch.tensor([[1.0, 1.0, 4.0, 3.0]])
    b["crowd_boxes"] = torch.zeros(0, 4)
    c = _sample(6, 6, 1, 3, 1.0)  # a hand-made / VOC-style sample without the key
    t0, t1, t2 = collate_detection([a, b, c])["targets"]
    assert t0["crowd_boxes"].dtype == torch.float32 and t0["crowd_boxes"].tolist() == [[1.0, 1.0, 4.0, 3.0]]
    assert t1["crowd_boxes"].shape == (0, 4) and t2["crowd_boxes"].shape == (0, 4)
    assert t2["crowd_boxes"].dtype == torch.float32
