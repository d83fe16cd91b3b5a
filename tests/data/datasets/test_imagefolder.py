"""Tests for detres.data.datasets.imagefolder: class discovery, labels, subsets and error messages."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from detres.data.datasets.imagefolder import ImageFolderDataset, ImageListDataset, read_label_file


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


# ---------------------------------------------------------------------------------------------
# Flat folder + labels file (ImageNet / Tiny-ImageNet validation layout)
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def flat(tmp_path: Path) -> Path:
    root = tmp_path / "val" / "images"
    for i, color in enumerate([(10, 0, 0), (20, 0, 0), (30, 0, 0), (40, 0, 0), (50, 0, 0)]):
        _write_png(root / f"val_{i}.png", _solid(4, 5, color))
    (tmp_path / "val" / "labels.txt").write_text(
        "val_0.png\tzebra\t0\t1\t3\t4\n"  # Tiny-ImageNet style: tab-separated, box columns ignored
        "val_1.png ant\n"  # plain "<file> <class>"
        "\n"  # blank lines are skipped
        "val_2.png   okapi   extra\n"  # a class the training set lacks
        "val_3.png\tcat\n"
        "val_4.png okapi\n"
    )
    return tmp_path / "val"


def test_image_list_uses_the_training_labels_and_counts_unknown_classes(flat: Path) -> None:
    train_map = {"ant": 0, "cat": 1, "zebra": 2}
    with pytest.warns(UserWarning, match=r"skipped 2 of 5 images .* okapi \(2\)") as record:
        ds = ImageListDataset(flat / "images", flat / "labels.txt", class_to_idx=train_map)
    assert len(record) == 1  # reported once
    assert [Path(p).name for p, _ in ds.samples] == ["val_0.png", "val_1.png", "val_3.png"]  # file order
    assert ds.targets == [2, 0, 1]
    assert ds.num_skipped == 2 and ds.skipped_classes == {"okapi": 2}
    assert ds.class_names == ["ant", "cat", "zebra"] and ds.num_classes == 3 and len(ds) == 3
    image, label = ds[0]
    assert image.shape == (4, 5, 3) and image[0, 0].tolist() == [10, 0, 0] and label == 2
    with pytest.warns(UserWarning, match="okapi"):
        with_transform = ImageListDataset(
            flat / "images", flat / "labels.txt", class_to_idx=train_map, transform=lambda im: int(im[0, 0, 0])
        )
    assert with_transform[2] == (40, 1)


def test_image_list_without_a_mapping_uses_the_sorted_classes_of_the_file(flat: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped, so nothing is reported
        ds = ImageListDataset(flat / "images", flat / "labels.txt")
    assert ds.class_to_idx == {"ant": 0, "cat": 1, "okapi": 2, "zebra": 3}
    assert ds.targets == [3, 0, 2, 1, 2] and ds.num_skipped == 0


def test_label_file_errors_name_the_file_and_line(flat: Path) -> None:
    labels = flat / "labels.txt"
    assert read_label_file(labels)[2] == (4, "val_2.png", "okapi")  # (line number, file, class)
    bad = flat / "bad.txt"
    bad.write_text("val_0.png zebra\nval_1.png\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: expected '<file name> <class name>.*'val_1\.png'"):
        ImageListDataset(flat / "images", bad, class_to_idx={"zebra": 0})
    twice = flat / "twice.txt"
    twice.write_text("val_0.png zebra\nval_1.png ant\nval_0.png ant\n")
    with pytest.raises(ValueError, match=r"twice\.txt:3: 'val_0\.png' is listed twice \(first on line 1\)"):
        ImageListDataset(flat / "images", twice, class_to_idx={"zebra": 0, "ant": 1})
    missing = flat / "missing.txt"
    missing.write_text("val_0.png zebra\nval_9.png zebra\nval_8.png zebra\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt:2: image '.*val_9\.png' not found \(2 listed"):
        ImageListDataset(flat / "images", missing, class_to_idx={"zebra": 0})
    numeric = flat / "numeric.txt"  # Caffe-style numeric labels are not class names
    numeric.write_text("val_0.png 65\nval_1.png 970\n")
    with pytest.raises(ValueError, match="none of its 2 lines names a known class"):
        ImageListDataset(flat / "images", numeric, class_to_idx={"zebra": 0})
    with pytest.raises(FileNotFoundError, match="labels file not found"):
        ImageListDataset(flat / "images", flat / "nope.txt", class_to_idx={"zebra": 0})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageListDataset(flat / "nowhere", labels, class_to_idx={"zebra": 0})
    empty = flat / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="lists no images"):
        ImageListDataset(flat / "images", empty)


def test_real_tiny_imagenet_val_annotations(shared_dir: Path) -> None:
    base = shared_dir / "data" / "tiny_imagenet_loc" / "tiny-imagenet-200"
    labels = base / "val" / "val_annotations.txt"
    if not labels.is_file() or not (base / "train").is_dir():
        pytest.skip(f"Tiny-ImageNet not present under {base}")
    train = ImageFolderDataset(base / "train")
    assert len(train.classes) == 200
    with pytest.warns(UserWarning, match="skipped 100 of 10100 images") as record:
        val = ImageListDataset(base / "val" / "images", labels, class_to_idx=train.class_to_idx)
    assert len(record) == 1
    # SOURCE.txt: n02480855 and n10148035 have 50 val images each and no training images here.
    assert val.skipped_classes == {"n02480855": 50, "n10148035": 50} and val.num_skipped == 100
    assert len(val) == 10_000 and np.bincount(val.targets, minlength=200).tolist() == [50] * 200
    # First line: "val_0.JPEG<TAB>n03444034<TAB>0<TAB>32<TAB>44<TAB>62"
    assert Path(val.samples[0][0]).name == "val_0.JPEG" and val.targets[0] == train.class_to_idx["n03444034"]
    image, label = val[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and label == train.class_to_idx["n03444034"]
