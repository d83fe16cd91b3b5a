"""Tests for tools/train_det.py, tools/test_det.py and tools/infer.py (their main() run in-process)."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detres.data.image_io import read_image_rgb
from detres.inference.predictor import Predictor
from detres.inference.visualize import write_png
from detres.utils.torch_files import save_checkpoint
from tests.tiny_configs import tiny_train_det_config, write_yaml
from tests.tool_loader import load_tool

train_det, test_det, infer = load_tool("train_det"), load_tool("test_det"), load_tool("infer")


def _config(det: Path, out: Path, path: Path, **data_overrides: str) -> Path:
    """A CPU-test-sized detector config (quarter-width ResNet-18, ~128 px inputs, few RoIs) as a YAML file."""
    return write_yaml(path, tiny_train_det_config(det, out, data=data_overrides))


@pytest.fixture(scope="module")
def trained(small_det_world, tmp_path_factory) -> tuple[Path, Path, dict]:
    """train_det run for 2 iterations: (config path, output folder, printed summary)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = _config(small_det_world, tmp / "run", tmp / "tiny.yaml")
    capture = _Capture()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model's evaluation warns about classes without detections
        code = capture.run(train_det.main, ["--config", str(cfg)])
    assert code == 0, capture.err
    return cfg, tmp / "run", json.loads(capture.out)


class _Capture:
    """Runs a main() with stdout/stderr captured (module-scoped fixtures cannot use capsys)."""

    def run(self, main, argv: list[str]) -> int:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        self.out, self.err = out.getvalue(), err.getvalue()
        return code


def test_train_det_prints_a_summary_and_writes_a_run(trained):
    _, out, summary = trained
    assert summary["iterations"] == 2 and len(summary["COCO"]) == 12
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "metrics.json",
        "loss_curves.png",
        "last.pt",
        "model_final.pt",
        "test/coco_results.json",
        "test/metrics.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["coco"]["summary"] == pytest.approx(summary["COCO"])


def test_test_det_reproduces_the_training_run_metrics(trained, tmp_path, capsys):
    cfg, out, summary = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = test_det.main(
            ["--config", str(cfg), "--checkpoint", str(out / "model_final.pt"), "--out", str(tmp_path / "t")]
        )
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads(printed)
    # Same weights, same test set: the same numbers as the evaluation at the end of training.
    assert report["COCO"] == pytest.approx(summary["COCO"]) and report["out"] == str(tmp_path / "t")
    assert (report["VOC mAP"] == pytest.approx(summary["VOC mAP"])) or (report["VOC mAP"] is None is summary["VOC mAP"])
    written = sorted(str(p.relative_to(tmp_path / "t")) for p in (tmp_path / "t").rglob("*") if p.is_file())
    assert "coco_results.json" in written and "metrics.json" in written
    assert "coco_gt.json" in written and "pr_curves.png" in written
    assert sum(name.startswith("voc/comp4_det_test_") for name in written) == 10
    assert sorted(n for n in written if n.startswith("vis/")) == ["vis/val_000001.png", "vis/val_000002.png"]
    assert json.loads((tmp_path / "t" / "coco_results.json").read_text()) == json.loads(
        (out / "test" / "coco_results.json").read_text()
    )


def test_test_det_rejects_a_test_set_with_other_classes(trained, small_det_world, tmp_path, capsys):
    cfg, out, _ = trained
    coco = json.loads((small_det_world / "annotations" / "instances_val.json").read_text())
    coco["categories"][0]["name"] = "blob"
    ann = tmp_path / "renamed.json"
    ann.write_text(json.dumps(coco))
    code = test_det.main(["--config", str(cfg), "--checkpoint", str(out / "model_final.pt"), f"data.val_ann={ann}"])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on classes" in err and "blob" in err


