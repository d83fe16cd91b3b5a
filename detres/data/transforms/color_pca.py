"""AlexNet PCA colour augmentation (Krizhevsky et al. 2012, Sec. 4.1): RGB covariance PCA and the noise.

Scale convention (used everywhere in this file): the covariance is computed on pixel values
multiplied by ``value_scale`` (default 1/255, i.e. RGB in [0, 1]), so ``eigvals`` are variances
in [0, 1] units. The paper's offset ``[p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T`` is therefore a [0, 1]
offset, and ``PCAColorNoise`` divides it by ``value_scale`` before adding it to an image stored
in 0..255. (The formula is not scale-invariant — l has squared-intensity units — so the scale
must be fixed: with 0..255 eigenvalues the offsets would be ~100 grey levels.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from detres.data.image_io import read_image_rgb

DEFAULT_VALUE_SCALE = 1.0 / 255.0


class WorkerSeededRNG:
    """A numpy Generator that re-seeds itself inside every DataLoader worker.

    Forked workers inherit the parent's generator state, so without this each worker — and each
    epoch's fresh set of workers — would repeat the same "random" draws. Inside a worker the
    generator is seeded from (``seed``, the worker's torch seed); torch derives the worker seed
    from its global RNG per epoch, so runs are reproducible under ``torch.manual_seed``.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._generator: np.random.Generator | None = None
        self._worker_seed: int | None = None

    @staticmethod
    def _current_worker_seed() -> int | None:
        info = torch.utils.data.get_worker_info()
        return None if info is None else int(info.seed)

    def reseed(self, seed: int) -> None:
        """Restart from ``seed`` now, in this process (e.g. a per-(epoch, index) seed); the worker
        re-seeding above then leaves it alone until the process becomes a different worker."""
        self._generator = np.random.default_rng(seed)
        self._worker_seed = self._current_worker_seed()

    def generator(self) -> np.random.Generator:
        worker_seed = self._current_worker_seed()
        if self._generator is None or worker_seed != self._worker_seed:
            entropy = [s for s in (self.seed, worker_seed) if s is not None]
            self._generator = np.random.default_rng(entropy if entropy else None)
            self._worker_seed = worker_seed
        return self._generator


@dataclass(frozen=True)
class ColorPCA:
    """Eigen-decomposition of the RGB covariance: ``eigvecs[:, i]`` has eigenvalue ``eigvals[i]``.

    Eigenvalues are sorted in decreasing order; each eigenvector's largest-magnitude entry is
    positive, so the result is deterministic.
    """

    eigvals: np.ndarray  # (3,) float64
    eigvecs: np.ndarray  # (3, 3) float64, columns are eigenvectors
    value_scale: float = DEFAULT_VALUE_SCALE
    num_pixels: int = 0

    def covariance(self) -> np.ndarray:
        return self.eigvecs @ np.diag(self.eigvals) @ self.eigvecs.T


class RGBCovarianceAccumulator:
    """Streaming RGB covariance: float64 count, sum and sum of outer products."""

    def __init__(self) -> None:
        self.count = 0
        self.sum = np.zeros(3, dtype=np.float64)
        self.outer = np.zeros((3, 3), dtype=np.float64)

    def update(self, pixels: np.ndarray) -> None:
        """Add pixels given as an array [..., 3]."""
        if pixels.ndim < 1 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels: expected an array [..., 3] of RGB values, got shape {pixels.shape}")
        flat = pixels.reshape(-1, 3).astype(np.float64)
        self.count += flat.shape[0]
        self.sum += flat.sum(axis=0)
        self.outer += flat.T @ flat

    def covariance(self) -> np.ndarray:
        """Unbiased (N-1) covariance, the same estimator as ``np.cov``."""
        if self.count < 2:
            raise ValueError(f"RGB covariance needs at least 2 pixels, got {self.count}")
        mean = self.sum / self.count
        return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)


def color_pca_from_covariance(
    cov: np.ndarray, *, value_scale: float = DEFAULT_VALUE_SCALE, num_pixels: int = 0
) -> ColorPCA:
    cov = np.asarray(cov, dtype=np.float64)
    if cov.shape != (3, 3):
        raise ValueError(f"cov: expected a 3x3 RGB covariance, got shape {cov.shape}")
    eigvals, eigvecs = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    # Round-off can make a zero eigenvalue slightly negative.
    eigvals = np.clip(eigvals, 0.0, None)
    signs = np.sign(eigvecs[np.argmax(np.abs(eigvecs), axis=0), np.arange(3)])
    eigvecs = eigvecs * np.where(signs == 0, 1.0, signs)
    return ColorPCA(eigvals=eigvals, eigvecs=eigvecs, value_scale=float(value_scale), num_pixels=int(num_pixels))


