"""Tests for detres.data.transforms.detection: Faster R-CNN resize rule, exact flips, zero boxes, tensor conversion."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import detres.data.transforms.detection as det_transforms
from detres.data.transforms.detection import (
    DetectionTransform,
    build_det_transforms,
    faster_rcnn_scale,
    finalize_sample,
    sample_to_tensors,
)


def _sample(h: int, w: int, boxes, labels=None, difficult=None) -> dict:
    rng = np.random.default_rng(h * 1000 + w)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = len(boxes)
    return {
        "image": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
        "boxes": boxes,
        "labels": np.arange(1, n + 1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64),
        "difficult": np.zeros(n, bool) if difficult is None else np.asarray(difficult, dtype=bool),
        "image_id": 7,
        "orig_size": (h, w),
        "file_name": "synthetic.jpg",
        "scale": 1.0,
        "scale_xy": (1.0, 1.0),
    }


@pytest.mark.parametrize(
    "hw, min_size, max_size, expected",
    [
        ((480, 640), 600, 1000, 600 / 480),  # shorter side rule: 600x800
        ((400, 1000), 600, 1000, 1000 / 1000),  # 600/400 would make the long side 1500 > 1000
        ((300, 1200), 600, 1000, 1000 / 1200),  # max binds: 250x1000
        ((1000, 500), 600, 1000, 1000 / 1000),  # portrait: 600/500 would make the long side 1200
        ((100, 50), 600, None, 12.0),  # no cap
    ],
)
def test_faster_rcnn_scale_by_hand(hw, min_size, max_size, expected) -> None:
    h, w = hw
    assert faster_rcnn_scale(h, w, min_size, max_size) == pytest.approx(expected)


def test_shorter_side_resize_scales_image_and_boxes() -> None:
    # 100x200 image, shorter side 50 -> exactly half size.
    t = build_det_transforms(train=False, min_size=50, max_size=1000)
    out = t(_sample(100, 200, [[10, 20, 110, 80], [0, 0, 200, 100]]))
    assert out["image"].shape == (50, 100, 3) and out["image"].dtype == np.uint8
    np.testing.assert_allclose(out["boxes"], [[5, 10, 55, 40], [0, 0, 100, 50]], atol=1e-3)
    assert out["scale"] == pytest.approx(0.5) and out["scale_xy"] == pytest.approx((0.5, 0.5))
    np.testing.assert_array_equal(out["labels"], [1, 2])
    assert out["orig_size"] == (100, 200) and out["image_id"] == 7  # metadata passes through


def test_max_size_binds() -> None:
    # 100x400, min 60 would give 60x240; the longer side is capped at 200 -> scale 0.5, 50x200.
    t = build_det_transforms(train=False, min_size=60, max_size=200)
    out = t(_sample(100, 400, [[40, 10, 400, 90]]))
    assert out["image"].shape == (50, 200, 3)
    assert out["scale"] == pytest.approx(0.5)
    np.testing.assert_allclose(out["boxes"], [[20, 5, 200, 45]], atol=1e-3)


def test_rounded_size_gives_exact_per_axis_scale() -> None:
    # 101x203 with shorter side 50: scale 50/101, new size round(50.0) x round(100.49...) = 50x100.
    t = build_det_transforms(train=False, min_size=50, max_size=1000)
    out = t(_sample(101, 203, [[0, 0, 203, 101], [20.3, 10.1, 40.6, 20.2]]))
    assert out["image"].shape == (50, 100, 3)
    assert out["scale"] == pytest.approx(50 / 101)
    sx, sy = out["scale_xy"]
    assert (sx, sy) == pytest.approx((100 / 203, 50 / 101))
    np.testing.assert_allclose(out["boxes"][0], [0, 0, 100, 50], atol=1e-3)
    np.testing.assert_allclose(out["boxes"][1], [20.3 * sx, 10.1 * sy, 40.6 * sx, 20.2 * sy], atol=1e-3)


def test_flip_maps_boxes_exactly_and_mirrors_pixels() -> None:
    # min_size equal to the shorter side: no resize, so only the flip acts.
    t = build_det_transforms(train=True, min_size=64, max_size=1000, flip_prob=1.0, seed=0)
    sample = _sample(64, 96, [[10, 5, 30, 40], [0, 0, 96, 64], [90.5, 1, 96, 2]])
    out = t(sample)
    assert out["image"].shape == (64, 96, 3)
    np.testing.assert_array_equal(out["image"], sample["image"][:, ::-1])
    w = 96
    b = sample["boxes"]
    expected = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1)
    np.testing.assert_allclose(out["boxes"], expected, atol=1e-4)
    np.testing.assert_array_equal(out["labels"], sample["labels"])


def test_flip_after_resize_uses_the_resized_width() -> None:
    t = build_det_transforms(train=True, min_size=32, max_size=1000, flip_prob=1.0, seed=0)
    out = t(_sample(64, 96, [[10, 5, 30, 40]]))  # scale 0.5 -> 32x48, box (5, 2.5, 15, 20)
    np.testing.assert_allclose(out["boxes"], [[48 - 15, 2.5, 48 - 5, 20]], atol=1e-4)


def test_flip_probability_half_flips_some_not_all() -> None:
    t = build_det_transforms(train=True, min_size=16, max_size=1000, flip_prob=0.5, seed=3)
    flips = []
    for _ in range(400):
        out = t(_sample(16, 32, [[0, 0, 4, 16]]))
        flips.append(bool(out["boxes"][0, 0] > 1))
    # Binomial(400, 0.5): 200 +- 10 (one sd). Within 4 sd; flip probability 0.3 or 0.7 would be > 4 sd out.
    assert abs(sum(flips) - 200) <= 40, sum(flips)


def test_zero_boxes_are_fine() -> None:
    for train in (True, False):
        t = build_det_transforms(train=train, min_size=32, max_size=100, flip_prob=1.0, seed=0)
        out = t(_sample(48, 64, np.zeros((0, 4))))
        assert out["image"].shape == (32, 43, 3)  # 64 * 32/48 = 42.67 -> 43
        assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["difficult"].shape == (0,)
        tensors = sample_to_tensors(out)
        assert tensors["boxes"].shape == (0, 4) and tensors["labels"].dtype == torch.int64


def test_boxes_stay_inside_the_image_and_fields_stay_aligned() -> None:
    rng = np.random.default_rng(1)
    t = build_det_transforms(train=True, min_size=(33, 47, 61), max_size=90, flip_prob=0.5, seed=1)
    for _ in range(20):
        h, w = int(rng.integers(20, 80)), int(rng.integers(20, 80))
        xy = rng.uniform(0, 1, size=(6, 2)) * [w, h]
        wh = rng.uniform(0.5, 1, size=(6, 2)) * ([w, h] - xy)
        boxes = np.concatenate([xy, xy + wh], axis=1)
        boxes[0] = [0, 0, w, h]  # touches every edge
        difficult = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
        out = t(_sample(h, w, boxes, labels=[3, 1, 4, 1, 5, 9], difficult=difficult))
        h1, w1 = out["image"].shape[:2]
        assert min(h1, w1) in (33, 47, 61) or max(h1, w1) == 90
        b = out["boxes"]
        # Exactly the input boxes scaled by (W1 / W, H1 / H), and mirrored in the resized width when flipped.
        sx, sy = out["scale_xy"]
        assert (sx, sy) == pytest.approx((w1 / w, h1 / h))
        scaled = boxes * [sx, sy, sx, sy]
        mirrored = np.stack([w1 - scaled[:, 2], scaled[:, 1], w1 - scaled[:, 0], scaled[:, 3]], axis=1)
        assert np.allclose(b, scaled, atol=1e-3) or np.allclose(b, mirrored, atol=1e-3), (b, scaled)
        np.testing.assert_allclose(b[0], [0, 0, w1, h1], atol=1e-3)
        np.testing.assert_array_equal(out["labels"], [3, 1, 4, 1, 5, 9])
        np.testing.assert_array_equal(out["difficult"], difficult)


def test_multi_scale_training_draws_from_the_given_sizes() -> None:
    t = build_det_transforms(train=True, min_size=(20, 30, 40), max_size=1000, flip_prob=0.0, seed=5)
    seen = {t(_sample(50, 60, [[1, 1, 9, 9]]))["image"].shape[0] for _ in range(30)}
    assert seen == {20, 30, 40}


def test_seed_makes_augmentation_reproducible() -> None:
    def run(seed: int) -> list:
        t = build_det_transforms(train=True, min_size=(20, 30, 40), max_size=1000, flip_prob=0.5, seed=seed)
        return [tuple(t(_sample(50, 60, [[1, 1, 9, 9]]))["boxes"][0].tolist()) for _ in range(12)]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_each_dataloader_worker_gets_its_own_augmentation_stream(monkeypatch) -> None:
    t = build_det_transforms(train=True, min_size=16, max_size=1000, flip_prob=0.5, seed=0)

    def flips(worker_id: int, worker_seed: int) -> list[bool]:
        info = SimpleNamespace(id=worker_id, seed=worker_seed)
        monkeypatch.setattr(det_transforms, "get_worker_info", lambda: info)
        return [bool(t(_sample(16, 32, [[0, 0, 4, 16]]))["boxes"][0, 0] > 1) for _ in range(24)]

    a = flips(0, 1000)
    b = flips(1, 1001)
    assert a != b  # two workers forked from one transform must not repeat each other
    assert flips(0, 1000) == a  # a worker's stream depends only on its seed


def test_a_per_sample_seed_fixes_that_samples_draws_whatever_came_before(monkeypatch) -> None:
    t = build_det_transforms(train=True, min_size=(20, 30, 40), max_size=1000, flip_prob=0.5, seed=0)

    def draw(seed: int) -> tuple:
        t.set_random_seed(seed)
        out = t(_sample(50, 60, [[1, 1, 9, 9]]))
        return out["image"].shape[:2], tuple(out["boxes"][0].tolist())

    first = [draw(s) for s in range(16)]
    for _ in range(5):
        t(_sample(50, 60, [[1, 1, 9, 9]]))  # unseeded draws in between change nothing
    # inside a DataLoader worker the per-worker reseeding must not override the per-sample seed
    monkeypatch.setattr(det_transforms, "get_worker_info", lambda: SimpleNamespace(id=1, seed=777))
    assert [draw(s) for s in reversed(range(16))] == first[::-1]
    assert len({shape for shape, _ in first}) == 3 and len({box[0] for _, box in first}) > 1  # scales and flips vary


def test_invalid_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="min_size"):
        build_det_transforms(train=False, min_size=(600, 800))
    with pytest.raises(ValueError, match="min_size"):
        build_det_transforms(train=True, min_size=0)
    with pytest.raises(ValueError, match="flip_prob"):
        DetectionTransform(flip_prob=1.5)
    t = build_det_transforms(train=False, min_size=32)
    with pytest.raises(ValueError, match=r"synthetic\.jpg.*zero or negative"):
        t(_sample(40, 40, [[5, 5, 5, 10]]))
    with pytest.raises(ValueError, match=r"synthetic\.jpg.*outside"):
        t(_sample(40, 40, [[5, 5, 50, 10]]))
    bad = _sample(40, 40, [[1, 1, 2, 2]])
    bad["image"] = torch.zeros(3, 40, 40)
    with pytest.raises(ValueError, match="numpy HxWx3"):
        t(bad)


def test_sample_to_tensors_matches_the_contract() -> None:
    s = _sample(5, 7, [[1, 2, 3, 4]], labels=[2], difficult=[True])
    out = sample_to_tensors(s)
    img = out["image"]
    assert img.dtype == torch.float32 and img.shape == (3, 5, 7) and img.is_contiguous()
    np.testing.assert_array_equal(img.numpy(), s["image"].transpose(2, 0, 1).astype(np.float32))
    assert out["boxes"].dtype == torch.float32 and out["boxes"].shape == (1, 4)
    assert out["labels"].dtype == torch.int64 and out["labels"].tolist() == [2]
    assert out["difficult"].dtype == torch.bool and out["difficult"].tolist() == [True]
    del s["difficult"]
    assert sample_to_tensors(s)["difficult"].tolist() == [False]


def test_finalize_sample_rejects_transforms_that_lose_the_sample() -> None:
    with pytest.raises(TypeError, match="must return the sample dict"):
        finalize_sample(_sample(5, 5, [[1, 1, 2, 2]]), lambda s: None)


def test_crowd_boxes_are_resized_and_flipped_like_gt_boxes() -> None:
    # 64x96 -> shorter side 32: scale 0.5, 32x48; then flipped about the resized width 48.
    t = build_det_transforms(train=True, min_size=32, max_size=1000, flip_prob=1.0, seed=0)
    sample = _sample(64, 96, [[10, 5, 30, 40]], labels=[2])
    sample["crowd_boxes"] = np.array([[40, 8, 96, 32], [0, 0, 12, 64]], dtype=np.float32)
    out = t(sample)
    # Resized then flipped: gt (5, 2.5, 15, 20) -> (33, 2.5, 43, 20);
    # crowd (20, 4, 48, 16) -> (0, 4, 28, 16) and (0, 0, 6, 32) -> (42, 0, 48, 32).
    np.testing.assert_allclose(out["boxes"], [[33, 2.5, 43, 20]], atol=1e-4)
    np.testing.assert_allclose(out["crowd_boxes"], [[0, 4, 28, 16], [42, 0, 48, 32]], atol=1e-4)
    np.testing.assert_array_equal(out["labels"], [2])  # the crowd regions do not shift the gt fields
    tensors = sample_to_tensors(out)
    assert tensors["crowd_boxes"].dtype == torch.float32 and tensors["crowd_boxes"].shape == (2, 4)
    # Without flip (test transforms) only the resize acts.
    plain = build_det_transforms(train=False, min_size=32, max_size=1000)(sample)
    np.testing.assert_allclose(plain["crowd_boxes"], [[20, 4, 48, 16], [0, 0, 6, 32]], atol=1e-4)


def test_crowd_boxes_empty_or_absent() -> None:
    t = build_det_transforms(train=True, min_size=32, max_size=1000, flip_prob=1.0, seed=0)
    sample = _sample(64, 96, [[10, 5, 30, 40]])
    sample["crowd_boxes"] = np.zeros((0, 4), np.float32)
    out = t(sample)
    assert out["crowd_boxes"].shape == (0, 4)
    np.testing.assert_allclose(out["boxes"], [[33, 2.5, 43, 20]], atol=1e-4)
    absent = t(_sample(64, 96, [[10, 5, 30, 40]]))  # VOC-style sample: no key, none made up here ...
    assert "crowd_boxes" not in absent
    tensors = sample_to_tensors(absent)  # ... but the tensor sample always has one, [0, 4] float32
    assert tensors["crowd_boxes"].shape == (0, 4) and tensors["crowd_boxes"].dtype == torch.float32
    bad = _sample(64, 96, [[10, 5, 30, 40]])
    bad["crowd_boxes"] = np.array([[5, 5, 5, 9]], np.float32)
    with pytest.raises(ValueError, match="crowd_boxes"):
        t(bad)
