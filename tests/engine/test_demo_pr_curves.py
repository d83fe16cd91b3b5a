"""Tests for the demo's PR-curve step: rebuilt from coco_results.json, the curves' APs are the reported ones."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from detres.config.load import load_config
from detres.data.build import build_detection_dataset, dataset_label_to_category_id
from detres.data.image_io import read_image_rgb
from detres.data.synthetic import generate_shapes_world
from detres.engine.demo import DET_CONFIG, detections_from_coco_results, write_demo_pr_curves
from detres.evaluation.det_eval import dataset_ground_truth
from detres.evaluation.results_io import detections_to_coco_results, write_coco_results
from detres.evaluation.voc import evaluate_voc_detections


@pytest.fixture(scope="module")
def det_cfg(tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("world")
    paths = generate_shapes_world(root, num_cls_train_per_class=0, num_cls_val_per_class=0, num_det_train=1,
                                  num_det_val=4, num_loc_train=0, num_loc_val=0, det_size=(64, 96))
    return load_config(repo_root / DET_CONFIG, [
        f"data.val_images={paths['det_images']}", f"data.val_ann={paths['det_coco_val']}"])


def _noisy_detections(dataset) -> list[dict]:
    """float32 detections like the model's: jittered ground truth, some relabelled, plus random boxes."""
    rng = np.random.default_rng(0)
    dets = []
    for index in range(len(dataset)):
        ann = dataset.annotation(index)
        gt = np.asarray(ann["boxes"], np.float32).reshape(-1, 4)
        random_boxes = rng.uniform(0, 60, (3, 2)).repeat(2, 1) + [0, 0, 20, 20]
        boxes = np.concatenate([gt + rng.normal(0, 3, gt.shape), random_boxes])
        labels = np.concatenate([ann["labels"], rng.integers(1, 11, 3)])
        labels[rng.random(len(labels)) < 0.2] = 3
        dets.append({"image_id": ann["image_id"], "boxes": boxes.astype(np.float32),
                     "scores": rng.random(len(boxes)).astype(np.float32), "labels": labels})
    return dets


def test_coco_results_round_trip_gives_the_same_voc_numbers(det_cfg):
    dataset = build_detection_dataset(det_cfg, "val", train=False)
    dets = _noisy_detections(dataset)
    back = detections_from_coco_results(detections_to_coco_results(dets, dataset_label_to_category_id(dataset)),
                                        dataset)
    assert [d["image_id"] for d in back] == [d["image_id"] for d in dets]
    for a, b in zip(dets, back):
        np.testing.assert_array_equal(b["boxes"], a["boxes"].astype(np.float64))  # exact, not just close
        np.testing.assert_array_equal(b["labels"], a["labels"])
    gt, names = dataset_ground_truth(dataset), [c["name"] for c in dataset.categories]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from 4 images have no positives
        # assert_equal: NaN APs (classes without positives) compare equal, every other number exactly.
        np.testing.assert_equal(evaluate_voc_detections(back, gt, names), evaluate_voc_detections(dets, gt, names))


def test_demo_writes_pr_curves_next_to_the_test_outputs(det_cfg, tmp_path):
    dataset = build_detection_dataset(det_cfg, "val", train=False)
    dets = _noisy_detections(dataset)
    write_coco_results(detections_to_coco_results(dets, dataset_label_to_category_id(dataset)),
                       tmp_path / "coco_results.json")
    names = [c["name"] for c in dataset.categories]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reported = evaluate_voc_detections(dets, dataset_ground_truth(dataset), names,
                                           use_07_metric=det_cfg.test.use_07_metric)["per_class"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = write_demo_pr_curves(det_cfg, tmp_path, reported)
    assert not [w for w in caught if "differs from metrics.json" in str(w.message)]
    assert png == tmp_path / "pr_curves.png" and read_image_rgb(png).shape == (600, 900, 3)  # 9 x 6 in at 100 dpi
    # A differing reported AP is flagged; an existing PNG (written by the test step) is left as it is.
    png.unlink()
    with pytest.warns(UserWarning, match="differs from metrics.json"):
        write_demo_pr_curves(det_cfg, tmp_path, {**reported, names[0]: 0.123})
    before = png.stat().st_mtime_ns
    assert write_demo_pr_curves(det_cfg, Path(tmp_path), reported) == png and png.stat().st_mtime_ns == before
