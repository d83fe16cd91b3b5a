"""Tests for detres/data/cls_pipeline.py: training-set statistics, config-driven train/test transforms, stats I/O."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detres.config.load import load_config
from detres.data.cls_pipeline import (
    ClsDataStats,
    build_eval_transform,
    build_train_transform,
    build_val_dataset,
    compute_data_stats,
)
from detres.data.datasets.imagefolder import ImageFolderDataset, ImageListDataset
from detres.utils.torch_files import load_checkpoint, save_checkpoint

H, W = 36, 44  # shorter side == test.resize, so the 1-crop geometry is a plain centre crop
CROP = 32


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[tuple[Path, np.ndarray]]:
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    out = []
    for i in range(5):
        rgb = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        rgb[..., 0] //= 2  # unequal channels, so per-channel and per-pixel means differ clearly
        path = root / f"img_{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        out.append((path, rgb))
    return out


def _cfg(*overrides: str):
    base = [
        "augment.scale_min=36",
        "augment.scale_max=40",
        f"augment.crop={CROP}",
        "test.resize=36",
        "test.scales=[36, 48]",
    ]
    return load_config(None, base + list(overrides), task="cls")


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()


def _centre(rgb: np.ndarray) -> np.ndarray:
    top, left = (H - CROP) // 2, (W - CROP) // 2
    return rgb[top : top + CROP, left : left + CROP].astype(np.float64)


def test_statistics_are_the_training_set_means_and_colour_covariance(images):
    stats = compute_data_stats([p for p, _ in images], _cfg())
    mean_image = np.mean([_centre(rgb) for _, rgb in images], axis=0)
    np.testing.assert_allclose(stats.pixels.mean_image, mean_image, atol=1e-3)
    np.testing.assert_allclose(stats.pixels.channel_mean, mean_image.mean(axis=(0, 1)), atol=1e-3)
    pixels = np.concatenate([rgb.reshape(-1, 3) for _, rgb in images]).astype(np.float64) / 255.0
    np.testing.assert_allclose(stats.color_pca.covariance(), np.cov(pixels.T), atol=1e-9)  # unbiased
    assert stats.pixels.num_images == 5


def test_per_pixel_mode_uses_the_mean_image_for_crops_and_the_channel_mean_for_dense_tests(images):
    stats = compute_data_stats([p for p, _ in images], _cfg("data.mean_mode=per_pixel"))
    _, rgb = images[1]
    crop = build_eval_transform(_cfg(), stats, "1crop")(rgb)
    torch.testing.assert_close(crop, _chw(_centre(rgb) - stats.pixels.mean_image), atol=1e-4, rtol=0)
    tens = build_eval_transform(_cfg(), stats, "10crop")(rgb)
    assert tens.shape == (10, 3, CROP, CROP)
    torch.testing.assert_close(tens[4], crop)  # the centre patch
    views = build_eval_transform(_cfg(), stats, "multiscale")(rgb)
    assert [tuple(v.shape) for v in views] == [(3, 36, 44), (3, 48, 59)]
    torch.testing.assert_close(views[0], _chw(rgb.astype(np.float64) - stats.pixels.channel_mean), atol=1e-4, rtol=0)


def test_per_channel_mode_subtracts_the_channel_mean_everywhere(images):
    cfg = _cfg("data.mean_mode=per_channel")
    stats = compute_data_stats([p for p, _ in images], cfg)
    _, rgb = images[2]
    crop = build_eval_transform(cfg, stats, "1crop")(rgb)
    torch.testing.assert_close(crop, _chw(_centre(rgb) - stats.pixels.channel_mean), atol=1e-4, rtol=0)


def test_data_std_divides_and_a_fixed_mean_replaces_the_computed_one(images):
    cfg = _cfg("data.std=[2.0, 4.0, 8.0]")
    stats = compute_data_stats([p for p, _ in images], cfg)
    _, rgb = images[0]
    crop = build_eval_transform(cfg, stats, "1crop")(rgb)
    expected = (_centre(rgb) - stats.pixels.mean_image) / np.array([2.0, 4.0, 8.0])
    torch.testing.assert_close(crop, _chw(expected), atol=1e-4, rtol=0)
    fixed = _cfg("data.mean=[100.0, 110.0, 120.0]", "data.std=[50.0, 50.0, 25.0]")
    fixed_stats = compute_data_stats([p for p, _ in images], fixed)
    assert fixed_stats.channel_mean() == (100.0, 110.0, 120.0)
    dense = build_eval_transform(fixed, fixed_stats, "multiscale")(rgb)[0]
    expected = (rgb.astype(np.float64) - [100.0, 110.0, 120.0]) / np.array([50.0, 50.0, 25.0])
    torch.testing.assert_close(dense, _chw(expected), atol=1e-4, rtol=0)


def test_train_transform_follows_the_config(images):
    cfg = _cfg("augment.color_pca=false", "augment.flip=false", "augment.scale_max=36")
    stats = compute_data_stats([p for p, _ in images], cfg)
    transform = build_train_transform(cfg, stats)
    _, rgb = images[3]
    transform.set_random_seed(0)
    params = transform.sample_params(H, W)
    transform.set_random_seed(0)
    out = transform(rgb)
    # scale 36 is the image's own size: the output is a plain window minus the mean image.
    window = rgb[params["top"] : params["top"] + CROP, params["left"] : params["left"] + CROP].astype(np.float64)
    torch.testing.assert_close(out, _chw(window - stats.pixels.mean_image), atol=1e-4, rtol=0)
    cifar = _cfg("augment.mode=cifar", "augment.cifar_pad=2")
    assert (
        type(build_train_transform(cifar, compute_data_stats([p for p, _ in images], cifar))).__name__
        == "PadCropTrainTransform"
    )


def test_stats_round_trip_through_a_weights_only_checkpoint(images, tmp_path):
    cfg = _cfg("data.std=[3.0, 3.0, 3.0]")
    stats = compute_data_stats([p for p, _ in images], cfg)
    save_checkpoint(tmp_path / "stats.pt", {"data_stats": stats.to_dict()})
    back = ClsDataStats.from_dict(load_checkpoint(tmp_path / "stats.pt")["data_stats"])  # weights_only=True
    np.testing.assert_array_equal(back.pixels.mean_image, stats.pixels.mean_image)
    np.testing.assert_array_equal(back.pixels.channel_std, stats.pixels.channel_std)
    np.testing.assert_array_equal(back.color_pca.eigvecs, stats.color_pca.eigvecs)
    np.testing.assert_array_equal(back.color_pca.eigvals, stats.color_pca.eigvals)
    assert (back.mean_mode, back.std, back.fixed_mean) == ("per_pixel", (3.0, 3.0, 3.0), None)
    _, rgb = images[4]
    for mode in ("1crop", "multiscale"):
        a, b = build_eval_transform(cfg, stats, mode)(rgb), build_eval_transform(cfg, back, mode)(rgb)
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(x, y)


def test_bad_statistics_options_name_the_key(images):
    paths = [p for p, _ in images]
    with pytest.raises(ValueError, match="data.mean_mode"):
        compute_data_stats(paths, _cfg("data.mean_mode=median"))
    with pytest.raises(ValueError, match="data.std"):
        compute_data_stats(paths, _cfg("data.std=[1.0, 2.0]"))


def test_val_dataset_is_a_class_folder_or_a_flat_folder_with_labels(images, tmp_path):
    train_map = {"a": 0, "b": 1}
    for cls in ("a", "b", "c"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        (tmp_path / "tree" / cls / "0.png").write_bytes(images[0][0].read_bytes())
    tree = build_val_dataset(_cfg(f"data.val_dir={tmp_path / 'tree'}"), train_map)
    assert type(tree) is ImageFolderDataset and tree.targets == [0, 1]
    (tmp_path / "labels.txt").write_text("\n".join(f"{p.name} {c}" for (p, _), c in zip(images, "abbac")) + "\n")
    cfg = _cfg(f"data.val_dir={images[0][0].parent}", f"data.val_labels={tmp_path / 'labels.txt'}")
    with pytest.warns(UserWarning, match="skipped 1 of 5"):
        flat = build_val_dataset(cfg, train_map)
    assert type(flat) is ImageListDataset and flat.targets == [0, 1, 1, 0] and flat.num_skipped == 1
