"""tools/test_det.py and tools/infer.py: the Appendix-B test-time flags (--multiscale, --flip, ...) and ensembles."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from detres.inference.test_config import TestConfig, add_test_arguments
from detres.inference.visualize import write_png
from tests.tool_loader import load_tool

test_det, infer = load_tool("test_det"), load_tool("infer")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_test_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_parse_into_options():
    base = TestConfig(scales=(200.0, 600.0), max_size_ratio=1.5, reference_size=224.0)
    assert base.with_flags(_parse()) == base  # nothing given: the base unchanged
    got = base.with_flags(
        _parse(
            "--box-refinement",
            "--multiscale",
            "--scales",
            "300",
            "500",
            "--reference-size",
            "112",
            "--pyramid-proposals",
            "--flip",
            "--proposal-nms",
            "0.6",
            "--max-proposals",
            "50",
            "--nms-method",
            "soft_linear",
            "--box-voting",
        ),
    )
    assert got == TestConfig(
        nms_method="soft_linear",
        voting=True,
        box_refinement=True,
        multiscale=True,
        scales=(300.0, 500.0),
        max_size_ratio=1.5,
        reference_size=112.0,
        pyramid_proposals=True,
        flip=True,
        proposal_nms_thresh=0.6,
        max_proposals=50,
    )
    on = dataclasses.replace(base, box_refinement=True, multiscale=True, flip=True)
    off = on.with_flags(_parse("--no-box-refinement", "--no-multiscale", "--no-flip"))
    assert not (off.box_refinement or off.multiscale or off.flip)
    for argv, flag in (
        (["--scales", "0"], "--scales"),
        (["--reference-size", "-1"], "--reference-size"),
        (["--proposal-nms", "1.5"], "--proposal-nms"),
        (["--max-proposals", "0"], "--max-proposals"),
        (["--pyramid-proposals"], "--pyramid-proposals"),
        (["--box-voting-iou", "-1"], "--box-voting-iou"),
        (["--soft-nms-sigma", "0"], "--soft-nms-sigma"),
    ):
        with pytest.raises(ValueError, match=flag):
            base.with_flags(_parse(*argv))


def _run_test_det(argv: list[str]) -> tuple[int, dict | None, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model leaves classes without detections
        code = test_det.main(argv)
    return code, json.loads(out.getvalue()) if code == 0 else None, err.getvalue()


def _results(folder: Path) -> list[dict]:
    return json.loads((folder / "coco_results.json").read_text())


def _same_results(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
        np.testing.assert_allclose(x["bbox"], y["bbox"], atol=1e-3)
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)


@pytest.fixture
def test_det_argv(tiny_det_checkpoint, write_tiny_det_config, tmp_path):
    cfg = write_tiny_det_config(tmp_path / "c.yaml", tmp_path / "run")
    return lambda *checkpoints, out: [
        "--config",
        str(cfg),
        "--checkpoint",
        *map(str, checkpoints or [tiny_det_checkpoint]),
        "--out",
        str(tmp_path / out),
    ]


def test_test_det_ensemble_of_identical_checkpoints_equals_one(tiny_det_checkpoint, test_det_argv, tmp_path):
    copy = tmp_path / "copy.pt"
    shutil.copy(tiny_det_checkpoint, copy)
    code, one, err = _run_test_det(test_det_argv(out="one"))
    assert code == 0, err
    code, two, err = _run_test_det(test_det_argv(tiny_det_checkpoint, copy, out="two"))
    assert code == 0, err
    assert two["COCO"] == pytest.approx(one["COCO"])
    _same_results(_results(tmp_path / "two"), _results(tmp_path / "one"))


def test_test_det_one_level_pyramid_at_the_test_scale_equals_plain(test_det_argv, tmp_path):
    code, plain, err = _run_test_det(test_det_argv(out="plain"))
    assert code == 0, err
    code, pyramid, err = _run_test_det([*test_det_argv(out="ms"), "--multiscale", "--scales", "64"])
    assert code == 0, err
    assert pyramid["COCO"] == pytest.approx(plain["COCO"])
    _same_results(_results(tmp_path / "ms"), _results(tmp_path / "plain"))


def test_test_det_bad_test_time_flags_exit_2(test_det_argv, make_tiny_checkpoint):
    code, _, err = _run_test_det([*test_det_argv(out="bad"), "--scales", "0"])
    assert code == 2 and "--scales" in err and "positive" in err
    code, _, err = _run_test_det([*test_det_argv(out="bad"), "--pyramid-proposals"])
    assert code == 2 and "--pyramid-proposals" in err
    other = make_tiny_checkpoint("other_classes.pt", class_names=["a", "b", "c", "d", "e"])
    code, _, err = _run_test_det(test_det_argv(make_tiny_checkpoint("det2.pt"), other, out="bad"))
    assert code == 2 and "other_classes.pt" in err and "class list" in err


def test_test_det_override_after_the_checkpoints_reaches_the_config(test_det_argv, tmp_path):
    # `--checkpoint a.pt key=value`: argparse hands the override to --checkpoint; it must still reach the config.
    code, _, err = _run_test_det(
        [*test_det_argv(out="o"), "--checkpoint", str(test_det_argv(out="o")[3]), "test.vis_images=1"]
    )
    assert code == 0, err
    assert len(list((tmp_path / "o" / "vis").glob("*.png"))) == 1
    # The same after --scales (a one-level pyramid at the test scale).
    code, _, err = _run_test_det([*test_det_argv(out="s"), "--multiscale", "--scales", "64", "test.vis_images=2"])
    assert code == 0, err
    assert len(list((tmp_path / "s" / "vis").glob("*.png"))) == 2
    code, _, err = _run_test_det([*test_det_argv(out="s"), "--multiscale", "--scales", "64", "big"])
    assert code == 2 and "--scales" in err and "big" in err


def test_infer_flip_and_ensemble_record_the_options(tiny_det_checkpoint, tmp_path, capsys):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    write_png(image, np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    copy = tmp_path / "copy.pt"
    shutil.copy(tiny_det_checkpoint, copy)
    base = ["--input", str(image), "--score-thresh", "0", "--device", "cpu"]
    assert infer.main(["--checkpoint", str(tiny_det_checkpoint), *base, "--out", str(tmp_path / "o1")]) == 0
    plain = json.loads((tmp_path / "o1" / "detections.json").read_text())
    # every extra off; the pyramid settings are the checkpoint's config's (the longer-side ratio: the model's own)
    want = TestConfig(scales=(200.0, 400.0, 600.0, 800.0, 1000.0), reference_size=224.0)
    assert plain["options"] == json.loads(json.dumps(dataclasses.asdict(want)))
    code = infer.main(
        ["--checkpoint", str(tiny_det_checkpoint), str(copy), *base, "--out", str(tmp_path / "o2"), "--flip"]
    )
    assert code == 0, capsys.readouterr().err
    flipped = json.loads((tmp_path / "o2" / "detections.json").read_text())
    assert flipped["checkpoints"] == [str(tiny_det_checkpoint), str(copy)]
    assert flipped["options"]["flip"] is True and flipped["options"]["max_size_ratio"] is None
    record = flipped["images"][0]
    assert len(record["scores"]) > 0
    assert all(0 <= b[0] <= b[2] <= 96 and 0 <= b[1] <= b[3] <= 64 for b in record["boxes"])
    assert (
        infer.main(["--checkpoint", str(tiny_det_checkpoint), *base, "--out", str(tmp_path / "o3"), "--scales", "0"])
        == 2
    )
    assert "--scales" in capsys.readouterr().err


def _refinement_spy(monkeypatch) -> list[int]:
    """Count the images the test-time augmentation sends through box refinement."""
    import detres.inference.test_time as test_time

    calls: list[int] = []
    real = test_time.refine

    def spy(scorer, probs, boxes):
        calls.append(len(scorer.image_sizes))
        return real(scorer, probs, boxes)

    monkeypatch.setattr(test_time, "refine", spy)
    return calls


def test_infer_box_refinement_flag(tiny_det_checkpoint, tmp_path, monkeypatch, capsys):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    write_png(image, np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    calls = _refinement_spy(monkeypatch)
    base = ["--checkpoint", str(tiny_det_checkpoint), "--input", str(image), "--score-thresh", "0", "--device", "cpu"]
    assert infer.main([*base, "--out", str(tmp_path / "o1")]) == 0
    assert calls == []  # off by default
    assert infer.main([*base, "--out", str(tmp_path / "o2"), "--box-refinement"]) == 0, capsys.readouterr().err
    assert calls == [1]
    out = json.loads((tmp_path / "o2" / "detections.json").read_text())["images"][0]
    assert len(out["scores"]) > 0 and all(0 <= b[0] <= b[2] <= 96 and 0 <= b[1] <= b[3] <= 64 for b in out["boxes"])


def test_test_det_box_refinement_flag_and_config(tiny_det_world, tiny_det_checkpoint, tmp_path, monkeypatch, capsys):
    cfg = {
        "task": "det",
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "data": {
            "format": "coco",
            "val_images": str(tiny_det_world / "images"),
            "val_ann": str(tiny_det_world / "annotations" / "instances_val.json"),
            "num_workers": 0,
        },
        "input": {"min_size_test": 64, "max_size_test": 96},
        "test": {"vis_images": 0},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    calls = _refinement_spy(monkeypatch)
    argv = ["--config", str(path), "--checkpoint", str(tiny_det_checkpoint), "--out", str(tmp_path / "t")]
    assert test_det.main(argv) == 0, capsys.readouterr().err
    assert calls == []  # the default config: off
    assert test_det.main([*argv, "--box-refinement"]) == 0
    assert sum(calls) == 3  # every val image
    assert (tmp_path / "t" / "metrics.json").is_file()
    # The config switch alone, and --no-box-refinement overriding it.
    assert test_det.main([*argv, "test.box_refinement=true"]) == 0
    assert sum(calls) == 6
    assert test_det.main([*argv, "--no-box-refinement", "test.box_refinement=true"]) == 0
    assert sum(calls) == 6
