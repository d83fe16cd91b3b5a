"""Config → classification input pipeline: training-set statistics and the train / test transforms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from detres.data.datasets.imagefolder import ImageFolderDataset, ImageListDataset
from detres.data.transforms.classification import Normalize, eval_transform_for_mode, train_transform_for_kind
from detres.data.transforms.color_pca import ColorPCA, PCAColorNoise, compute_color_pca
from detres.data.transforms.pixel_mean import PixelStats, compute_pixel_stats


@dataclass(frozen=True)
class ClsDataStats:
    """Everything the transforms need from the training set; stored in checkpoints for test time."""

    pixels: PixelStats
    color_pca: ColorPCA | None
    mean_mode: str  # "per_pixel" or "per_channel"
    fixed_mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mean_image": torch.from_numpy(self.pixels.mean_image),
            "channel_mean": torch.from_numpy(self.pixels.channel_mean),
            "channel_std": torch.from_numpy(self.pixels.channel_std),
            "num_images": self.pixels.num_images,
            "mean_mode": self.mean_mode,
            "fixed_mean": list(self.fixed_mean) if self.fixed_mean else None,
            "std": list(self.std) if self.std else None,
        }
        if self.color_pca is not None:
            out["pca_eigvals"] = torch.from_numpy(self.color_pca.eigvals)
            out["pca_eigvecs"] = torch.from_numpy(self.color_pca.eigvecs)
            out["pca_value_scale"] = self.color_pca.value_scale
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClsDataStats:
        pixels = PixelStats(
            mean_image=np.asarray(data["mean_image"], dtype=np.float32),
            channel_mean=np.asarray(data["channel_mean"], dtype=np.float32),
            channel_std=np.asarray(data["channel_std"], dtype=np.float32),
            num_images=int(data["num_images"]),
        )
        pca = None
        if "pca_eigvals" in data:
            pca = ColorPCA(
                eigvals=np.asarray(data["pca_eigvals"], dtype=np.float64),
                eigvecs=np.asarray(data["pca_eigvecs"], dtype=np.float64),
                value_scale=float(data["pca_value_scale"]),
            )
        fixed = data.get("fixed_mean")
        std = data.get("std")
        return cls(
            pixels=pixels,
            color_pca=pca,
            mean_mode=str(data["mean_mode"]),
            fixed_mean=tuple(fixed) if fixed else None,
            std=tuple(std) if std else None,
        )

    def channel_mean(self) -> tuple[float, float, float]:
        """The per-channel RGB mean the model was trained with (what detection normalises with)."""
        if self.fixed_mean is not None:
            return tuple(float(v) for v in self.fixed_mean)  # type: ignore[return-value]
        return tuple(float(v) for v in self.pixels.channel_mean)  # type: ignore[return-value]

    def normalize(self, *, dense: bool) -> Normalize:
        """Per-pixel mean image for fixed-size crops; per-channel mean for dense full images."""
        std = list(self.std) if self.std else None
        if self.mean_mode == "per_pixel" and self.fixed_mean is None and not dense:
            return Normalize(mean_image=self.pixels.mean_image, std=std)
        return Normalize(mean=list(self.channel_mean()), std=std)


def _stats_geometry(cfg) -> tuple[int | None, int]:
    """(resize, crop) at which the mean image is taken: the size of the training crops."""
    if cfg.augment.mode == "cifar":
        return None, cfg.augment.crop
    return cfg.test.resize, cfg.augment.crop


def compute_data_stats(image_paths: Sequence[str], cfg) -> ClsDataStats:
    """Mean image, channel mean/std and (if enabled) colour PCA over the training images."""
    if cfg.data.mean_mode not in ("per_pixel", "per_channel"):
        raise ValueError(f"data.mean_mode must be 'per_pixel' or 'per_channel', got {cfg.data.mean_mode!r}")
    for key in ("mean", "std"):
        value = cfg.data[key]
        if value is not None and len(value) != 3:
            raise ValueError(f"data.{key} must list 3 RGB values, got {value!r}")
    resize, crop = _stats_geometry(cfg)
    pixels = compute_pixel_stats(image_paths, resize, crop, cfg.data.stats_max_images, seed=cfg.seed)
    pca = None
    if cfg.augment.color_pca:
        pca = compute_color_pca(image_paths, max_images=cfg.data.stats_max_images, seed=cfg.seed)
    return ClsDataStats(
        pixels=pixels,
        color_pca=pca,
        mean_mode=cfg.data.mean_mode,
        fixed_mean=tuple(cfg.data.mean) if cfg.data.mean is not None else None,
        std=tuple(cfg.data.std) if cfg.data.std is not None else None,
    )


def build_train_transform(cfg, stats: ClsDataStats):
    """Scale augmentation (Sec. 3.4) or CIFAR pad-crop (Sec. 4.2), flips, PCA colour noise, mean."""
    aug = cfg.augment
    noise = None
    if aug.color_pca and stats.color_pca is not None:
        noise = PCAColorNoise.from_pca(stats.color_pca, alphastd=aug.pca_alphastd)
    common = dict(
        normalize=stats.normalize(dense=False),
        crop=aug.crop,
        hflip_prob=0.5 if aug.flip else 0.0,
        color_noise=noise,
        seed=cfg.seed,
    )
    if aug.mode == "cifar":
        return train_transform_for_kind("cifar", pad=aug.cifar_pad, **common)
    return train_transform_for_kind("imagenet", scale_min=aug.scale_min, scale_max=aug.scale_max, **common)


def build_eval_transform(cfg, stats: ClsDataStats, mode: str):
    """Centre crop, 10-crop, or full images at the test scales (dense multi-scale testing)."""
    if mode == "multiscale":
        return eval_transform_for_mode(
            "multiscale", normalize=stats.normalize(dense=True), scales=tuple(cfg.test.scales)
        )
    resize = None if cfg.augment.mode == "cifar" else cfg.test.resize
    return eval_transform_for_mode(mode, normalize=stats.normalize(dense=False), resize=resize, crop=cfg.augment.crop)


def build_val_dataset(cfg, class_to_idx: Mapping[str, int]) -> ImageFolderDataset | ImageListDataset:
    """The validation set labelled with the training set's ``class_to_idx``.

    ``data.val_labels`` unset: ``data.val_dir`` is an ImageFolder (``<class>/<image>``), restricted to
    the training classes. Set: ``data.val_dir`` is a flat image folder and ``data.val_labels`` lists
    ``<file> <class name> ...`` per line (ImageNet / Tiny-ImageNet val); lines of classes the training
    set lacks are skipped and counted in the dataset's ``num_skipped`` (warned once).
    """
    if cfg.data.get("val_labels"):
        return ImageListDataset(cfg.data.val_dir, cfg.data.val_labels, class_to_idx=class_to_idx)
    return ImageFolderDataset(cfg.data.val_dir, class_to_idx=class_to_idx)
