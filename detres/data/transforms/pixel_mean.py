"""Training-set pixel statistics: AlexNet's per-pixel mean image ("subtracting the mean activity
over the training set from each pixel") plus per-channel mean and std, all on the 0..255 scale.

The mean image is taken at the network's input resolution: every training image's shorter
side is resized to ``resize`` and its central ``crop`` x ``crop`` window is averaged. Sums are
accumulated in float64 one image at a time, so memory does not grow with the data set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from detres.data.image_io import read_image_rgb
from detres.data.transforms.classification import center_crop, resize_shorter_side


@dataclass(frozen=True)
class PixelStats:
    """``mean_image`` float32 [crop, crop, 3]; ``channel_mean`` / ``channel_std`` float32 (3,),
    over all pixels of the same centre crops (channel_mean is the mean of the mean image)."""

    mean_image: np.ndarray
    channel_mean: np.ndarray
    channel_std: np.ndarray
    num_images: int


def _select_paths(image_paths: Sequence[str | os.PathLike], max_images: int | None, seed: int) -> list[str]:
    paths = [str(p) for p in image_paths]
    if not paths:
        raise ValueError("pixel statistics: image_paths is empty")
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images: expected a positive count or None, got {max_images}")
        if max_images < len(paths):
            # Random subset, not the first N: image-folder order is sorted by class.
            keep = np.sort(np.random.default_rng(seed).choice(len(paths), size=max_images, replace=False))
            paths = [paths[i] for i in keep]
    return paths


def compute_pixel_stats(
    image_paths: Sequence[str | os.PathLike],
    resize: int | None = 256,
    crop: int = 224,
    max_images: int | None = None,
    *,
    seed: int = 0,
    read_image: Callable[[str], np.ndarray] = read_image_rgb,
) -> PixelStats:
    """Mean image and per-channel mean/std of the ``resize``/``crop`` centre crops.

    ``resize=None`` skips resizing (e.g. CIFAR at 32x32 with ``crop=32``). ``max_images`` uses a
    seeded random subset of the images.
    """
    if resize is not None and crop > resize:
        raise ValueError(f"crop ({crop}) must be <= resize ({resize})")
    paths = _select_paths(image_paths, max_images, seed)
    sum_image = np.zeros((crop, crop, 3), dtype=np.float64)
    sum_sq = np.zeros(3, dtype=np.float64)
    for path in paths:
        image = np.asarray(read_image(path))
        if resize is not None:
            image = resize_shorter_side(image, resize)
        try:
            window = center_crop(image, crop).astype(np.float64)
        except ValueError as err:
            raise ValueError(f"'{path}': {err}") from None
        sum_image += window
        sum_sq += np.einsum("hwc,hwc->c", window, window)
    n_images = len(paths)
    mean_image = sum_image / n_images
    channel_mean = mean_image.mean(axis=(0, 1))
    n_pixels = n_images * crop * crop
    variance = np.maximum(sum_sq / n_pixels - channel_mean**2, 0.0)
    return PixelStats(
        mean_image=mean_image.astype(np.float32),
        channel_mean=channel_mean.astype(np.float32),
        channel_std=np.sqrt(variance).astype(np.float32),
        num_images=n_images,
    )
