"""Tests for tools/eval_det.py run as a command (subprocess with this venv's python)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detres.evaluation.coco import evaluate_coco

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "eval_det.py"
EVALREF = ROOT / ".." / "shared" / "data" / "evalref"
needs_evalref = pytest.mark.skipif(not EVALREF.is_dir(), reason=f"shared reference data not found at {EVALREF}")


def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@needs_evalref
def test_coco_writes_json_out(tmp_path):
    gt, dt = EVALREF / "coco" / "mini" / "gt.json", EVALREF / "coco" / "mini" / "dt.json"
    out = tmp_path / "m.json"
    proc = run_tool("coco", "--gt", gt, "--results", dt, "--json-out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout
    metrics = json.loads(out.read_text())
    assert metrics["summary"] == evaluate_coco(gt, dt)["summary"]
    assert [c["name"] for c in metrics["per_category"]] == ["person", "bed"]
    assert metrics["per_category"][1]["AP"] == -1.0


@needs_evalref
def test_coco_errors_exit_nonzero_with_a_clear_message(tmp_path):
    gt = EVALREF / "coco" / "mini" / "gt.json"
    proc = run_tool("coco", "--gt", tmp_path / "missing_gt.json", "--results", gt, cwd=tmp_path)
    assert proc.returncode == 1 and "ground-truth file not found" in proc.stderr and "missing_gt.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    proc = run_tool("coco", "--gt", gt, "--results", bad, cwd=tmp_path)
    assert proc.returncode == 1 and f"{bad}: invalid JSON" in proc.stderr
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]))
    proc = run_tool("coco", "--gt", gt, "--results", wrong, cwd=tmp_path)
    assert proc.returncode == 1 and "image_id 1 is not an image of the ground truth" in proc.stderr
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    proc = run_tool("coco", "--gt", gt, "--results", empty, "--json-out", tmp_path / "e.json", cwd=tmp_path)
    assert proc.returncode == 0 and "warning:" in proc.stderr and "no detections" in proc.stderr
    assert json.loads((tmp_path / "e.json").read_text())["summary"]["AP"] == 0.0


@needs_evalref
def test_voc_toyexample_and_missing_folder(tmp_path):
    lines = []
    for det_file in sorted((EVALREF / "voc" / "toyexample" / "dets_classname_abs_xyx2y2").glob("*.txt")):
        lines += [
            " ".join([det_file.stem] + line.split()[1:]) for line in det_file.read_text().splitlines() if line.strip()
        ]
    (tmp_path / "det_cat.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "voc.json"
    ann = EVALREF / "voc" / "toyexample" / "Annotations"
    proc = run_tool(
        "voc", "--annotations", ann, "--results", "det_{cls}.txt", "--use-07-metric", "--json-out", out, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(out.read_text())
    # Hand-worked in tests/evaluation/test_voc.py: 11-point AP (7 + 3 * 11/12) / 11 = 39/44.
    assert metrics["mAP"] == pytest.approx(39 / 44, abs=1e-12)
    assert metrics["per_class"] == {"cat": metrics["mAP"]} and metrics["use_07_metric"] is True
    assert "mAP" in proc.stdout
    proc = run_tool("voc", "--annotations", tmp_path / "no_such_dir", "--results", "det_{cls}.txt", cwd=tmp_path)
    assert proc.returncode == 1 and "annotations folder not found" in proc.stderr and "no_such_dir" in proc.stderr


def test_coco_ground_truth_with_repeated_annotation_ids_is_refused_naming_file_and_ids(tmp_path):
    # Issue #6: two files merged, each numbering its annotations from 1. pycocotools keys ground truth by
    # annotation id, so the ground truth fed back as results scored AP 0.252 with no word; now it is an error.
    gt = {
        "images": [{"id": 1, "height": 200, "width": 200}, {"id": 2, "height": 200, "width": 200}],
        "categories": [{"id": 7, "name": "thing"}],
        "annotations": [],
    }
    for image_id, shift in ((1, 0), (2, 40)):
        for k, (x, y, w, h) in enumerate([[10, 10, 30, 40], [60, 20, 50, 30], [100, 100, 60, 70]]):
            gt["annotations"].append(
                {
                    "id": k + 1,
                    "image_id": image_id,
                    "category_id": 7,
                    "iscrowd": 0,
                    "bbox": [x + shift, y, w, h],
                    "area": w * h,
                }
            )
    results = [
        {"image_id": a["image_id"], "category_id": 7, "bbox": a["bbox"], "score": 1.0} for a in gt["annotations"]
    ]
    (tmp_path / "merged.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    proc = run_tool("coco", "--gt", "merged.json", "--results", "res.json", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "merged.json" in proc.stderr and "annotation id(s) used more than once" in proc.stderr
    assert "1 (2x), 2 (2x), 3 (2x)" in proc.stderr
    # Renumbered, the ground truth fed back scores exactly 1.
    for new_id, ann in enumerate(gt["annotations"], start=1):
        ann["id"] = new_id
    (tmp_path / "renumbered.json").write_text(json.dumps(gt))
    proc = run_tool("coco", "--gt", "renumbered.json", "--results", "res.json", "--json-out", "m.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "m.json").read_text())["summary"]["AP"] == pytest.approx(1.0)
