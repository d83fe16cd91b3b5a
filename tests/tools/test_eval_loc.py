"""Tests for tools/eval_loc.py run as a command (subprocess with this venv's python) on tiny hand-made sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "eval_loc.py"
KEYS = {
    "top1_loc_err",
    "top5_loc_err",
    "gt_known_loc_err",
    "top1_cls_err",
    "top5_cls_err",
    "num_images",
    "num_blacklisted",
}


def run_tool(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture()
def xml_set(tmp_path: Path) -> Path:
    """3 images of 2 synsets as ILSVRC XML + image set + synset mapping."""
    objects = {
        "v1": [("n01", (1, 1, 100, 100))],
        "v2": [("n02", (1, 1, 50, 50)), ("n02", (60, 60, 99, 99))],
        "v3": [("n01", (11, 11, 40, 40))],
    }
    (tmp_path / "ann").mkdir()
    for stem, objs in objects.items():
        body = "".join(
            f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
            f"<ymax>{b[3]}</ymax></bndbox></object>"
            for n, b in objs
        )
        xml = f"<annotation><filename>{stem}.JPEG</filename>{body}</annotation>"
        (tmp_path / "ann" / f"{stem}.xml").write_text(xml)
    (tmp_path / "val.txt").write_text("v1\nv2\nv3\n")
    (tmp_path / "synsets.txt").write_text("n01 first class\nn02 second class\n")
    return tmp_path


def test_cli_writes_the_metrics(xml_set: Path):
    # v1 right at rank 1; v2 right at rank 2 on its second box; v3 wrong label only.
    (xml_set / "pred.txt").write_text("1 1 1 100 100\n1 1 1 50 50 2 60 60 99 99\n2 11 11 40 40\n")
    args = ["--annotations", "ann", "--image-set", "val.txt", "--synsets", "synsets.txt", "--predictions", "pred.txt"]
    proc = run_tool(*args, "--json-out", "m.json", cwd=xml_set)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((xml_set / "m.json").read_text())
    assert KEYS <= set(metrics)
    assert metrics["top1_loc_err"] == pytest.approx(2 / 3) and metrics["top5_loc_err"] == pytest.approx(1 / 3)
    assert metrics["num_images"] == 3 and metrics["num_blacklisted"] == 0
    assert "top-5 localization error" in proc.stdout
    (xml_set / "black.txt").write_text("3\n")  # the devkit's 1-based index: v3
    proc = run_tool(*args, "--blacklist", "black.txt", "--json-out", "m.json", cwd=xml_set)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((xml_set / "m.json").read_text())
    assert (metrics["num_images"], metrics["num_blacklisted"], metrics["top5_loc_err"]) == (2, 1, 0.0)


def test_cli_malformed_prediction_line_exits_2_naming_file_and_line(xml_set: Path):
    (xml_set / "pred.txt").write_text("1 1 1 100 100\n2 60 60 99\n2 11 11 40 40\n")
    proc = run_tool(
        "--annotations",
        "ann",
        "--image-set",
        "val.txt",
        "--synsets",
        "synsets.txt",
        "--predictions",
        "pred.txt",
        cwd=xml_set,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pred.txt:2: expected groups of 5 numbers" in proc.stderr
    (xml_set / "pred.txt").write_text("1 1 1 100 100\n3 60 60 99 99\n")
    proc = run_tool(
        "--annotations",
        "ann",
        "--image-set",
        "val.txt",
        "--synsets",
        "synsets.txt",
        "--predictions",
        "pred.txt",
        cwd=xml_set,
    )
    assert proc.returncode == 2 and "pred.txt: 2 lines, expected one line per image" in proc.stderr


def test_cli_on_tiny_imagenet_annotations_file(tmp_path: Path):
    (tmp_path / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t32\t44\t62\nval_1.JPEG\tn01\t0\t0\t63\t63\n")
    (tmp_path / "wnids.txt").write_text("n01\nn02\n")
    # 1-based boxes: val_0 is (1, 33, 45, 63); val_1's guess (1, 1, 64, 32) has IoU 0.5 with (1, 1, 64, 64).
    (tmp_path / "pred.txt").write_text("2 1 33 45 63\n1 1 1 64 32\n")
    proc = run_tool(
        "--annotations",
        "val_annotations.txt",
        "--synsets",
        "wnids.txt",
        "--predictions",
        "pred.txt",
        "--json-out",
        "m.json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "m.json").read_text())["top1_loc_err"] == 0.0
