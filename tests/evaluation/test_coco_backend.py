"""Tests for detres.evaluation.coco_backend: faster-coco-eval gives pycocotools' numbers (the reference), errors."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from detres.evaluation.coco import SUMMARY_KEYS, evaluate_coco, evaluate_coco_detections
from detres.evaluation.coco_backend import BACKENDS, coco_classes
from detres.evaluation.det_eval import evaluate_detection_dataset
from tests.tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
EVALREF = ROOT / ".." / "shared" / "data" / "evalref" / "coco"
needs_evalref = pytest.mark.skipif(not EVALREF.is_dir(), reason=f"shared reference data not found at {EVALREF}")
FAST = "faster_coco_eval"
needs_fast = pytest.mark.skipif(
    importlib.util.find_spec(FAST) is None, reason="faster-coco-eval not installed (pip install -e '.[test]')"
)


def _ann(ann_id: int, image_id: int, cat: int, box: list[float], crowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "bbox": box,
        "area": box[2] * box[3],
        "iscrowd": crowd,
    }


def _det(image_id: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


@pytest.fixture()
def hand_set() -> tuple[dict, list[dict]]:
    """4 images, 4 categories (one without ground truth), small/medium/large boxes, a crowd region, an image
    without detections, an image without objects; hits, loose hits, duplicates, wrong classes, false positives."""
    images = [{"id": i, "height": 480, "width": 640, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 4)]
    categories = [{"id": c, "name": n} for c, n in ((1, "cat"), (2, "dog"), (5, "bird"), (9, "never_seen"))]
    annotations = [
        _ann(1, 1, 1, [10, 10, 20, 20]),
        _ann(2, 1, 1, [100, 100, 60, 50]),
        _ann(3, 1, 2, [300, 200, 200, 150]),
        _ann(4, 2, 2, [50, 60, 25, 30]),
        _ann(5, 2, 5, [400, 50, 120, 110]),
        _ann(6, 2, 1, [200, 200, 150, 150], crowd=1),  # crowd region: detections on it are ignored
        _ann(7, 3, 5, [20, 300, 40, 40]),
        _ann(8, 3, 1, [500, 400, 30, 25]),  # image 3 gets no detections
    ]  # image 4 has no objects
    results = [
        _det(1, 1, [11, 9, 20, 21], 0.95),
        _det(1, 1, [12, 12, 18, 18], 0.6),  # hit + duplicate
        _det(1, 1, [105, 98, 55, 55], 0.8),
        _det(1, 2, [310, 190, 180, 170], 0.7),  # loose hits
        _det(1, 5, [300, 200, 200, 150], 0.65),
        _det(1, 2, [0, 0, 40, 40], 0.4),  # wrong class, false positive
        _det(2, 2, [52, 58, 24, 33], 0.9),
        _det(2, 5, [390, 60, 130, 100], 0.55),
        _det(2, 1, [210, 210, 100, 100], 0.85),
        _det(2, 1, [220, 230, 60, 60], 0.5),  # on the crowd region
        _det(2, 5, [10, 400, 50, 40], 0.75),  # false positive scored above a hit
        _det(4, 1, [100, 100, 50, 50], 0.3),
        _det(4, 2, [0, 0, 640, 480], 0.2),  # image without objects
    ]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def _assert_same_metrics(fast: dict, ref: dict) -> None:
    """Same dict format, and every summary number and per-category AP within 1e-6 of pycocotools'."""
    assert fast.keys() == ref.keys()
    assert list(fast["summary"]) == list(ref["summary"]) == list(SUMMARY_KEYS)
    np.testing.assert_allclose(
        [fast["summary"][k] for k in SUMMARY_KEYS], [ref["summary"][k] for k in SUMMARY_KEYS], rtol=0, atol=1e-6
    )
    assert [(c["id"], c["name"]) for c in fast["per_category"]] == [(c["id"], c["name"]) for c in ref["per_category"]]
    np.testing.assert_allclose(
        [c["AP"] for c in fast["per_category"]], [c["AP"] for c in ref["per_category"]], rtol=0, atol=1e-6
    )
    for key in ("iou_type", "num_images", "num_results"):
        assert fast[key] == ref[key]
    assert fast["summary_text"] == ref["summary_text"]


