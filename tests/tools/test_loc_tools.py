"""Tests for tools/train_loc.py and tools/test_loc.py (in-process): a tiny run, the Table-13 report, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detres.data.shapes.writers import write_loc_task
from detres.models.build import build_classifier
from detres.utils.torch_files import save_checkpoint
from tests.tool_loader import load_tool

WNIDS = [f"n900000{k:02d}" for k in range(1, 11)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loc_tools")
    write_loc_task(root, 0, {"train": 20, "val": 3}, (96, 160))
    torch.manual_seed(0)
    args = dict(arch="imagenet", depth=18, num_classes=10, base_width=8)
    cls = root / "cls.pt"  # an untrained train_cls-format checkpoint: backbone and class predictor
    state = {"model": build_classifier(**args).state_dict(), "model_args": args, "class_names": WNIDS}
    save_checkpoint(cls, dict(state, bn_recomputed=True))
    save_checkpoint(root / "cls_last.pt", dict(state, bn_recomputed=False))
    config = root / "loc.yaml"
    config.write_text(
        f"task: loc\noutput_dir: {root / 'run'}\ndevice: cpu\n"
        f"model: {{depth: 18, base_width: 8, weights: {cls}, anchor_sizes: [16, 32, 64]}}\n"
        f"data: {{root: {root / 'loc'}, num_workers: 0}}\n"
        "input: {scale_min: 64, scale_max: 80, crop: 56}\n"
        "solver: {images_per_batch: 2, base_lr: 0.001, max_iter: 2, steps: [1], checkpoint_period: 1, log_period: 1}\n"
        "test: {scale: 64, top_n: 5}\n"
    )
    return {"root": root, "cls": cls, "config": config}


def test_train_then_test_prints_the_table(setup, capsys):
    assert load_tool("train_loc").main(["--config", str(setup["config"])]) == 0
    assert "RPN dense, ground-truth class" in capsys.readouterr().out
    final = setup["root"] / "run" / "model_final.pt"
    out_json = setup["root"] / "report.json"
    code = load_tool("test_loc").main(
        [
            "--config",
            str(setup["config"]),
            "--checkpoint",
            str(final),
            "--classifier",
            str(setup["cls"]),
            "test.top_n=4",
            "--mode",
            "dense",
            "--json-out",
            str(out_json),
            "--out-dir",
            str(setup["root"] / "t"),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and "RPN dense, predicted classes" in text and "RPN 1-crop" not in text
    report = json.loads(out_json.read_text())
    row = report["rows"]["rpn_dense_predicted"]
    assert row["num_images"] == 3 and 0 <= row["top5_loc_err"] <= row["top1_loc_err"] <= 1
    lines = (setup["root"] / "t" / "rpn_dense_predicted.txt").read_text().splitlines()
    assert [len(line.split()) for line in lines] == [25, 25, 25]  # five (label, box) guesses per image
    rcnn = [
        "--config",
        str(setup["config"]),
        "--stage",
        "rcnn",
        f"model.rcnn.rpn_checkpoint={final}",
        f"output_dir={setup['root'] / 'rcnn'}",
        "model.rcnn.crop_size=32",
        "model.rcnn.regions_per_batch=4",
        "model.rcnn.proposals_per_class=3",
    ]
    assert load_tool("train_loc").main(rcnn) == 0
    trained = capsys.readouterr().out
    assert "RPN+R-CNN dense, GT class" in trained
    # test_loc reads the R-CNN checkpoint together with its RPN and reproduces the training run's row.
    rcnn_json = setup["root"] / "rcnn_report.json"
    code = load_tool("test_loc").main(
        [
            "--config",
            str(setup["config"]),
            "--checkpoint",
            str(setup["root"] / "rcnn" / "model_final.pt"),
            "--json-out",
            str(rcnn_json),
            "--out-dir",
            str(setup["root"] / "t2"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    rows = json.loads(rcnn_json.read_text())["rows"]
    assert {"rpn_1crop_gt_class", "rpn_dense_gt_class", "rpn_rcnn_dense_gt_class"} <= set(rows)  # all of Table 13
    assert "RPN 1-crop, ground-truth class" in printed and "RPN+R-CNN dense, GT class" in printed
    tested = rows["rpn_rcnn_dense_gt_class"]
    trained_row = json.loads((setup["root"] / "rcnn" / "metrics.json").read_text())["rows"]["rpn_rcnn_dense_gt_class"]
    assert tested["gt_known_loc_err"] == trained_row["gt_known_loc_err"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stage", "rcnn"], "model.rcnn.rpn_checkpoint"),
        (
            ["--stage", "rcnn", "model.rcnn.rpn_checkpoint=rpn.pt", "model.rcnn.crop_source=original"],
            "model.rcnn.crop_source",
        ),
        (["model.nonsense=1"], "model.nonsense"),
        (["data.root=/nonexistent/loc"], "data.root"),
        (["model.weights=/nonexistent/cls.pt"], "model.weights"),
        (["model.base_width=16"], "base_width"),
    ],
)
def test_train_loc_bad_input_exits_2(setup, capsys, argv, message):
    assert (
        load_tool("train_loc").main(["--config", str(setup["config"]), *argv, f"output_dir={setup['root'] / 'bad'}"])
        == 2
    )
    assert message in capsys.readouterr().err


def test_backbone_without_recomputed_bn_is_refused(setup, capsys):
    argv = [
        "--config",
        str(setup["config"]),
        f"model.weights={setup['root'] / 'cls_last.pt'}",
        f"output_dir={setup['root'] / 'bad_bn'}",
    ]
    assert load_tool("train_loc").main(argv) == 2
    assert "model.allow_unrecomputed_bn" in capsys.readouterr().err


def test_test_loc_bad_input_exits_2(setup, tmp_path, capsys):
    tool = load_tool("test_loc")
    assert tool.main(["--config", str(setup["config"]), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert tool.main(["--config", str(setup["config"]), "--checkpoint", str(setup["cls"])]) == 2
    assert "not a train_loc RPN-stage checkpoint" in capsys.readouterr().err
    det = tmp_path / "det.yaml"
    det.write_text("task: det\n")
    assert tool.main(["--config", str(det), "--checkpoint", str(setup["cls"])]) == 2
    assert "task: loc" in capsys.readouterr().err
