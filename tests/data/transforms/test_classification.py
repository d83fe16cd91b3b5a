"""Tests for detres.data.transforms.classification: exact crop geometry, scale sampling, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detres.data.transforms.classification import (
    CenterCropEvalTransform,
    MultiScaleEvalTransform,
    Normalize,
    PadCropTrainTransform,
    ScaleAugmentTrainTransform,
    TenCropEvalTransform,
    eval_transform_for_mode,
    resize_shorter_side,
    shorter_side_size,
    train_transform_for_kind,
)
from detres.data.transforms.color_pca import PCAColorNoise
from detres.data.transforms.imagenet_stats import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

ZERO = Normalize(mean=(0.0, 0.0, 0.0))


def _coord_image(h: int, w: int) -> np.ndarray:
    """float32 image whose channels are (row, column, 7): every pixel says where it came from."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.float32)


def _window(top: int, left: int, size: int, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(np.arange(top, top + size), np.arange(left, left + size), indexing="ij")
    return rows, (cols[:, ::-1] if flip else cols)


def test_shorter_side_size_hand_values() -> None:
    assert shorter_side_size(300, 400, 256) == (256, 341)  # 400 * 256 / 300 = 341.33
    assert shorter_side_size(500, 375, 256) == (341, 256)
    assert shorter_side_size(333, 500, 256) == (256, 384)  # 384.38
    assert shorter_side_size(64, 64, 32) == (32, 32)


def test_resize_shorter_side_is_exact() -> None:
    # 322 * (256 / 322) is 255.99999999999997 in floating point: the shorter side must still be 256.
    image = np.zeros((322, 500, 3), dtype=np.uint8)
    assert resize_shorter_side(image, 256).shape == (256, 398, 3)
    assert resize_shorter_side(image.transpose(1, 0, 2), 256).shape == (398, 256, 3)
    small = np.full((20, 30, 3), 77, dtype=np.uint8)
    up = resize_shorter_side(small, 40)
    assert up.shape == (40, 60, 3) and np.all(up == 77)  # bilinear keeps a constant image constant


def test_ten_crop_geometry_square_256() -> None:
    out = TenCropEvalTransform(normalize=ZERO, resize=256, crop=224)(_coord_image(256, 256))
    assert out.shape == (10, 3, 224, 224) and out.dtype == torch.float32
    offsets = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    for i, (top, left) in enumerate(offsets * 2):
        rows, cols = _window(top, left, 224, flip=i >= 5)
        np.testing.assert_array_equal(out[i, 0].numpy(), rows, err_msg=f"crop {i} rows")
        np.testing.assert_array_equal(out[i, 1].numpy(), cols, err_msg=f"crop {i} cols")
        assert torch.all(out[i, 2] == 7)


@pytest.mark.parametrize(
    "shape, offsets",
    [
        # 256x320 (shorter side already 256): central square = columns 32..287, so the corner
        # patches start at columns 32 and 32 + 256 - 224 = 64, rows 0 and 32; centre at (16, 48).
        ((256, 320), [(0, 32), (0, 64), (32, 32), (32, 64), (16, 48)]),
        # 300x256 (portrait): central square = rows 22..277 -> rows 22 and 54, columns 0 and 32.
        ((300, 256), [(22, 0), (22, 32), (54, 0), (54, 32), (38, 16)]),
    ],
    ids=["landscape", "portrait"],
)
def test_ten_crop_takes_the_corners_of_the_central_square(shape, offsets) -> None:
    out = TenCropEvalTransform(normalize=ZERO, resize=256, crop=224)(_coord_image(*shape))
    assert out.shape == (10, 3, 224, 224)
    for i, (top, left) in enumerate(offsets * 2):
        rows, cols = _window(top, left, 224, flip=i >= 5)
        np.testing.assert_array_equal(out[i, 0].numpy(), rows, err_msg=f"crop {i} rows")
        np.testing.assert_array_equal(out[i, 1].numpy(), cols, err_msg=f"crop {i} cols")
    # Not the corners of the whole rectangle: nothing comes from outside the central square.
    h, w = shape
    side = min(h, w)
    assert out[:, 0].min() == (h - side) // 2 and out[:, 0].max() == (h - side) // 2 + side - 1
    assert out[:, 1].min() == (w - side) // 2 and out[:, 1].max() == (w - side) // 2 + side - 1


def test_ten_crop_resizes_then_cuts_the_central_square() -> None:
    # 300x400 -> shorter side 256 -> 256x341; the central 256x256 square starts at column 42.
    image = np.random.default_rng(4).integers(0, 256, size=(300, 400, 3)).astype(np.uint8)
    out = TenCropEvalTransform(normalize=ZERO, resize=256, crop=224)(image)
    resized = resize_shorter_side(image, 256).astype(np.float32)
    assert resized.shape == (256, 341, 3)
    for i, (top, left) in enumerate([(0, 42), (0, 74), (32, 42), (32, 74), (16, 58)]):
        patch = resized[top : top + 224, left : left + 224]
        np.testing.assert_array_equal(out[i].numpy(), np.moveaxis(patch, -1, 0), err_msg=f"crop {i}")
        np.testing.assert_array_equal(out[i + 5].numpy(), np.moveaxis(patch[:, ::-1], -1, 0), err_msg=f"flip {i}")
    # resize=None keeps the size and uses the central min(H, W) square: 10x14 -> columns 2..11.
    small = TenCropEvalTransform(normalize=ZERO, resize=None, crop=8)(_coord_image(10, 14))
    assert [int(small[i, 1, 0, 0]) for i in range(5)] == [2, 4, 2, 4, 3]
    assert [int(small[i, 0, 0, 0]) for i in range(5)] == [0, 0, 2, 2, 1]


def test_ten_crop_subtracts_mean_image_in_each_crop_frame() -> None:
    mean_image = np.random.default_rng(0).normal(size=(8, 8, 3)).astype(np.float32)
    image = _coord_image(10, 10)
    out = TenCropEvalTransform(normalize=Normalize(mean_image=mean_image), resize=None, crop=8)(image)
    np.testing.assert_allclose(out[5].numpy(), np.moveaxis(image[:8, 7::-1] - mean_image, -1, 0), rtol=1e-6)


def test_center_crop_geometry() -> None:
    out = CenterCropEvalTransform(normalize=ZERO, resize=256, crop=224)(_coord_image(300, 256))
    rows, cols = _window(38, 16, 224)
    np.testing.assert_array_equal(out[0].numpy(), rows)
    np.testing.assert_array_equal(out[1].numpy(), cols)
    whole = CenterCropEvalTransform(normalize=ZERO, resize=None, crop=None)(_coord_image(5, 6))
    assert whole.shape == (3, 5, 6)


def test_scale_augment_params_cover_paper_range() -> None:
    t = ScaleAugmentTrainTransform(normalize=ZERO, scale_min=40, scale_max=48, crop=32, seed=0)
    params = [t.sample_params(60, 90) for _ in range(3000)]
    scales = np.array([p["scale"] for p in params])
    assert set(scales.tolist()) == set(range(40, 49))  # inclusive integers, both ends
    counts = np.bincount(scales - 40)
    assert counts.min() > 3000 / 9 * 0.75  # roughly uniform
    for p in params:
        h, w = shorter_side_size(60, 90, p["scale"])
        assert 0 <= p["top"] <= h - 32 and 0 <= p["left"] <= w - 32
    assert 0.45 < np.mean([p["flip"] for p in params]) < 0.55


def test_scale_augment_crop_and_flip_exact() -> None:
    t = ScaleAugmentTrainTransform(normalize=ZERO, scale_min=40, scale_max=48, crop=32)
    image = _coord_image(40, 50)  # shorter side already 40: no resampling at scale 40
    out = t.crop_and_flip(image, scale=40, top=5, left=11, flip=True)
    rows, cols = _window(5, 11, 32, flip=True)
    np.testing.assert_array_equal(out[..., 0], rows)
    np.testing.assert_array_equal(out[..., 1], cols)


def test_scale_augment_full_pipeline_composes_parts() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(50, 70, 3)).astype(np.uint8)
    mean_image = rng.normal(120, 5, size=(32, 32, 3)).astype(np.float32)
    eig = dict(eigvals=[0.2, 0.02, 0.005], eigvecs=np.linalg.qr(rng.normal(size=(3, 3)))[0])
    kwargs = dict(normalize=Normalize(mean_image=mean_image, std=(2.0, 4.0, 8.0)), scale_min=40, scale_max=48, crop=32)
    t = ScaleAugmentTrainTransform(**kwargs, color_noise=PCAColorNoise(**eig), seed=11)
    ref = ScaleAugmentTrainTransform(**kwargs, color_noise=PCAColorNoise(**eig), seed=11)
    out = t(image)
    g = ref.rng.generator()
    params = ref.sample_params(50, 70, rng=g)
    offset = ref.color_noise.sample_offset(g)
    expected = (ref.crop_and_flip(image, **params) + offset - mean_image) / np.array([2.0, 4.0, 8.0])
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out.numpy(), np.moveaxis(expected, -1, 0), rtol=1e-5, atol=1e-4)
    assert not torch.equal(t(image), out)  # next call draws new parameters