def _load_bench():
    spec = importlib.util.spec_from_file_location("_bench_coco_eval", ROOT / "benchmarks" / "bench_coco_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_fast
def test_hand_made_set_same_metrics_as_pycocotools(hand_set):
    gt, results = hand_set
    ref = evaluate_coco(gt, results)
    s = ref["summary"]
    assert 0 < s["AP"] < 1 and 0 < s["AP50"] <= 1 and s["APs"] > 0 and s["APm"] > 0 and s["APl"] > 0
    assert ref["per_category"][-1] == {"id": 9, "name": "never_seen", "AP": -1.0}
    _assert_same_metrics(evaluate_coco(gt, results, backend=FAST), ref)
    # The in-memory detections route, and a pycocotools COCO object handed to the other backend.
    dets = [
        {
            "image_id": 1,
            "boxes": np.array([[10, 10, 30, 30], [0, 0, 5, 5]], np.float32),
            "scores": np.array([0.9, 0.8], np.float32),
            "labels": np.array([1, 2]),
        }
    ]
    _assert_same_metrics(
        evaluate_coco_detections(gt, dets, {1: 1, 2: 2}, backend=FAST), evaluate_coco_detections(gt, dets, {1: 1, 2: 2})
    )
    pycoco_cls, _ = coco_classes("pycocotools")
    as_object = pycoco_cls()
    as_object.dataset = json.loads(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        as_object.createIndex()
    _assert_same_metrics(evaluate_coco(as_object, results, backend=FAST), ref)


@needs_fast
def test_seeded_random_set_of_200_images_and_5000_detections_same_metrics():
    gt, results = _load_bench().synthetic_coco(200, 25, seed=3)
    assert len(results) == 5000 and any(a["iscrowd"] for a in gt["annotations"])
    ref = evaluate_coco(gt, results)
    assert 0.05 < ref["summary"]["AP"] < 0.9
    _assert_same_metrics(evaluate_coco(gt, results, backend=FAST), ref)


@needs_fast
@needs_evalref
def test_segm_on_100_val2014_images_same_metrics():
    gt, dt = EVALREF / "gt_val2014_100img.json", EVALREF / "dt_fakesegm100.json"
    _assert_same_metrics(evaluate_coco(gt, dt, iou_type="segm", backend=FAST), evaluate_coco(gt, dt, iou_type="segm"))


@needs_fast
def test_empty_results_and_input_checks_behave_the_same(hand_set):
    gt, results = hand_set
    with pytest.warns(UserWarning, match="no detections"):
        empty = evaluate_coco(gt, [], backend=FAST)
    assert empty["summary"]["AP"] == 0.0 and empty["per_category"][-1]["AP"] == -1.0
    bad_image = [_det(77, 1, [0, 0, 5, 5], 0.5)]
    dup_gt = dict(gt, annotations=gt["annotations"] + [dict(gt["annotations"][0], image_id=2)])
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="image_id 77 is not an image of the ground truth"):
            evaluate_coco(gt, bad_image, backend=backend)
        with pytest.raises(ValueError, match=r"annotation id\(s\) used more than once"):
            evaluate_coco(dup_gt, results, backend=backend)


@needs_fast
def test_string_ids_are_refused_by_faster_coco_eval_only():
    gt = {
        "images": [{"id": "007", "height": 50, "width": 50}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [_ann(1, "007", 1, [5, 5, 20, 20])],
    }
    results = [_det("007", 1, [5, 5, 20, 20], 0.9)]
    assert evaluate_coco(gt, results)["summary"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"images\[0\]: id '007' is not an integer.*faster_coco_eval"):
        evaluate_coco(gt, results, backend=FAST)


def test_unknown_backend_names_the_choices(hand_set):
    gt, results = hand_set
    for call in (lambda: coco_classes("detectron2"), lambda: evaluate_coco(gt, results, backend="detectron2")):
        with pytest.raises(ValueError, match="backend 'detectron2'; choose one of: pycocotools, faster_coco_eval"):
            call()


def test_missing_faster_coco_eval_says_how_to_install(monkeypatch, hand_set):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # makes `import faster_coco_eval` fail
    with pytest.raises(ImportError, match=r"pip install faster-coco-eval.*\.\[fast-eval\]"):
        evaluate_coco(*hand_set, backend=FAST)
    assert evaluate_coco(*hand_set)["summary"]["AP"] > 0  # pycocotools needs nothing more


class _TinyDataset:
    """The two images of hand_set's categories 1/2 as a detection dataset (what det_eval reads)."""

    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]

    def __len__(self) -> int:
        return 2

    def evaluation_ground_truth(self, index: int) -> dict:
        boxes = np.array([[10, 10, 30, 30], [100, 100, 160, 150]] if index == 0 else [[50, 60, 75, 90]], np.float64)
        return {
            "image_id": index,
            "orig_size": (480, 640),
            "file_name": f"{index}.jpg",
            "boxes": boxes,
            "labels": np.array([1, 1] if index == 0 else [2]),
            "iscrowd": np.zeros(len(boxes), bool),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        }


@needs_fast
def test_detection_dataset_evaluation_takes_the_config_backend():
    from detres.config.defaults import defaults_for_task

    assert defaults_for_task("det")["test"]["coco_backend"] == "pycocotools"
    dets = [
        {
            "image_id": 0,
            "boxes": np.array([[11, 9, 31, 30], [0, 0, 9, 9]], np.float32),
            "scores": np.array([0.9, 0.7], np.float32),
            "labels": np.array([1, 1]),
        },
        {
            "image_id": 1,
            "boxes": np.array([[50, 60, 70, 92]], np.float32),
            "scores": np.array([0.8], np.float32),
            "labels": np.array([2]),
        },
    ]
    ref = evaluate_detection_dataset(_TinyDataset(), dets)
    fast = evaluate_detection_dataset(_TinyDataset(), dets, coco_backend=FAST)
    assert fast["voc"] == ref["voc"]
    ref["coco"]["summary_text"] = fast["coco"]["summary_text"] = ""
    _assert_same_metrics(fast["coco"], ref["coco"])
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        evaluate_detection_dataset(_TinyDataset(), dets, coco_backend="fast")


@needs_fast
def test_eval_det_cli_backend_flag(tmp_path, hand_set, capsys):
    gt, results = hand_set
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    eval_det = load_tool("eval_det")
    metrics = {}
    for backend in (None, FAST):
        flag = [] if backend is None else ["--backend", backend]
        out = tmp_path / f"{backend}.json"
        assert (
            eval_det.main(
                [
                    "coco",
                    "--gt",
                    str(tmp_path / "gt.json"),
                    "--results",
                    str(tmp_path / "dt.json"),
                    "--json-out",
                    str(out),
                    *flag,
                ]
            )
            == 0
        )
        assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in capsys.readouterr().out
        metrics[backend] = json.loads(out.read_text())
    assert metrics[FAST]["summary"] == pytest.approx(metrics[None]["summary"], abs=1e-6)
    for fast, ref in zip(metrics[FAST]["per_category"], metrics[None]["per_category"], strict=True):
        assert (fast["id"], fast["name"]) == (ref["id"], ref["name"])
        assert fast["AP"] == pytest.approx(ref["AP"], abs=1e-6)
    with pytest.raises(SystemExit):
        eval_det.main(["coco", "--gt", "g.json", "--results", "r.json", "--backend", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
