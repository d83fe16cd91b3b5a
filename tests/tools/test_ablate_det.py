"""tools/ablate_det.py: the rows of Table 9 on a tiny val set (untrained tiny checkpoints, 64x96 px images)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from tests.tool_loader import load_tool

REQUIRED = ("row", "mAP50", "mAP", "sec_per_img", "voc07_mAP", "gflops_per_img", "cost_ratio", "options", "checkpoints")


ablate_det, test_det = load_tool("ablate_det"), load_tool("test_det")


def _run(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes without ground truth / detections
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def self_gt(tiny_det_world, tiny_det_checkpoint, tmp_path_factory) -> Path:
    """The val annotations replaced by the tiny checkpoint's own 3 best detections per image (one image per
    batch): its AP is far from 0, so equal numbers are a real check (an untrained model scores 0 on the shapes)."""
    from detres.data.datasets.coco import CocoDetection
    from detres.inference.detect import run_inference
    from detres.models.build import load_detector

    coco = json.loads((tiny_det_world / "annotations" / "instances_val.json").read_text())
    model, meta = load_detector(tiny_det_checkpoint)
    dataset = CocoDetection(
        tiny_det_world / "images",
        tiny_det_world / "annotations" / "instances_val.json",
    )
    anns = []
    for det in run_inference(model, dataset, device=torch.device("cpu"), batch_size=1, progress=False):
        for box, label in zip(det["boxes"][:3].tolist(), det["labels"][:3].tolist()):
            x1, y1, x2, y2 = box
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": int(det["image_id"]),
                    "iscrowd": 0,
                    "category_id": meta["label_to_category_id"][int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                }
            )
    path = tmp_path_factory.mktemp("self_gt") / "val.json"
    path.write_text(json.dumps(dict(coco, annotations=anns)))
    return path


@pytest.fixture
def config(write_tiny_det_config, self_gt, tmp_path) -> Path:
    """The tiny val set scored against ``self_gt``; a 3-level pyramid around the 64 px test scale."""
    return write_tiny_det_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        data={"val_ann": str(self_gt)},
        test={"multiscale": {"scales": [48, 64, 96], "reference_size": 32}},
    )


def _rows(config: Path, tmp_path: Path, *args: str) -> tuple[list[dict], str, str]:
    json_out = tmp_path / "rows.json"
    code, out, err = _run(ablate_det.main, ["--config", str(config), "--json-out", str(json_out), *args])
    assert code == 0, err
    return json.loads(json_out.read_text()), out, err


def test_every_row_in_order_with_finite_numbers(config, tiny_det_checkpoint, make_tiny_checkpoint, tmp_path):
    context, member = make_tiny_checkpoint("ctx.pt", seed=1), make_tiny_checkpoint("member.pt", seed=2)
    rows, out, _ = _rows(
        config,
        tmp_path,
        "--baseline",
        str(tiny_det_checkpoint),
        "--context",
        str(context),
        "--ensemble",
        str(member),
        "--out",
        str(tmp_path / "res"),
    )
    assert [r["row"] for r in rows] == ["baseline", "refinement", "context", "multiscale", "ensemble"]
    for row in rows:
        assert set(REQUIRED) <= set(row), row.keys()
        for key in ("mAP50", "mAP", "voc07_mAP", "sec_per_img", "gflops_per_img", "cost_ratio"):
            assert math.isfinite(row[key]), (row["row"], key, row[key])
        assert row["sec_per_img"] > 0 and row["gflops_per_img"] > 0 and 0 <= row["mAP"] <= row["mAP50"] <= 1
        assert (tmp_path / "res" / f"{row['row']}_coco_results.json").is_file()
    assert rows[0]["cost_ratio"] == pytest.approx(1.0)
    assert [r["checkpoints"] for r in rows] == [[str(tiny_det_checkpoint)]] * 2 + [[str(context)]] * 2 + [
        [str(context), str(member)]
    ]
    options = [r["options"] for r in rows]
    assert not options[0]["box_refinement"] and options[0]["voting"] is None and not options[0]["multiscale"]
    assert options[1]["box_refinement"] and options[1]["voting"] and options[2] == options[1]
    assert options[3]["multiscale"] and options[3]["scales"] == [48, 64, 96] and options[3]["box_refinement"]
    assert options[4] == options[3]
    # The multi-scale rows cost more FLOPs than the single-scale ones.
    assert rows[3]["gflops_per_img"] > rows[1]["gflops_per_img"]
    # The markdown table: header, separator, one line per row.
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) and "+box refinement" in table[3] and "ensemble" in table[-1]


def test_rows_without_context_or_ensemble_are_skipped(config, tiny_det_checkpoint, tmp_path):
    rows, _, err = _rows(config, tmp_path, "--baseline", str(tiny_det_checkpoint), "--rows", "baseline,refinement")
    assert [r["row"] for r in rows] == ["baseline", "refinement"]
    code, out, err = _run(
        ablate_det.main, ["--config", str(config), "--baseline", str(tiny_det_checkpoint), "--max-images", "1"]
    )
    assert code == 0, err
    assert "'+context' skipped" in err and "'ensemble' skipped" in err
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["baseline", "+box refinement", "+multi-scale"]


def test_baseline_row_equals_test_det(config, tiny_det_checkpoint, tmp_path):
    rows, _, _ = _rows(
        config, tmp_path, "--baseline", str(tiny_det_checkpoint), "--rows", "baseline", "--out", str(tmp_path / "res")
    )
    # One image per batch as the ablation runs (padding images of other sizes into one batch changes an
    # untrained model's detections).
    code, out, err = _run(
        test_det.main,
        [
            "--config",
            str(config),
            "--checkpoint",
            str(tiny_det_checkpoint),
            "--out",
            str(tmp_path / "t"),
            "solver.images_per_batch=1",
        ],
    )
    assert code == 0, err
    report = json.loads(out)
    assert rows[0]["mAP"] > 0.5  # the self-made ground truth: a real known answer, not 0 = 0
    assert rows[0]["mAP"] == pytest.approx(report["COCO"]["AP"]) and rows[0]["mAP50"] == pytest.approx(
        report["COCO"]["AP50"]
    )
    assert rows[0]["voc07_mAP"] == pytest.approx(report["VOC mAP"])
    # The same detections, not just the same numbers (up to the fp32 rounding of the folded BN the ablation runs).
    ours = json.loads((tmp_path / "res" / "baseline_coco_results.json").read_text())
    theirs = json.loads((tmp_path / "t" / "coco_results.json").read_text())
    assert [(d["image_id"], d["category_id"]) for d in ours] == [(d["image_id"], d["category_id"]) for d in theirs]
    for a, b in zip(ours, theirs):
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_ensemble_of_identical_checkpoints_equals_the_row_above(config, tiny_det_checkpoint, tmp_path):
    copy = tmp_path / "copy.pt"
    shutil.copy(tiny_det_checkpoint, copy)
    rows, _, _ = _rows(
        config,
        tmp_path,
        "--baseline",
        str(tiny_det_checkpoint),
        "--ensemble",
        str(copy),
        "--rows",
        "multiscale,ensemble",
        "--max-images",
        "2",
        "--out",
        str(tmp_path / "res"),
    )
    assert [r["row"] for r in rows] == ["multiscale", "ensemble"] and rows[0]["images"] == 2
    single, double = (
        json.loads((tmp_path / "res" / f"{r}_coco_results.json").read_text()) for r in ("multiscale", "ensemble")
    )
    assert len(single) == len(double) > 0 and {d["image_id"] for d in double} == {d["image_id"] for d in single}
    assert [d["score"] for d in double] == pytest.approx([d["score"] for d in single], abs=1e-5)
    assert rows[1]["mAP"] == pytest.approx(rows[0]["mAP"]) and rows[1]["mAP50"] == pytest.approx(rows[0]["mAP50"])
    assert rows[1]["gflops_per_img"] == pytest.approx(2 * rows[0]["gflops_per_img"], rel=0.1)


def test_bad_input_exits_2_naming_the_problem(config, tiny_det_checkpoint, make_tiny_checkpoint, tmp_path):
    missing = tmp_path / "nowhere.pt"
    code, _, err = _run(
        ablate_det.main, ["--config", str(config), "--baseline", str(tiny_det_checkpoint), "--ensemble", str(missing)]
    )
    assert code == 2 and str(missing) in err
    other = make_tiny_checkpoint("five.pt", class_names=["a", "b", "c", "d", "e"])
    code, _, err = _run(
        ablate_det.main, ["--config", str(config), "--baseline", str(tiny_det_checkpoint), "--ensemble", str(other)]
    )
    assert code == 2 and "five.pt" in err and "class list" in err
    code, _, err = _run(
        ablate_det.main, ["--config", str(config), "--baseline", str(tiny_det_checkpoint), "--rows", "baseline,context"]
    )
    assert code == 2 and "--context" in err
    code, _, err = _run(
        ablate_det.main, ["--config", str(config), "--baseline", str(tiny_det_checkpoint), "--rows", "baselin"]
    )
    assert code == 2 and "baselin" in err