def test_cifar_pad_crop_flip() -> None:
    t = train_transform_for_kind("cifar", normalize=ZERO, seed=0)
    assert isinstance(t, PadCropTrainTransform)
    image = _coord_image(32, 32) + 1.0  # +1 so padded zeros are distinguishable
    out = t.crop_and_flip(image, top=0, left=8, flip=False)
    # rows -4..27, cols 4..35: first 4 rows are padding (0), last 4 columns are padding
    assert np.all(out[:4] == 0) and np.all(out[:, 28:] == 0)
    np.testing.assert_array_equal(out[4:, :28, 1], np.broadcast_to(np.arange(4, 32) + 1.0, (28, 28)))
    seen = {(p["top"], p["left"]) for p in (t.sample_params(32, 32) for _ in range(2000))}
    assert seen == {(a, b) for a in range(9) for b in range(9)}
    assert t(np.zeros((32, 32, 3), np.uint8)).shape == (3, 32, 32)


def test_normalize_per_channel_with_std() -> None:
    image = np.full((2, 3, 3), 200.0, dtype=np.float32)
    out = Normalize(mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB)(image)
    np.testing.assert_allclose(out[0, 0], (200.0 - np.array(IMAGENET_MEAN_RGB)) / np.array(IMAGENET_STD_RGB), rtol=1e-6)