def test_train_det_bad_input_exits_2_naming_the_problem(small_det_world, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "instances.json"
    cfg = _config(small_det_world, tmp_path / "a", tmp_path / "a.yaml", train_ann=str(missing))
    assert train_det.main(["--config", str(cfg)]) == 2
    assert str(missing) in capsys.readouterr().err

    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text(yaml.safe_dump({"task": "det", "model": {"roi_heads": {"pooler_size": 7}}}))
    assert train_det.main(["--config", str(bad_key)]) == 2
    err = capsys.readouterr().err
    assert "model.roi_heads.pooler_size" in err and "pooler_resolution" in err  # names the key and the known ones

    cfg = _config(small_det_world, tmp_path / "b", tmp_path / "b.yaml")
    assert train_det.main(["--config", str(cfg), "solver.momentm=0.9"]) == 2
    assert "solver.momentm" in capsys.readouterr().err


def test_train_det_names_a_missing_image_file(small_det_world, tmp_path, capsys):
    coco = json.loads((small_det_world / "annotations" / "instances_train.json").read_text())
    coco["images"][1]["file_name"] = "gone.png"
    ann = tmp_path / "broken.json"
    ann.write_text(json.dumps(coco))
    cfg = _config(small_det_world, tmp_path / "run", tmp_path / "c.yaml", train_ann=str(ann), val_ann=str(ann))
    assert train_det.main(["--config", str(cfg)]) == 2
    assert str(small_det_world / "images" / "gone.png") in capsys.readouterr().err
    # Read in a DataLoader worker, the error still comes out as one line naming the file.
    assert train_det.main(["--config", str(cfg), "data.num_workers=1", f"output_dir={tmp_path / 'run1'}"]) == 2
    err = capsys.readouterr().err
    assert str(small_det_world / "images" / "gone.png") in err and "Traceback" not in err


def test_train_det_refuses_to_overwrite_a_run(trained, capsys):
    cfg, _, _ = trained
    assert train_det.main(["--config", str(cfg)]) == 2
    assert "--resume" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- infer
def test_infer_writes_detections_json_and_pngs_in_original_pixels(trained, small_det_world, tmp_path, capsys):
    _, out, _ = trained
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("val_000001.png", "val_000002.png"):
        (folder / name).write_bytes((small_det_world / "images" / name).read_bytes())
    (folder / "notes.txt").write_text("not an image, ignored")
    code = infer.main(
        [
            "--checkpoint",
            str(out / "model_final.pt"),
            "--input",
            str(folder),
            "--out",
            str(tmp_path / "o"),
            "--score-thresh",
            "0.0",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "o" / "detections.json").read_text())
    assert [Path(r["file"]).name for r in result["images"]] == ["val_000001.png", "val_000002.png"]
    predictor = Predictor(out / "model_final.pt")
    total = 0
    for record in result["images"]:
        image = read_image_rgb(record["file"])
        assert (record["height"], record["width"]) == image.shape[:2]
        expected = predictor.predict(image)
        np.testing.assert_allclose(np.asarray(record["boxes"]).reshape(-1, 4), expected["boxes"], atol=1e-4)
        np.testing.assert_allclose(record["scores"], expected["scores"], atol=1e-6)
        assert record["labels"] == expected["labels"].tolist()
        assert record["class_names"] == [result["class_names"][label - 1] for label in record["labels"]]
        boxes = np.asarray(record["boxes"]).reshape(-1, 4)
        assert (
            (boxes >= 0).all()
            and (boxes[:, [0, 2]] <= image.shape[1]).all()
            and (boxes[:, [1, 3]] <= image.shape[0]).all()
        )
        png = read_image_rgb(tmp_path / "o" / f"{Path(record['file']).stem}.png")
        assert png.shape == image.shape
        total += len(record["scores"])
    assert total > 0  # score threshold 0: the untrained model still returns its top-scoring boxes
    # A higher threshold keeps exactly the detections that reach it, in the same order; a single file works
    # as input too. The threshold is set between two of the image's scores, so that some are kept and some
    # are not (a 0.99 threshold kept none of an untrained model's, and "all kept ones are >= 0.99" held vacuously).
    first = result["images"][0]
    ranked = sorted(first["scores"], reverse=True)
    gaps = [(hi - lo, (hi + lo) / 2) for hi, lo in zip(ranked, ranked[1:]) if hi - lo > 1e-4]
    assert gaps, ranked
    thresh = max(gaps)[1]
    keep = [i for i, s in enumerate(first["scores"]) if s >= thresh]
    assert 0 < len(keep) < len(first["scores"])
    code = infer.main(
        [
            "--checkpoint",
            str(out / "model_final.pt"),
            "--input",
            str(folder / "val_000001.png"),
            "--out",
            str(tmp_path / "o2"),
            "--score-thresh",
            repr(thresh),
            "--device",
            "cpu",
        ]
    )
    single = json.loads((tmp_path / "o2" / "detections.json").read_text())
    assert code == 0 and len(single["images"]) == 1
    np.testing.assert_allclose(single["images"][0]["scores"], [first["scores"][i] for i in keep], atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(single["images"][0]["boxes"]).reshape(-1, 4),
        np.asarray(first["boxes"]).reshape(-1, 4)[keep],
        atol=1e-4,
    )
    assert single["images"][0]["labels"] == [first["labels"][i] for i in keep]


def test_infer_errors_name_the_file(trained, tmp_path, capsys):
    _, out, _ = trained
    ckpt = str(out / "model_final.pt")
    folder = tmp_path / "imgs"
    folder.mkdir()

    def run(*args: str) -> str:
        assert infer.main([*args, "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
        return capsys.readouterr().err

    assert "has no image files" in run("--checkpoint", ckpt, "--input", str(folder))
    assert "does not exist" in run("--checkpoint", ckpt, "--input", str(tmp_path / "absent"))
    (folder / "broken.png").write_bytes(b"this is not a png")
    err = run("--checkpoint", ckpt, "--input", str(folder))
    assert str(folder / "broken.png") in err and "Traceback" not in err
    err = run("--checkpoint", str(tmp_path / "missing.pt"), "--input", str(folder))
    assert "checkpoint not found" in err and "missing.pt" in err
    save_checkpoint(tmp_path / "cls.pt", {"model": {}, "model_args": {}, "class_names": ["a"], "data_stats": {}})
    assert "not a train_det checkpoint" in run("--checkpoint", str(tmp_path / "cls.pt"), "--input", str(folder))
    assert not (tmp_path / "o" / "detections.json").exists()
    # Writing the drawn PNGs over the inputs is refused.
    good = tmp_path / "good"
    good.mkdir()
    write_png(good / "a.png", np.zeros((40, 50, 3), np.uint8))
    assert infer.main(["--checkpoint", ckpt, "--input", str(good), "--out", str(good)]) == 2
    assert "would overwrite input images" in capsys.readouterr().err


# ------------------------------------------------- issue #6: the ground truth test_det / train_det score against
def _val_with_repeated_ids_and_bad_boxes(small_det_world: Path, out: Path) -> Path:
    """The val file as a merge would leave it (every image numbers its annotations from 1) with a zero-width box,
    a box wholly outside its image and one reaching past the image's corner."""
    coco = json.loads((small_det_world / "annotations" / "instances_val.json").read_text())
    per_image: dict[int, int] = {}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
        ann["id"] = per_image[ann["image_id"]]
    img = coco["images"][0]
    cat = coco["categories"][0]["id"]
    w, h = img["width"], img["height"]
    # (Within the 1 px tolerance: a box further outside is malformed, a bad sample, see tests/data/test_bad_samples.py.)
    for k, box in enumerate([[3, 3, 0, 9], [w + 0.5, 2, 0.5, 6], [w - 12, h - 9, 12.5, 9.5]]):
        coco["annotations"].append(
            {
                "id": 100 + k,
                "image_id": img["id"],
                "category_id": cat,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
        )
    assert len({a["id"] for a in coco["annotations"]}) < len(coco["annotations"])
    out.write_text(json.dumps(coco))
    return out


class _GroundTruthDetector(torch.nn.Module):
    """Stands in for a trained detector: answers each image (in dataset order) with its loaded ground truth,
    scaled to the network input the way a real detector's boxes are."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.dataset, self.seen = dataset, 0
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images, image_sizes):
        out = []
        for h, w in image_sizes:
            ann = self.dataset.annotation(self.seen)
            self.seen += 1
            h0, w0 = ann["orig_size"]
            boxes = torch.as_tensor(ann["boxes"]) * torch.tensor([w / w0, h / h0, w / w0, h / h0])
            out.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": torch.as_tensor(ann["labels"])})
        return out


def test_test_detector_scores_the_ground_truth_at_one_despite_repeated_ids_and_bad_boxes(small_det_world, tmp_path):
    # Before: COCO AP 0.460 (raw JSON: repeated annotation ids, uncleaned boxes) while VOC said 1.0.
    from detres.config.load import load_config
    from detres.data.build import build_detection_dataset
    from detres.engine.det_test import test_detector
    from detres.engine.tasks.detection_run import detector_metadata

    val = _val_with_repeated_ids_and_bad_boxes(small_det_world, tmp_path / "val.json")
    cfg = load_config(_config(small_det_world, tmp_path / "run", tmp_path / "c.yaml", val_ann=str(val)))
    with pytest.warns(UserWarning, match="dropped 2 degenerate boxes"):
        dataset = build_detection_dataset(cfg, "val", train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from the two images have undefined VOC AP
        metrics = test_detector(
            _GroundTruthDetector(dataset),
            dataset,
            detector_metadata(dataset),
            cfg,
            out_dir=tmp_path / "t",
            device=torch.device("cpu"),
        )
    assert metrics["coco"]["summary"]["AP"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["coco"]["summary"]["AR100"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["voc"]["mAP"] == pytest.approx(1.0, abs=1e-6)
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["coco"]["summary"]["AP"] == pytest.approx(1.0)


def test_test_det_rejects_repeated_image_ids_naming_them(trained, small_det_world, tmp_path, capsys):
    cfg, out, _ = trained
    coco = json.loads((small_det_world / "annotations" / "instances_val.json").read_text())
    coco["images"][1]["id"] = coco["images"][0]["id"]
    ann = tmp_path / "merged.json"
    ann.write_text(json.dumps(coco))
    code = test_det.main(["--config", str(cfg), "--checkpoint", str(out / "model_final.pt"), f"data.val_ann={ann}"])
    err = capsys.readouterr().err
    assert code == 2 and "merged.json" in err and f"id {coco['images'][0]['id']}" in err
    assert "val_000001.png" in err and "val_000002.png" in err


# ------------------------------------------ issue #6: test_det writes its COCO ground truth and PR curves
class _NoisyDetector(_GroundTruthDetector):
    """The ground truth shifted by a few pixels, with decreasing scores, plus one confident false positive per
    image: an AP strictly between 0 and 1, so reproducing it exactly is a real check."""

    def forward(self, images, image_sizes):
        out = []
        for det in super().forward(images, image_sizes):
            n = len(det["boxes"])
            shift = torch.arange(n, dtype=torch.float32)[:, None] * 2.0
            boxes = torch.cat([det["boxes"] + shift, torch.tensor([[0.0, 0.0, 20.0, 20.0]])])
            scores = torch.cat([torch.linspace(0.9, 0.3, n), torch.tensor([0.95])])
            labels = torch.cat([det["labels"], det["labels"][:1] if n else torch.tensor([1])])
            out.append({"boxes": boxes, "scores": scores, "labels": labels})
        return out


def test_test_detector_writes_coco_gt_that_eval_det_scores_to_the_same_numbers(small_det_world, tmp_path, capsys):
    from detres.config.load import load_config
    from detres.data.build import build_detection_dataset
    from detres.engine.det_test import test_detector
    from detres.engine.tasks.detection_run import detector_metadata

    cfg = load_config(_config(small_det_world, tmp_path / "run", tmp_path / "c.yaml"))
    dataset = build_detection_dataset(cfg, "val", train=False)
    out = tmp_path / "t"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from the two images have undefined VOC AP
        metrics = test_detector(
            _NoisyDetector(dataset),
            dataset,
            detector_metadata(dataset),
            cfg,
            out_dir=out,
            device=torch.device("cpu"),
        )
    ap = metrics["coco"]["summary"]["AP"]
    assert 0.05 < ap < 0.95, ap
    # The per-class precision-recall plot.
    png = (out / "pr_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # coco_gt.json is the ground truth of metrics.json (the boxes as loaded), written atomically (no temp left).
    gt = json.loads((out / "coco_gt.json").read_text())
    assert [im["id"] for im in gt["images"]] == [dataset.annotation(i)["image_id"] for i in range(len(dataset))]
    assert len(gt["annotations"]) == sum(len(dataset.annotation(i)["boxes"]) for i in range(len(dataset)))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    # eval_det on the two files reproduces test_det's COCO numbers exactly, not approximately.
    eval_det = load_tool("eval_det")
    json_out = tmp_path / "eval.json"
    code = eval_det.main(
        [
            "coco",
            "--gt",
            str(out / "coco_gt.json"),
            "--results",
            str(out / "coco_results.json"),
            "--json-out",
            str(json_out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    reproduced = json.loads(json_out.read_text())
    assert reproduced["summary"] == metrics["coco"]["summary"]
    assert reproduced["per_category"] == metrics["coco"]["per_category"]
    assert json.loads((out / "metrics.json").read_text())["coco"]["summary"] == reproduced["summary"]
