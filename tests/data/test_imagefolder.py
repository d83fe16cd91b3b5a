"""Tests for detres.data.imagefolder: class discovery, labels, subsets and error messages."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from detres.data.imagefolder import ImageFolderDataset


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _solid(h: int, w: int, color) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, dtype=np.uint8), (h, w, 3)).copy()


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    _write_png(root / "zebra" / "b.png", _solid(8, 6, (1, 2, 3)))
    _write_png(root / "zebra" / "a.PNG", _solid(5, 7, (4, 5, 6)))  # upper-case extension
    _write_png(root / "ant" / "x.png", _solid(4, 4, (200, 100, 50)))
    _write_png(root / "cat" / "nested" / "y.png", _solid(3, 3, (9, 9, 9)))
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def test_classes_labels_and_samples(tree: Path) -> None:
    ds = ImageFolderDataset(tree)
    assert ds.classes == ["ant", "cat", "zebra"]
    assert ds.class_names == ["ant", "cat", "zebra"]
    assert ds.class_to_idx == {"ant": 0, "cat": 1, "zebra": 2}
    names = [Path(p).name for p, _ in ds.samples]
    assert names == ["x.png", "y.png", "a.PNG", "b.png"]  # .txt ignored, case-insensitive match
    assert ds.targets == [0, 1, 2, 2]
    assert len(ds) == 4 and ds.num_classes == 3
    assert ds.paths == [p for p, _ in ds.samples]


def test_getitem_reads_rgb_and_applies_transform(tree: Path) -> None:
    ds = ImageFolderDataset(tree)
    image, label = ds[0]
    assert label == 0 and image.dtype == np.uint8 and image.shape == (4, 4, 3)
    assert image[0, 0].tolist() == [200, 100, 50]  # RGB order, not OpenCV's BGR
    ds_t = ImageFolderDataset(tree, transform=lambda im: im.shape)
    assert ds_t[3] == ((8, 6, 3), 2)


def test_extensions_filter(tree: Path) -> None:
    ds = ImageFolderDataset(tree, extensions=("JPG", ".Png"))
    assert len(ds) == 4
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolderDataset(tree, extensions=(".jpg",))


def test_classes_subset_relabels_contiguously(tree: Path) -> None:
    ds = ImageFolderDataset(tree, classes=["zebra", "ant"])
    assert ds.class_to_idx == {"ant": 0, "zebra": 1}
    assert ds.targets == [0, 1, 1]


def test_class_to_idx_keeps_given_labels(tree: Path) -> None:
    ds = ImageFolderDataset(tree, class_to_idx={"zebra": 7, "cat": 3})
    assert ds.classes == ["cat", "zebra"]
    assert ds.targets == [3, 7, 7]
    assert ds.num_classes == 8


def test_subset_errors(tree: Path) -> None:
    with pytest.raises(ValueError, match="dog"):
        ImageFolderDataset(tree, classes=["ant", "dog"])
    with pytest.raises(ValueError, match="either classes or class_to_idx"):
        ImageFolderDataset(tree, classes=["ant"], class_to_idx={"ant": 0})
    with pytest.raises(ValueError, match="share a label"):
        ImageFolderDataset(tree, class_to_idx={"ant": 0, "cat": 0})


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")


def test_root_without_class_folders(tmp_path: Path) -> None:
    _write_png(tmp_path / "loose.png", _solid(2, 2, (0, 0, 0)))
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path)


def test_empty_class_folder_is_named(tree: Path) -> None:
    (tree / "empty_one").mkdir()
    with pytest.raises(ValueError, match="empty_one"):
        ImageFolderDataset(tree)


def test_corrupt_image_raises_at_load_naming_file(tree: Path) -> None:
    (tree / "ant" / "broken.png").write_bytes(b"\x89PNG this is not really a png")
    ds = ImageFolderDataset(tree)  # listing does not decode
    idx = [Path(p).name for p, _ in ds.samples].index("broken.png")
    with pytest.raises(ValueError, match="broken.png"):
        ds[idx]


def test_real_cifar10_test_split(shared_dir: Path) -> None:
    root = shared_dir / "data" / "cifar10" / "test"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    ds = ImageFolderDataset(root, classes=["cat", "dog"])
    assert ds.classes == ["cat", "dog"]
    assert np.bincount(ds.targets).tolist() == [1000, 1000]
    image, label = ds[1500]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and label == 1
