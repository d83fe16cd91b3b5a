"""detres.data.datasets.subset: the first N images of a detection dataset, scored against the ground truth of just
those."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from torch.utils.data import Subset

from detres.data.datasets.coco import CocoDetection
from detres.data.datasets.subset import DetectionSubset, first_images
from detres.evaluation.det_eval import dataset_to_coco_gt, evaluate_detection_dataset


@pytest.fixture
def val_set(tiny_det_world) -> CocoDetection:
    return CocoDetection(tiny_det_world / "images", tiny_det_world / "annotations" / "instances_val.json")


def _perfect(dataset, count: int) -> list[dict]:
    dets = []
    for index in range(count):
        ann = dataset.annotation(index)
        dets.append(
            {
                "image_id": ann["image_id"],
                "boxes": np.asarray(ann["boxes"], np.float32),
                "scores": np.ones(len(ann["labels"]), np.float32),
                "labels": np.asarray(ann["labels"]),
            }
        )
    return dets


def test_first_images_is_a_subset_with_the_datasets_metadata(val_set):
    assert first_images(val_set, None) is val_set and first_images(val_set, 10) is val_set
    subset = first_images(val_set, 2)
    assert isinstance(subset, Subset) and isinstance(subset, DetectionSubset) and len(subset) == 2
    assert subset.categories == val_set.categories and subset.label_to_category_id == val_set.label_to_category_id
    assert subset.annotation(1)["image_id"] == val_set.annotation(1)["image_id"]
    assert subset[1]["image_id"] == val_set[1]["image_id"]
    with pytest.raises(ValueError, match=">= 1"):
        first_images(val_set, 0)
    # A dataset without evaluation_ground_truth (VOC) gives a subset without it: evaluation then uses annotation.
    assert not hasattr(DetectionSubset(_AnnotationOnly(), [1]), "evaluation_ground_truth")
    assert DetectionSubset(_AnnotationOnly(), [1]).annotation(0) == {"image_id": 1}


class _AnnotationOnly:
    categories: list = []

    def __len__(self) -> int:
        return 2

    def annotation(self, index: int) -> dict:
        return {"image_id": index}


def test_a_subset_is_scored_against_the_ground_truth_of_its_images_only(val_set):
    subset = first_images(val_set, 2)
    gt = dataset_to_coco_gt(subset)
    assert [im["id"] for im in gt["images"]] == [val_set.annotation(i)["image_id"] for i in range(2)]
    dets = _perfect(val_set, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from the two images have undefined VOC AP
        on_subset = evaluate_detection_dataset(subset, dets)
        on_all = evaluate_detection_dataset(val_set, dets)
    assert on_subset["coco"]["summary"]["AP"] == pytest.approx(1.0) and on_subset["voc"]["mAP"] == pytest.approx(1.0)
    assert on_all["coco"]["summary"]["AR100"] < 1.0  # the third image's objects were never detected
