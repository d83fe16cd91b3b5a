"""Tests for detres.data.transforms.localization and detres.data.datasets.localization (Appendix C localization
data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detres.data.datasets.localization import (
    LocDataset,
    devkit_ground_truth,
    read_ilsvrc_loc,
    read_tiny_imagenet_train,
    read_tiny_imagenet_val_records,
    tiny_imagenet_synsets,
)
from detres.data.shapes.writers import write_loc_task
from detres.data.transforms.localization import LocTestTransform, LocTrainTransform, clip_and_keep


def _rectangle_image(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    image = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = 255  # pixels x0..x1-1: the continuous box (x0, y0, x1, y1)
    return image


def _bright_extent(image: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(image[..., 0] > 127)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("seed", range(6))
def test_training_crop_box_follows_a_filled_rectangle(seed):
    box = (30, 20, 90, 70)
    image = _rectangle_image(100, 140, box)
    t = LocTrainTransform(scale_min=64, scale_max=96, crop=56, hflip_prob=0.5, seed=seed)
    out, boxes, labels = t(image, np.array([box], np.float32), np.array([3]))
    assert out.shape == (56, 56, 3)
    if boxes.shape[0] == 0:  # the crop missed the rectangle: nothing bright may be left either
        assert (out[..., 0] > 127).sum() == 0
        return
    assert labels.tolist() == [3]
    np.testing.assert_allclose(_bright_extent(out), boxes[0], atol=1.0)


def test_clip_and_keep_drops_boxes_without_area():
    boxes, labels = clip_and_keep(
        np.array([[-5, -5, 10, 10], [60, 0, 80, 10], [0, 0, 0, 5]], np.float32), np.array([1, 2, 3]), 56, 56
    )
    assert boxes.tolist() == [[0, 0, 10, 10]] and labels.tolist() == [1]


@pytest.mark.parametrize("mode", ["1crop", "dense"])
def test_test_view_maps_boxes_back_exactly(mode):
    image = _rectangle_image(130, 156, (40, 30, 100, 90))
    view_image, view = LocTestTransform(mode=mode, scale=64, crop=56)(image)
    assert view_image.shape[:2] == ((56, 56) if mode == "1crop" else (64, 77))
    box = np.array([[3.5, 7.25, 40.0, 50.5]])
    original = view.to_original(box, 156, 130)
    forward = original * [view.sx, view.sy, view.sx, view.sy] - [view.left, view.top, view.left, view.top]
    np.testing.assert_allclose(forward, box, atol=1e-9)
    # the rectangle found in the view lands on the original rectangle (up to resampling blur)
    np.testing.assert_allclose(
        view.to_original(np.array([_bright_extent(view_image)]), 156, 130)[0], (40, 30, 100, 90), atol=2.5
    )


def test_one_crop_needs_a_crop_no_larger_than_the_scale():
    with pytest.raises(ValueError, match="crop <= scale"):
        LocTestTransform(mode="1crop", scale=48, crop=56)
    with pytest.raises(ValueError, match="mode must be one of"):
        LocTestTransform(mode="tencrop", scale=64, crop=56)


@pytest.fixture(scope="module")
def shapes_loc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_loc_task(root, 0, {"train": 12, "val": 4}, (96, 160))
    return root / "loc"


def test_ilsvrc_reader_converts_xml_boxes_to_zero_based(shapes_loc):
    records, synsets = read_ilsvrc_loc(shapes_loc, "train")
    assert len(records) == 12 and len(synsets) == 10
    xml_gt = devkit_ground_truth(records)
    first = records[0]
    # devkit_ground_truth is the exact inverse: the XML's 1-based inclusive numbers again
    text = (shapes_loc / "Annotations" / "train" / f"{first.image_id}.xml").read_text()
    x0 = int(text.split("<xmin>")[1].split("<")[0])
    assert xml_gt[first.image_id][0][1][0] == x0 and first.boxes[0][0] == x0 - 1
    sample = LocDataset(records, synsets, transform=LocTrainTransform(scale_min=64, scale_max=80, crop=56, seed=0))[0]
    assert sample["image"].shape == (3, 56, 56) and sample["boxes"].shape[1] == 4
    assert sample["labels"].min() >= 1


def test_ilsvrc_reader_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="LOC_synset_mapping.txt"):
        read_ilsvrc_loc(tmp_path, "train")


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny"
    for wnid in ("n01", "n02"):
        (root / "train" / wnid / "images").mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t10\t63\t58\n")
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "images" / "val_0.JPEG").write_bytes(b"")  # only its path is read here
    (root / "wnids.txt").write_text("n02\nn01\nn99\n")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t1\t2\t3\t4\nval_1.JPEG\tn99\t0\t0\t63\t63\n")
    synsets = tiny_imagenet_synsets(root)
    assert synsets == ["n02", "n01"]  # wnids.txt order, n99 (no training images) left out
    train = read_tiny_imagenet_train(root, synsets)
    assert [(r.image_id, r.boxes, r.labels) for r in train] == [
        ("n02_0", ((0, 10, 64, 59),), (1,)),
        ("n01_0", ((0, 10, 64, 59),), (2,)),
    ]
    val = read_tiny_imagenet_val_records(root, synsets)
    assert [(r.image_id, r.boxes, r.labels) for r in val] == [("val_0", ((1, 2, 4, 5),), (2,))]


def test_shared_tiny_imagenet_has_200_trained_classes(shared_dir):
    root = shared_dir / "data" / "tiny_imagenet_loc" / "tiny-imagenet-200"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    synsets = tiny_imagenet_synsets(root)
    assert len(synsets) == 200
    val = read_tiny_imagenet_val_records(root, synsets)
    assert len(val) == 10000  # the 100 images of the 2 untrained wnids are skipped


def test_ilsvrc_reader_walks_one_folder_per_wnid(shapes_loc, tmp_path):
    """ILSVRC's CLS-LOC/train keeps the XML (and images) of each wnid in its own folder."""
    records, synsets = read_ilsvrc_loc(shapes_loc, "train")
    root = tmp_path / "ILSVRC"
    for r in records[:4]:
        wnid = synsets[r.labels[0] - 1]
        for kind, src in (
            ("Annotations", shapes_loc / "Annotations" / "train" / f"{r.image_id}.xml"),
            ("Data", Path(r.path)),
        ):
            dst = root / kind / "CLS-LOC" / "train" / wnid / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    nested, _ = read_ilsvrc_loc(root, "CLS-LOC/train", synsets_file=shapes_loc / "LOC_synset_mapping.txt")
    assert sorted((r.image_id, r.boxes, r.labels) for r in nested) == sorted(
        (r.image_id, r.boxes, r.labels) for r in records[:4]
    )


@pytest.mark.parametrize("name", ["shapes_r18", "tinyimagenet_r18", "resnet101_imagenet"])
def test_loc_configs_load(repo_root, name):
    from detres.config.load import load_config

    cfg = load_config(repo_root / "configs" / "loc" / f"{name}.yaml")
    assert cfg.task == "loc" and cfg.input.scale_min >= cfg.input.crop