def compute_color_pca(
    image_paths: Sequence[str | os.PathLike],
    *,
    max_images: int | None = None,
    pixels_per_image: int | None = None,
    seed: int = 0,
    value_scale: float = DEFAULT_VALUE_SCALE,
    read_image: Callable[[str], np.ndarray] = read_image_rgb,
) -> ColorPCA:
    """PCA of the RGB pixel values of a set of training images, in one streaming pass.

    Args:
        image_paths: training images (e.g. ``ImageFolderDataset(...).paths``).
        max_images: use a random subset of this many images (seeded), not the first ones —
            image-folder order is sorted by class.
        pixels_per_image: sample this many pixels per image (with replacement, seeded); None = all.
        seed: seed for both subsamplings.
        value_scale: pixel values are multiplied by this before the covariance (see module doc).
    """
    paths = [str(p) for p in image_paths]
    if not paths:
        raise ValueError("compute_color_pca: image_paths is empty")
    if pixels_per_image is not None and pixels_per_image < 1:
        raise ValueError(f"pixels_per_image: expected a positive count or None, got {pixels_per_image}")
    if value_scale <= 0:
        raise ValueError(f"value_scale: expected > 0, got {value_scale}")
    rng = np.random.default_rng(seed)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images: expected a positive count or None, got {max_images}")
        if max_images < len(paths):
            paths = [paths[i] for i in np.sort(rng.choice(len(paths), size=max_images, replace=False))]
    acc = RGBCovarianceAccumulator()
    for path in paths:
        pixels = np.asarray(read_image(path)).reshape(-1, 3)
        if pixels_per_image is not None:
            pixels = pixels[rng.integers(0, pixels.shape[0], size=pixels_per_image)]
        acc.update(pixels.astype(np.float64) * value_scale)
    return color_pca_from_covariance(acc.covariance(), value_scale=value_scale, num_pixels=acc.count)


class PCAColorNoise:
    """Add ``sum_i alpha_i * eigval_i * eigvec_i`` (alpha_i ~ N(0, alphastd)) to every pixel.

    One alpha vector is drawn per call, i.e. per image each time it is used for training
    (once per epoch), and the same RGB offset is added to all of that image's pixels. Images are
    float/uint8 [H, W, 3] in the 0..1/value_scale range (0..255 by default); the result is
    float32 and is not clipped (the network sees the shifted raw values, as in the paper).
    """

    def __init__(
        self,
        eigvals: Sequence[float] | np.ndarray,
        eigvecs: Sequence[Sequence[float]] | np.ndarray,
        *,
        alphastd: float = 0.1,
        value_scale: float = DEFAULT_VALUE_SCALE,
        seed: int | None = None,
    ) -> None:
        self.eigvals = np.asarray(eigvals, dtype=np.float64)
        self.eigvecs = np.asarray(eigvecs, dtype=np.float64)
        if self.eigvals.shape != (3,):
            raise ValueError(f"eigvals: expected 3 values, got shape {self.eigvals.shape}")
        if self.eigvecs.shape != (3, 3):
            raise ValueError(f"eigvecs: expected a 3x3 matrix (columns = eigenvectors), got shape {self.eigvecs.shape}")
        if alphastd < 0:
            raise ValueError(f"alphastd: expected >= 0, got {alphastd}")
        if value_scale <= 0:
            raise ValueError(f"value_scale: expected > 0, got {value_scale}")
        self.alphastd = float(alphastd)
        self.value_scale = float(value_scale)
        self.rng = WorkerSeededRNG(seed)

    @classmethod
    def from_pca(cls, pca: ColorPCA, *, alphastd: float = 0.1, seed: int | None = None) -> PCAColorNoise:
        return cls(pca.eigvals, pca.eigvecs, alphastd=alphastd, value_scale=pca.value_scale, seed=seed)

    def set_random_seed(self, seed: int) -> None:
        """Re-seed the generator (same name as albumentations' hook, used by per-item seeding)."""
        self.rng.reseed(seed)

    def sample_offset(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """One RGB offset (3,) in image units (0..255 by default)."""
        rng = self.rng.generator() if rng is None else rng
        alpha = rng.normal(0.0, self.alphastd, size=3)
        return (self.eigvecs @ (alpha * self.eigvals)) / self.value_scale

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"PCAColorNoise: expected an RGB image [H, W, 3], got shape {image.shape}")
        offset = self.sample_offset(rng).astype(np.float32)
        return image.astype(np.float32) + offset

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eigvals={self.eigvals.tolist()}, alphastd={self.alphastd}, "
            f"value_scale={self.value_scale})"
        )
