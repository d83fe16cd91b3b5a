"""Tests for detres.data.transforms.color_pca: RGB PCA against np.cov, noise statistics, worker seeding."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from detres.data.transforms.color_pca import (
    ColorPCA,
    PCAColorNoise,
    RGBCovarianceAccumulator,
    WorkerSeededRNG,
    color_pca_from_covariance,
    compute_color_pca,
)


def _correlated_images(rng: np.random.Generator, sizes) -> list[np.ndarray]:
    images = []
    for h, w in sizes:
        base = rng.integers(0, 200, size=(h, w, 1))
        noise = rng.integers(0, 56, size=(h, w, 3))
        images.append((base + noise * np.array([1, 0.5, 0.2])).astype(np.uint8))
    return images


@pytest.fixture()
def toy_set(tmp_path: Path) -> tuple[list[str], list[np.ndarray]]:
    images = _correlated_images(np.random.default_rng(1), [(12, 9), (7, 15), (10, 10)])
    paths = []
    for i, im in enumerate(images):
        p = tmp_path / f"im{i}.png"
        cv2.imwrite(str(p), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
        paths.append(str(p))
    return paths, images


def test_pca_matches_numpy_cov(toy_set) -> None:
    paths, images = toy_set
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64) / 255.0
    ref_cov = np.cov(pixels, rowvar=False)
    ref_vals = np.sort(np.linalg.eigvalsh(ref_cov))[::-1]

    pca = compute_color_pca(paths)
    assert pca.num_pixels == pixels.shape[0]
    np.testing.assert_allclose(pca.eigvals, ref_vals, rtol=1e-9)
    assert np.all(np.diff(pca.eigvals) <= 0)
    np.testing.assert_allclose(pca.covariance(), ref_cov, atol=1e-12)
    np.testing.assert_allclose(pca.eigvecs.T @ pca.eigvecs, np.eye(3), atol=1e-12)
    for i in range(3):  # each column is an eigenvector of the reference covariance
        np.testing.assert_allclose(ref_cov @ pca.eigvecs[:, i], ref_vals[i] * pca.eigvecs[:, i], atol=1e-12)
    # sign convention: the largest-magnitude entry of each eigenvector is positive
    assert np.all(pca.eigvecs[np.abs(pca.eigvecs).argmax(axis=0), np.arange(3)] > 0)


def test_value_scale_scales_eigenvalues_quadratically(toy_set) -> None:
    paths, _ = toy_set
    unit = compute_color_pca(paths)
    raw = compute_color_pca(paths, value_scale=1.0)
    np.testing.assert_allclose(raw.eigvals, unit.eigvals * 255.0**2, rtol=1e-9)


def test_streaming_accumulator_equals_cov_of_concatenation() -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.normal(100, 30, size=(n, 3)) for n in (5, 1, 40)]
    acc = RGBCovarianceAccumulator()
    for c in chunks:
        acc.update(c)
    np.testing.assert_allclose(acc.covariance(), np.cov(np.concatenate(chunks), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2 pixels"):
        RGBCovarianceAccumulator().covariance()


def test_pixel_subsampling_is_seeded(toy_set) -> None:
    paths, _ = toy_set
    a = compute_color_pca(paths, pixels_per_image=20, seed=3)
    b = compute_color_pca(paths, pixels_per_image=20, seed=3)
    c = compute_color_pca(paths, pixels_per_image=20, seed=4)
    assert a.num_pixels == 60
    np.testing.assert_array_equal(a.eigvals, b.eigvals)
    assert not np.allclose(a.eigvals, c.eigvals)
    sub = compute_color_pca(paths, max_images=1)
    assert sub.num_pixels in {12 * 9, 7 * 15, 10 * 10}


def _example_pca() -> ColorPCA:
    # A realistic RGB covariance (in [0, 1] units) with distinct eigenvalues.
    cov = np.array([[0.070, 0.060, 0.050], [0.060, 0.065, 0.055], [0.050, 0.055, 0.068]])
    return color_pca_from_covariance(cov)


def test_noise_offset_covariance() -> None:
    pca = _example_pca()
    noise = PCAColorNoise.from_pca(pca, alphastd=0.1, seed=0)
    offsets = np.stack([noise.sample_offset() for _ in range(20000)]) * pca.value_scale
    expected = 0.1**2 * pca.eigvecs @ np.diag(pca.eigvals**2) @ pca.eigvecs.T
    np.testing.assert_allclose(np.cov(offsets, rowvar=False), expected, rtol=0.05, atol=0.03 * expected.max())
    assert np.all(np.abs(offsets.mean(axis=0)) < 4 * np.sqrt(np.diag(expected) / 20000))
    # alpha's spread along each principal axis is alphastd * eigval
    along = offsets @ pca.eigvecs
    np.testing.assert_allclose(along.std(axis=0), 0.1 * pca.eigvals, rtol=0.03)


def test_same_offset_on_every_pixel_and_redrawn_per_call() -> None:
    pca = _example_pca()
    noise = PCAColorNoise(pca.eigvals, pca.eigvecs, alphastd=0.1, seed=1)
    image = np.random.default_rng(0).integers(0, 256, size=(6, 5, 3)).astype(np.uint8)
    d1 = noise(image) - image.astype(np.float32)
    d2 = noise(image) - image.astype(np.float32)
    assert d1.dtype == np.float32
    np.testing.assert_allclose(d1, np.broadcast_to(d1[0, 0], d1.shape), atol=1e-4)
    # AlexNet Sec. 4.1: offset = [p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T, a_i ~ N(0, 0.1) drawn afresh per call from
    # the seed-1 generator, times 255 (the PCA is of [0, 1] RGB values, the image is 0..255).
    rng = np.random.default_rng(1)
    for d in (d1, d2):
        alpha = rng.normal(0.0, 0.1, size=3)
        np.testing.assert_allclose(d[0, 0], pca.eigvecs @ (alpha * pca.eigvals) * 255, atol=1e-4)
    assert not np.allclose(d1[0, 0], d2[0, 0])
    # Seeded: a fresh noise object with the same seed repeats the first draw.
    again = PCAColorNoise(pca.eigvals, pca.eigvecs, alphastd=0.1, seed=1)
    np.testing.assert_allclose(again(image) - image, d1, atol=1e-4)
    zero = PCAColorNoise(pca.eigvals, pca.eigvecs, alphastd=0.0)
    np.testing.assert_array_equal(zero(image), image.astype(np.float32))


def test_noise_input_validation() -> None:
    with pytest.raises(ValueError, match="eigvals"):
        PCAColorNoise([1.0, 2.0], np.eye(3))
    with pytest.raises(ValueError, match="eigvecs"):
        PCAColorNoise([1.0, 2.0, 3.0], np.eye(2))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        PCAColorNoise([1.0, 2.0, 3.0], np.eye(3))(np.zeros((4, 4)))


class _DrawDataset(Dataset):
    def __init__(self) -> None:
        self.rng = WorkerSeededRNG(seed=5)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return int(self.rng.generator().integers(1 << 40))


def _draws(loader: DataLoader) -> list[int]:
    return [int(x) for batch in loader for x in batch]


def test_worker_seeded_rng_differs_across_workers_and_epochs() -> None:
    ds = _DrawDataset()
    loader = DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context="fork")
    torch.manual_seed(0)
    epoch1 = _draws(loader)
    epoch2 = _draws(loader)
    # Workers 0/1 take items (0, 2) / (1, 3); forked copies of one generator would agree.
    assert epoch1[0] != epoch1[1]
    assert epoch1 != epoch2
    torch.manual_seed(0)
    assert _draws(loader) == epoch1


class _ReseededDataset(_DrawDataset):
    def __getitem__(self, i: int) -> int:
        self.rng.reseed(100 + i)  # per-item seeding, as the trainer's EpochSeededDataset does
        return int(self.rng.generator().integers(1 << 40))


def test_reseed_wins_over_worker_seeding() -> None:
    expected = [int(np.random.default_rng(100 + i).integers(1 << 40)) for i in range(4)]
    loader = DataLoader(_ReseededDataset(), batch_size=1, num_workers=2, multiprocessing_context="fork")
    assert _draws(loader) == expected
    noise = PCAColorNoise([0.2, 0.02, 0.005], np.eye(3), seed=None)
    noise.set_random_seed(9)
    first = noise.sample_offset()
    noise.set_random_seed(9)
    np.testing.assert_array_equal(noise.sample_offset(), first)