def test_normalize_errors() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Normalize()
    with pytest.raises(ValueError, match="exactly one"):
        Normalize(mean=(1, 2, 3), mean_image=np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="std"):
        Normalize(mean=(1, 2, 3), std=(1, 0, 1))
    with pytest.raises(ValueError, match="per-pixel mean image is"):
        Normalize(mean_image=np.zeros((4, 4, 3)))(np.zeros((5, 5, 3)))


def test_multiscale_returns_full_images_per_scale() -> None:
    t = eval_transform_for_mode("multiscale", normalize=Normalize(mean=(10.0, 20.0, 30.0)), scales=(24, 32, 48))
    views = t(np.full((48, 64, 3), 40, dtype=np.uint8))
    assert [tuple(v.shape) for v in views] == [(3, 24, 32), (3, 32, 43), (3, 48, 64)]
    assert torch.allclose(views[1][:, 5, 5], torch.tensor([30.0, 20.0, 10.0]))
    with pytest.raises(ValueError, match="per-channel"):
        MultiScaleEvalTransform(normalize=Normalize(mean_image=np.zeros((8, 8, 3))))


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="scale_min"):
        ScaleAugmentTrainTransform(normalize=ZERO, scale_min=200, scale_max=480, crop=224)
    with pytest.raises(ValueError, match="scale_max"):
        ScaleAugmentTrainTransform(normalize=ZERO, scale_min=300, scale_max=256)
    with pytest.raises(ValueError, match="kind"):
        train_transform_for_kind("svhn", normalize=ZERO)
    with pytest.raises(ValueError, match="mode"):
        eval_transform_for_mode("5crop", normalize=ZERO)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        CenterCropEvalTransform(normalize=ZERO)(np.zeros((10, 10)))


def test_set_random_seed_repeats_draws() -> None:
    image = np.random.default_rng(3).integers(0, 256, size=(45, 60, 3)).astype(np.uint8)
    noise = PCAColorNoise([0.2, 0.02, 0.005], np.eye(3))
    for t in (
        ScaleAugmentTrainTransform(normalize=ZERO, scale_min=32, scale_max=44, crop=24, color_noise=noise),
        PadCropTrainTransform(normalize=ZERO, pad=4, crop=32, color_noise=noise),
    ):
        t.set_random_seed(5)
        a = t(image)
        t.set_random_seed(5)
        assert torch.equal(t(image), a)
        t.set_random_seed(6)
        assert not torch.equal(t(image), a)
