"""Bad samples (data.on_bad_sample): COCO and VOC treat malformed boxes alike, degenerate ones are counted drops,
unknown image ids, missing file names, unreadable images; "error" stops naming the file, "skip" drops and lists."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from detres.config.load import load_config
from detres.data.bad_samples import SKIPPED_FILE, BadSampleError, BadSamples, write_skipped
from detres.data.datasets.coco import CocoDetection
from detres.data.datasets.imagefolder import ImageFolderDataset
from detres.data.datasets.voc import VocDetection
from detres.data.validate import check_cls_sets, check_detection_sets, check_image_files, image_problem

W, H = 48, 32  # every test image


def _png(path: Path, h: int = H, w: int = W) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))
    return path


def _coco(
    tmp_path: Path, boxes: dict[int, list], *, images: list[dict] | None = None, extra_anns=()
) -> tuple[Path, Path]:
    """Images 1 ('a.png') and 2 ('b.png') of 48x32 px, one category (id 5); ``boxes``: image id -> [bbox, ...]."""
    images = images or [
        {"id": 1, "file_name": "a.png", "height": H, "width": W},
        {"id": 2, "file_name": "b.png", "height": H, "width": W},
    ]
    for im in images:
        if isinstance(im.get("file_name"), str):
            _png(tmp_path / "images" / im["file_name"])
    anns, next_id = [], 1
    for image_id, bbs in boxes.items():
        for bb in bbs:
            anns.append({"id": next_id, "image_id": image_id, "category_id": 5, "bbox": bb, "iscrowd": 0, "area": 1.0})
            next_id += 1
    doc = {"images": images, "annotations": anns + list(extra_anns), "categories": [{"id": 5, "name": "thing"}]}
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(doc))
    return tmp_path / "images", ann_file


def _voc(root: Path, boxes: dict[str, list[tuple[float, float, float, float]]], name: str = "thing") -> Path:
    """A VOC folder with one XML per image id (48x32 px) and the set 'trainval'; boxes are 1-based inclusive."""
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(exist_ok=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(boxes) + "\n")
    for image_id, bbs in boxes.items():
        _png(root / "JPEGImages" / f"{image_id}.png")
        objects = "".join(
            f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for b in bbs
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.png</filename><size><width>{W}</width><height>{H}</height>"
            f"<depth>3</depth></size>{objects}</annotation>"
        )
    return root


# --------------------------------------------------------------------------- case 12: COCO and VOC alike
@pytest.mark.parametrize(
    "coco_box,voc_box,what",
    [
        ([10, 5, -4, 6], (10, 5, 6, 11), "negative width / inverted x"),
        ([10, 5, 4, -6], (10, 5, 14, 2), "negative height / inverted y"),
        ([40, 5, 20, 6], (41, 6, 60, 11), "outside the image by more than a pixel"),
    ],
)
def test_malformed_box_is_the_same_bad_sample_in_coco_and_voc(tmp_path, coco_box, voc_box, what):
    image_dir, ann_file = _coco(tmp_path / "coco", {1: [[1, 1, 5, 5], coco_box], 2: [[2, 2, 8, 8]]})
    root = _voc(tmp_path / "voc", {"a": [(2, 2, 6, 6), voc_box], "b": [(3, 3, 10, 10)]})
    with pytest.raises(BadSampleError, match=r"ann\.json: annotation 2 \(image 1 'a\.png'\).*bbox"):
        CocoDetection(image_dir, ann_file)  # the default policy is "error"
    with pytest.raises(BadSampleError, match=r"a\.xml: .*object"):
        VocDetection(root, "trainval")
    coco_bad, voc_bad = BadSamples("skip"), BadSamples("skip")
    coco = CocoDetection(image_dir, ann_file, bad_samples=coco_bad)
    voc = VocDetection(root, "trainval", bad_samples=voc_bad)
    # The whole image goes (its other box would otherwise be trained as background); the other image stays.
    assert coco.ids == [2] and voc.image_ids == ["b"] and coco.num_boxes == voc.num_boxes == 1
    assert len(coco_bad) == len(voc_bad) == 1
    assert coco_bad.skipped[0]["file"].endswith("ann.json") and voc_bad.skipped[0]["file"].endswith("a.xml")


def test_non_finite_coco_box_is_malformed(tmp_path):
    image_dir, ann_file = _coco(tmp_path, {1: [[1, 1, math.nan, 5]], 2: [[2, 2, 8, 8]]})
    with pytest.raises(BadSampleError, match=r"non-finite"):
        CocoDetection(image_dir, ann_file)


def test_degenerate_boxes_are_dropped_and_counted_in_both_formats(tmp_path):
    # Zero width in the file (COCO w=0; VOC xmin == xmax) and zero area once clipped (inside the 1 px tolerance).
    image_dir, ann_file = _coco(tmp_path / "coco", {1: [[1, 1, 5, 5], [7, 7, 0, 4], [W, 3, 0.5, 4]]})
    root = _voc(tmp_path / "voc", {"a": [(2, 2, 6, 6), (8, 8, 8, 12), (W + 1, 4, W + 1, 8)]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coco = CocoDetection(image_dir, ann_file)
        voc = VocDetection(root, "trainval")
    assert coco.num_degenerate == voc.num_degenerate == 2 and coco.num_boxes == voc.num_boxes == 1
    assert sum("dropped 2 degenerate boxes" in str(w.message) for w in caught) == 2


# --------------------------------------------------------------------------- case 6 / 11: COCO structure
def test_annotation_on_an_unknown_image_id_follows_the_policy(tmp_path):
    orphan = {"id": 99, "image_id": 7, "category_id": 5, "bbox": [1, 1, 4, 4], "iscrowd": 0}
    image_dir, ann_file = _coco(tmp_path, {1: [[1, 1, 5, 5]]}, extra_anns=[orphan])
    with pytest.raises(BadSampleError, match=r"ann\.json: annotation 99 has image_id 7, which is not an id in 'images"):
        CocoDetection(image_dir, ann_file)
    bad = BadSamples("skip")
    ds = CocoDetection(image_dir, ann_file, bad_samples=bad)
    assert len(ds) == 2 and ds.num_boxes == 1 and len(bad) == 1 and "annotation 99" in bad.skipped[0]["reason"]


def test_coco_image_without_file_name_is_a_one_line_error_or_a_skip(tmp_path):
    images = [{"id": 1, "height": H, "width": W}, {"id": 2, "file_name": "b.png", "height": H, "width": W}]
    image_dir, ann_file = _coco(tmp_path, {1: [[1, 1, 5, 5]], 2: [[2, 2, 5, 5]]}, images=images)
    with pytest.raises(BadSampleError) as info:
        CocoDetection(image_dir, ann_file)
    assert "ann.json: image 1 has file_name None" in str(info.value) and "\n" not in str(info.value)
    bad = BadSamples("skip")
    ds = CocoDetection(image_dir, ann_file, bad_samples=bad)
    assert ds.ids == [2] and bad.skipped[0]["kind"] == "image"


# --------------------------------------------------------------------------- image files, up front
def test_image_problems_are_found_from_the_header(tmp_path):
    good = _png(tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    assert image_problem(good, (H, W)) is None
    assert image_problem(tmp_path / "nope.png")[0] == "missing image"
    assert image_problem(corrupt)[0] == "unreadable image"
    assert image_problem(good, (H + 1, W))[0] == "size mismatch"
    with pytest.raises(BadSampleError, match=r"corrupt\.png: image header cannot be read"):
        check_image_files([good, corrupt], BadSamples("error"))
    bad = BadSamples("skip")
    assert check_image_files([good, corrupt, tmp_path / "nope.png"], bad) == [0] and len(bad) == 2


def _det_cfg(tmp_path: Path, image_dir: Path, train_ann: Path, val_ann: Path, policy: str = "error"):
    return load_config(
        None,
        [
            f"data.train_images={image_dir}",
            f"data.train_ann={train_ann}",
            f"data.val_images={image_dir}",
            f"data.val_ann={val_ann}",
            f"data.on_bad_sample={policy}",
            f"output_dir={tmp_path / 'run'}",
        ],
        task="det",
    )


def test_detection_sets_skip_a_missing_val_image_and_list_it_in_the_run_folder(tmp_path):
    image_dir, ann_file = _coco(tmp_path, {1: [[1, 1, 5, 5]], 2: [[2, 2, 8, 8]]})
    (image_dir / "b.png").unlink()
    cfg = _det_cfg(tmp_path, image_dir, ann_file, ann_file, policy="skip")
    out = tmp_path / "run"
    out.mkdir()
    bad = BadSamples("skip")
    train, val = (CocoDetection(image_dir, ann_file, bad_samples=bad) for _ in range(2))
    check_detection_sets(train, val, cfg, out)
    assert train.ids == [1] and val.ids == [1] and train.num_boxes == 1
    listed = json.loads((out / SKIPPED_FILE).read_text())
    assert listed["count"] == 2 and all(s["file"].endswith("b.png") for s in listed["samples"])
    with pytest.raises(BadSampleError, match=r"b\.png: image file does not exist"):
        check_detection_sets(
            CocoDetection(image_dir, ann_file),
            CocoDetection(image_dir, ann_file),
            _det_cfg(tmp_path, image_dir, ann_file, ann_file),
            out,
        )


def test_training_set_without_boxes_is_an_error(tmp_path):
    image_dir, empty = _coco(tmp_path, {})
    cfg = _det_cfg(tmp_path, image_dir, empty, empty)
    with pytest.raises(ValueError, match=r"data\.train_ann .*ann\.json: the training set has 2 images but no boxes"):
        check_detection_sets(CocoDetection(image_dir, empty), CocoDetection(image_dir, empty), cfg, tmp_path)


def test_val_class_absent_from_training_is_a_one_line_warning(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": H, "width": W}]
    for sub, cat in (("train", 5), ("val", 6)):
        _png(tmp_path / "images" / "a.png")
        doc = {
            "images": images,
            "categories": [{"id": 5, "name": "thing"}, {"id": 6, "name": "other"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": cat, "bbox": [1, 1, 5, 5], "iscrowd": 0}],
        }
        (tmp_path / f"{sub}.json").write_text(json.dumps(doc))
    cfg = _det_cfg(tmp_path, tmp_path / "images", tmp_path / "train.json", tmp_path / "val.json")
    train = CocoDetection(tmp_path / "images", tmp_path / "train.json")
    val = CocoDetection(tmp_path / "images", tmp_path / "val.json")
    with pytest.warns(UserWarning, match=r"classes with validation boxes but no training box .*: other \(") as caught:
        check_detection_sets(train, val, cfg, tmp_path)
    assert all("\n" not in str(w.message) for w in caught)


def test_corrupt_classification_val_image_is_reported_before_training(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            _png(tmp_path / split / cls / "0.png")
    (tmp_path / "val" / "b" / "1.png").write_bytes(b"")  # empty file: the case-5 corrupt val image
    train = ImageFolderDataset(tmp_path / "train")
    val = ImageFolderDataset(tmp_path / "val", class_to_idx=train.class_to_idx)
    strict = load_config(None, [f"data.train_dir={tmp_path / 'train'}"], task="cls")
    with pytest.raises(BadSampleError, match=r"val/b/1\.png: image header cannot be read"):
        check_cls_sets(train, val, strict, tmp_path)
    lenient = load_config(None, ["data.on_bad_sample=skip"], task="cls")
    check_cls_sets(train, val, lenient, tmp_path)
    assert len(val) == 2 and val.targets == [0, 1]
    assert json.loads((tmp_path / SKIPPED_FILE).read_text())["samples"][0]["kind"] == "unreadable image"


def test_write_skipped_writes_nothing_under_error_and_a_summary_line_under_skip(tmp_path, caplog):
    assert write_skipped(tmp_path, BadSamples("error")) is None and not (tmp_path / SKIPPED_FILE).exists()
    bad = BadSamples("skip")
    bad.report("x.png", "image file does not exist", kind="missing image")
    with caplog.at_level("WARNING"):
        path = write_skipped(tmp_path, bad, bad)  # one collection given twice is listed once
    assert json.loads(path.read_text())["count"] == 1
    assert "skipped 1 bad samples (1 missing image) under data.on_bad_sample=skip" in caplog.text
    with pytest.raises(ValueError, match=r"data\.on_bad_sample: expected one of error, skip"):
        BadSamples("ignore")


# --------------------------------------------------------------------------- localization (Tiny-ImageNet, ILSVRC)
def test_tiny_imagenet_malformed_box_line_and_missing_image_follow_the_policy(tmp_path):
    from detres.data.datasets.localization import read_tiny_imagenet_train
    from detres.data.validate import check_loc_sets

    folder = tmp_path / "train" / "n01"
    for name in ("n01_0.JPEG", "n01_1.JPEG"):
        _png(folder / "images" / name, 64, 64)
    boxes = folder / "n01_boxes.txt"
    boxes.write_text("n01_0.JPEG 1 2 30 40\nn01_1.JPEG 9 9 3 40\nn01_2.JPEG 0 0 63 63\n")  # line 2 inverted
    with pytest.raises(BadSampleError, match=r"n01_boxes\.txt:2: .*not a 0-based inclusive box"):
        read_tiny_imagenet_train(tmp_path, ["n01"], bad_samples=BadSamples("error"))
    bad = BadSamples("skip")
    records = read_tiny_imagenet_train(tmp_path, ["n01"], bad_samples=bad)
    assert [r.image_id for r in records] == ["n01_0", "n01_2"] and len(bad) == 1
    train, val = check_loc_sets(records, records[:1], bad)  # n01_2.JPEG does not exist
    assert [r.image_id for r in train] == ["n01_0"] and len(val) == 1 and len(bad) == 2
    assert bad.skipped[1]["kind"] == "missing image" and bad.skipped[1]["file"].endswith("n01_2.JPEG")


def test_ilsvrc_inverted_box_xml_follows_the_policy(tmp_path):
    from detres.data.datasets.localization import read_ilsvrc_loc

    (tmp_path / "Annotations" / "val").mkdir(parents=True)
    for image_id, box in (("v1", (2, 2, 20, 20)), ("v2", (20, 2, 5, 20))):  # v2: xmax < xmin
        _png(tmp_path / "Data" / "val" / f"{image_id}.png")
        (tmp_path / "Annotations" / "val" / f"{image_id}.xml").write_text(
            f"<annotation><object><name>n01</name><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
            f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object></annotation>"
        )
    with pytest.raises(BadSampleError, match=r"v2\.xml: .*xmax < xmin"):
        read_ilsvrc_loc(tmp_path, "val", ["n01"], bad_samples=BadSamples("error"))
    bad = BadSamples("skip")
    records, _ = read_ilsvrc_loc(tmp_path, "val", ["n01"], bad_samples=bad)
    assert [r.image_id for r in records] == ["v1"] and bad.skipped[0]["file"].endswith("v2.xml")
    with pytest.raises(ValueError, match=r"v2\.xml.*xmax < xmin"):  # without a policy: the reader's own error
        read_ilsvrc_loc(tmp_path, "val", ["n01"])
