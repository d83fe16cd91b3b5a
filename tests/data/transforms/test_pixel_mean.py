"""Tests for detres.data.transforms.pixel_mean: per-pixel mean image and per-channel statistics."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import pytest

from detres.data.datasets.imagefolder import ImageFolderDataset
from detres.data.transforms.pixel_mean import (
    compute_pixel_stats,
)


def _save(path: Path, rgb: np.ndarray) -> str:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return str(path)


def test_constant_images_of_different_sizes(tmp_path: Path) -> None:
    # Resizing keeps a constant image constant, so the answer is known by hand.
    a = _save(tmp_path / "a.png", np.full((40, 60, 3), (10, 20, 30), np.uint8))
    b = _save(tmp_path / "b.png", np.full((70, 35, 3), (50, 100, 130), np.uint8))
    stats = compute_pixel_stats([a, b], resize=32, crop=24)
    assert stats.mean_image.shape == (24, 24, 3) and stats.mean_image.dtype == np.float32
    np.testing.assert_allclose(stats.mean_image, np.broadcast_to([30.0, 60.0, 80.0], (24, 24, 3)))
    np.testing.assert_allclose(stats.channel_mean, [30.0, 60.0, 80.0])
    np.testing.assert_allclose(stats.channel_std, [20.0, 40.0, 50.0], rtol=1e-6)
    assert stats.num_images == 2


def test_mean_image_is_per_pixel_average_of_centre_crops(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=s + (3,)).astype(np.uint8) for s in [(8, 10), (9, 8), (8, 8)]]
    paths = [_save(tmp_path / f"{i}.png", im) for i, im in enumerate(images)]
    # centre 6x6 windows: offsets (1,2), (1,1), (1,1) — computed by hand from (H-6)//2, (W-6)//2
    crops = np.stack([images[0][1:7, 2:8], images[1][1:7, 1:7], images[2][1:7, 1:7]]).astype(np.float64)
    stats = compute_pixel_stats(paths, resize=None, crop=6)
    np.testing.assert_allclose(stats.mean_image, crops.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.channel_std, crops.reshape(-1, 3).std(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats.channel_mean, stats.mean_image.mean(axis=(0, 1)), rtol=1e-6)


def test_max_images_takes_a_seeded_random_subset(tmp_path: Path) -> None:
    colors = [(0, 0, 0), (90, 90, 90), (240, 240, 240)]
    paths = [_save(tmp_path / f"{i}.png", np.full((4, 4, 3), c, np.uint8)) for i, c in enumerate(colors)]
    stats = compute_pixel_stats(paths, resize=None, crop=4, max_images=2, seed=1)
    assert stats.num_images == 2
    pair_means = [np.mean([colors[i][0], colors[j][0]]) for i, j in combinations(range(3), 2)]
    assert any(np.isclose(stats.channel_mean[0], m) for m in pair_means)
    again = compute_pixel_stats(paths, resize=None, crop=4, max_images=2, seed=1)
    np.testing.assert_array_equal(again.mean_image, stats.mean_image)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    small = _save(tmp_path / "tiny.png", np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="tiny.png"):
        compute_pixel_stats([small], resize=None, crop=8)
    with pytest.raises(ValueError, match="crop"):
        compute_pixel_stats([small], resize=16, crop=32)
    with pytest.raises(ValueError, match="empty"):
        compute_pixel_stats([], resize=16, crop=8)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        compute_pixel_stats([str(tmp_path / "gone.png")], resize=16, crop=8)


def test_real_cifar10_channel_means(shared_dir: Path) -> None:
    root = shared_dir / "data" / "cifar10" / "train"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    paths = ImageFolderDataset(root).paths[::10]  # 500 of the 5000 images, 50 per class
    stats = compute_pixel_stats(paths, resize=None, crop=32)
    # Reference: the same images read by OpenCV directly, BGR flipped to RGB, statistics by numpy.
    pixels = np.stack(
        [cv2.imread(str(p), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)[..., ::-1] for p in paths]
    ).astype(np.float64)
    assert pixels.shape == (500, 32, 32, 3)
    np.testing.assert_allclose(stats.mean_image, pixels.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.channel_mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(stats.channel_std, pixels.reshape(-1, 3).std(axis=0), rtol=1e-5)
    # CIFAR-10 training means are about (125.3, 123.0, 113.9), stds about (63.0, 62.1, 66.7);
    # 500 images land within a few grey levels, and the RGB order shows (blue lowest).
    np.testing.assert_allclose(stats.channel_mean, [125.3, 123.0, 113.9], atol=8.0)
    np.testing.assert_allclose(stats.channel_std, [63.0, 62.1, 66.7], atol=6.0)
