"""Tests for detres.data.datasets.voc: BCCD counts recomputed from the XMLs, 1-based -> 0-based boxes, difficult
flags."""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detres.data.datasets.voc import VOC_CLASSES, VocDetection
from detres.data.transforms.detection import build_det_transforms


@pytest.fixture(scope="module")
def bccd(shared_dir: Path) -> Path:
    root = shared_dir / "data" / "bccd" / "BCCD"
    if not (root / "ImageSets" / "Main" / "trainval.txt").is_file():
        pytest.skip(f"BCCD not found at {root}")
    return root


@pytest.fixture(scope="module")
def bccd_trainval(bccd: Path) -> tuple[VocDetection, list[str]]:
    return _load(bccd, "trainval")


def _raw_objects(root: Path, image_id: str) -> list[tuple[str, list[int]]]:
    """Independent reading of one XML with ElementTree: (name, [xmin, ymin, xmax, ymax]) per object."""
    tree = ET.parse(root / "Annotations" / f"{image_id}.xml").getroot()
    return [
        (obj.findtext("name").strip(), [int(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        for obj in tree.iter("object")
    ]


def _load(root: Path, image_set: str, **kwargs) -> tuple[VocDetection, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = VocDetection(root, image_set, **kwargs)
    return ds, [str(w.message) for w in caught]


def test_bccd_trainval_drops_the_two_zero_area_boxes_with_one_warning(bccd: Path, bccd_trainval) -> None:
    ds, messages = bccd_trainval
    ids = (bccd / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    assert ds.image_ids == ids and len(ds) == 292
    raw = {i: _raw_objects(bccd, i) for i in ids}
    zero_area = [(i, b) for i in ids for _, b in raw[i] if b[0] == b[2] or b[1] == b[3]]
    assert [i for i, _ in zero_area] == ["BloodImage_00338", "BloodImage_00343"]
    assert len(messages) == 1
    assert messages[0].startswith("dropped 2 degenerate boxes")
    assert "BloodImage_00338" in messages[0] and "BloodImage_00343" in messages[0]
    assert ds.num_degenerate == 2
    assert ds.num_boxes == sum(len(v) for v in raw.values()) - 2
    assert ds.class_names == ["Platelets", "RBC", "WBC"]
    assert ds.categories == [{"id": 1, "name": "Platelets"}, {"id": 2, "name": "RBC"}, {"id": 3, "name": "WBC"}]


def test_bccd_test_split_boxes_are_the_xml_boxes_shifted_to_0_based(bccd: Path) -> None:
    ds, messages = _load(bccd, "test")
    assert messages == [] and len(ds) == 72 and ds.num_degenerate == 0
    for i, image_id in enumerate(ds.image_ids):
        ann = ds.annotation(i)
        assert ann["image_id"] == i and ann["orig_size"] == ds.image_hw(i) == (480, 640)
        raw = _raw_objects(bccd, image_id)
        expected = np.array([[x1 - 1, y1 - 1, x2, y2] for _, (x1, y1, x2, y2) in raw], dtype=np.float32)
        np.testing.assert_array_equal(ann["boxes"], expected)
        names = [ds.class_names[label - 1] for label in ann["labels"]]
        assert names == [n for n, _ in raw]
        assert not ann["difficult"].any()  # BCCD sets no difficult flags


def test_bccd_totals_over_both_splits(bccd: Path, bccd_trainval) -> None:
    trainval, _ = bccd_trainval
    test, _ = _load(bccd, "test", class_names=trainval.class_names)
    assert len(trainval) + len(test) == 364
    assert trainval.num_boxes + test.num_boxes == 4888 - 2
    counts = {n: 0 for n in trainval.class_names}
    for ds in (trainval, test):
        for i in range(len(ds)):
            for label in ds.annotation(i)["labels"]:
                counts[ds.class_names[label - 1]] += 1
    assert counts == {"RBC": 4155 - 2, "WBC": 372, "Platelets": 361}  # SOURCE.txt counts, minus the 2 RBC points


def test_bccd_sample_decodes_and_transforms(bccd: Path) -> None:
    ds, _ = _load(bccd, "test", transforms=build_det_transforms(train=False, min_size=120, max_size=1000))
    sample = ds[0]
    assert sample["image"].shape == (3, 120, 160) and sample["image"].dtype == torch.float32
    assert sample["scale"] == pytest.approx(0.25) and sample["orig_size"] == (480, 640)
    assert sample["file_name"].endswith(f"JPEGImages/{ds.image_ids[0]}.jpg")
    torch.testing.assert_close(sample["boxes"], torch.from_numpy(ds.annotation(0)["boxes"]) * 0.25, atol=1e-3, rtol=0)
    assert sample["difficult"].dtype == torch.bool and sample["labels"].dtype == torch.int64


def _write_voc(root: Path, objects_per_image: dict[str, list[tuple]], size=(40, 30), image_set="trainval") -> None:
    """Minimal VOC folder; an object is (name, xmin, ymin, xmax, ymax, difficult)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    for image_id, objects in objects_per_image.items():
        objs = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><truncated>0</truncated>"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for n, x1, y1, x2, y2, d in objects
        )
        xml = (
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objs}</annotation>"
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), np.zeros((h, w, 3), np.uint8))
    (root / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(objects_per_image) + "\n")


def test_difficult_objects_flagged_or_left_out(tmp_path: Path) -> None:
    objects = {"img1": [("dog", 1, 1, 10, 10, 0), ("cat", 5, 5, 20, 25, 1)], "img2": [("dog", 3, 4, 40, 30, 1)]}
    _write_voc(tmp_path, objects)
    ds, _ = _load(tmp_path, "trainval")
    assert ds.class_names == ["cat", "dog"] and ds.num_difficult == 2
    a = ds.annotation(0)
    np.testing.assert_array_equal(a["difficult"], [False, True])
    np.testing.assert_array_equal(a["labels"], [2, 1])
    np.testing.assert_array_equal(a["boxes"], [[0, 0, 10, 10], [4, 4, 20, 25]])
    assert ds[1]["difficult"].tolist() == [True]
    no_diff, _ = _load(tmp_path, "trainval", keep_difficult=False)
    np.testing.assert_array_equal(no_diff.annotation(0)["labels"], [2])
    assert no_diff.annotation(1)["boxes"].shape == (0, 4)  # image kept, with zero boxes
    assert no_diff[1]["boxes"].shape == (0, 4)


def test_voc_classes_constant_and_unknown_class(tmp_path: Path) -> None:
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    _write_voc(tmp_path, {"000001": [("dog", 2, 2, 9, 9, 0)], "000002": [("person", 1, 1, 5, 5, 0)]})
    ds, _ = _load(tmp_path, "trainval", class_names=VOC_CLASSES)
    assert ds.annotation(0)["labels"].tolist() == [VOC_CLASSES.index("dog") + 1]
    assert ds.categories[14] == {"id": 15, "name": "person"}
    with pytest.raises(ValueError, match=r"000002\.xml.*'person'"):
        VocDetection(tmp_path, "trainval", class_names=["dog"])


def test_boxes_beyond_the_image_are_clipped_and_points_dropped(tmp_path: Path) -> None:
    # Within the 1 px tolerance: (30, 20, 41, 31) is clipped; (41, 1, 41, 9) lies on the right border, zero area once
    # clipped; (7, 7, 7, 7) is a point.
    _write_voc(tmp_path, {"a": [("x", 30, 20, 41, 31, 0), ("x", 7, 7, 7, 7, 0), ("x", 41, 1, 41, 9, 0)]}, size=(40, 30))
    ds, messages = _load(tmp_path, "trainval")
    np.testing.assert_array_equal(ds.annotation(0)["boxes"], [[29, 19, 40, 30]])
    assert ds.num_degenerate == 2 and len(messages) == 1 and messages[0].startswith("dropped 2 degenerate boxes")


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/val\.txt"):
        VocDetection(tmp_path, "val")
    _write_voc(tmp_path, {"a": [("x", 1, 1, 5, 5, 0)]})
    (tmp_path / "ImageSets" / "Main" / "trainval.txt").write_text("a\nghost\n")
    with pytest.raises(ValueError, match=r"ghost\.xml: VOC annotation does not exist"):  # a bad sample
        VocDetection(tmp_path, "trainval")
