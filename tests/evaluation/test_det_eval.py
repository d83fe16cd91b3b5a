"""Tests for detres.evaluation.det_eval: COCO ground truth from VOC sets, difficult objects, perfect detections."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from detres.data.coco import CocoDetection
from detres.data.synthetic import generate_shapes_world
from detres.data.voc import VocDetection
from detres.evaluation.det_eval import dataset_ground_truth, dataset_to_coco_gt, evaluate_detection_dataset


def _write_voc(root: Path, images: dict[str, list[tuple[str, tuple[int, int, int, int], bool]]],
               size: tuple[int, int] = (100, 120)) -> None:
    """A VOC folder with only XMLs and an image set (evaluation never decodes the images)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, objects in images.items():
        body = "".join(
            f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for name, b, diff in objects
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{size[1]}</width><height>{size[0]}</height>"
            f"<depth>3</depth></size>{body}</annotation>")
    (root / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{s}\n" for s in images))


def _det(image_id, boxes, scores, labels) -> dict:
    return {"image_id": image_id, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "scores": np.asarray(scores, np.float32), "labels": np.asarray(labels, np.int64)}


@pytest.fixture(scope="module")
def hand_voc(tmp_path_factory) -> VocDetection:
    root = tmp_path_factory.mktemp("voc")
    # VOC 1-based inclusive boxes: (11, 21, 40, 50) is the continuous box (10, 20, 40, 50).
    _write_voc(root, {"img_a": [("cat", (11, 21, 40, 50), False), ("cat", (61, 61, 90, 90), True)],
                      "img_b": [("dog", (1, 1, 50, 30), False)]})
    return VocDetection(root, "test", class_names=["cat", "dog"], keep_difficult=True)


def test_dataset_to_coco_gt_converts_voc_boxes_and_marks_difficult_as_crowd(hand_voc):
    gt = dataset_to_coco_gt(hand_voc)
    assert gt["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert [(im["id"], im["height"], im["width"]) for im in gt["images"]] == [(0, 100, 120), (1, 100, 120)]
    anns = [(a["image_id"], a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in gt["annotations"]]
    assert anns == [(0, 1, [10.0, 20.0, 30.0, 30.0], 900.0, 0), (0, 1, [60.0, 60.0, 30.0, 30.0], 900.0, 1),
                    (1, 2, [0.0, 0.0, 50.0, 30.0], 1500.0, 0)]
    assert len({a["id"] for a in gt["annotations"]}) == 3
    truth = dataset_ground_truth(hand_voc)
    np.testing.assert_array_equal(truth[0]["boxes"], [[10, 20, 40, 50], [60, 60, 90, 90]])
    np.testing.assert_array_equal(truth[0]["difficult"], [False, True])


def test_detection_on_a_difficult_object_is_neither_tp_nor_fp(hand_voc):
    # The highest-scoring detection sits on the difficult cat. Counted as FP it would halve precision
    # (cat AP 0.5); had the difficult cat counted as a positive, recall would stop at 1/2 (AP 0.5 again).
    on_difficult = _det(0, [[60, 60, 90, 90], [10, 20, 40, 50]], [0.9, 0.8], [1, 1])
    dog = _det(1, [[0, 0, 50, 30]], [0.7], [2])
    result = evaluate_detection_dataset(hand_voc, [on_difficult, dog], use_07_metric=False)
    assert result["voc"]["per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert result["voc"]["mAP"] == pytest.approx(1.0)
    assert result["coco"]["summary"]["AP"] == pytest.approx(1.0)
    assert result["coco"]["summary"]["AP50"] == pytest.approx(1.0)
    # Control: the same detection on empty background is an FP and both metrics drop.
    on_background = _det(0, [[60, 0, 90, 15], [10, 20, 40, 50]], [0.9, 0.8], [1, 1])
    worse = evaluate_detection_dataset(hand_voc, [on_background, dog], use_07_metric=False)
    assert worse["voc"]["per_class"]["cat"] == pytest.approx(0.5)
    assert worse["coco"]["summary"]["AP"] < 0.9


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory) -> dict[str, Path]:
    # 22 images: image 21 (seed 0) holds a difficult object.
    return generate_shapes_world(tmp_path_factory.mktemp("sw"), num_cls_train_per_class=0, num_cls_val_per_class=0,
                                 num_det_train=22, num_det_val=0, num_loc_train=0, num_loc_val=0, det_size=(64, 96))


def _ground_truth_as_detections(dataset) -> list[dict]:
    dets = []
    for index in range(len(dataset)):
        ann = dataset.annotation(index)
        dets.append(_det(ann["image_id"], ann["boxes"], np.ones(len(ann["labels"])), ann["labels"]))
    return dets


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_perfect_detections_score_one(shapes_world, fmt):
    if fmt == "coco":
        dataset = CocoDetection(shapes_world["det_images"], shapes_world["det_coco_train"])
    else:
        dataset = VocDetection(shapes_world["voc_root"], "train", keep_difficult=True)
        assert dataset.num_difficult > 0  # the generated set has difficult objects; they must not hurt
    dets = _ground_truth_as_detections(dataset)
    assert sum(len(d["labels"]) for d in dets) > 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from the set have undefined VOC AP
        result = evaluate_detection_dataset(dataset, dets)
    assert result["coco"]["summary"]["AP"] == pytest.approx(1.0)
    assert result["coco"]["summary"]["AR100"] == pytest.approx(1.0)
    assert result["voc"]["mAP"] == pytest.approx(1.0)
    defined = [ap for ap in result["voc"]["per_class"].values() if ap == ap]
    assert len(defined) >= 3 and all(ap == pytest.approx(1.0) for ap in defined)
    # One shifted box per image (IoU < 0.5 with its object) must cost both metrics.
    for d in dets:
        if len(d["boxes"]):
            width = d["boxes"][0, 2] - d["boxes"][0, 0]
            d["boxes"][0, [0, 2]] += width
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shifted = evaluate_detection_dataset(dataset, dets)
    assert shifted["coco"]["summary"]["AP"] < 0.95 and shifted["voc"]["mAP"] < 0.95


def test_coco_crowd_regions_are_difficult_in_the_voc_ground_truth(shared_dir):
    """coco128 has 10 crowd annotations: they must appear as difficult objects, never as plain ones."""
    import json

    from detres.data.coco import CocoDetection
    from detres.evaluation.det_eval import dataset_ground_truth

    root = shared_dir / "data" / "coco128"
    ann_file = next((root / "annotations").glob("*.json"))
    raw = json.loads(ann_file.read_text())
    dataset = CocoDetection(root / "train2017", ann_file)
    gt = dataset_ground_truth(dataset)
    assert sum(int(g["difficult"].sum()) for g in gt.values()) == sum(a["iscrowd"] for a in raw["annotations"]) == 10
    assert sum(len(g["labels"]) for g in gt.values()) == len(raw["annotations"])
