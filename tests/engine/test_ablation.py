"""detres.engine.ablation: the options of each Table-9 row and which rows run with which checkpoints."""

from __future__ import annotations

import pytest

from detres.config.load import load_config
from detres.engine.ablation import ladder_options, plan_rows


@pytest.fixture
def options(tmp_path, write_tiny_det_config):
    path = write_tiny_det_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        test={
            "box_refinement": True,
            "flip": True,  # the config's own switches do not leak into the rows
            "multiscale": {"scales": [48, 64], "reference_size": 40, "pyramid_proposals": True},
        },
    )
    return ladder_options(load_config(path))


def test_each_row_adds_to_the_row_above(options):
    base, refined, ms = options["baseline"], options["refinement"], options["multiscale"]
    assert base.plain and base.voting is None and not base.flip  # the checkpoint's own post-processing
    assert refined.box_refinement and refined.voting and not refined.multiscale
    assert options["context"] == refined
    assert ms.multiscale and ms.box_refinement and ms.voting and not ms.flip
    assert ms.scales == (48, 64) and ms.reference_size == 40 and ms.pyramid_proposals
    assert ms.max_size_ratio is None  # the pyramid keeps the model's own test-scale ratio (its transform's)
    assert options["ensemble"] == ms


def test_plan_rows_skips_rows_without_their_checkpoint(options):
    plans, notes = plan_rows(options, baseline="b.pt")
    assert [p.name for p in plans] == ["baseline", "refinement", "multiscale"]
    assert len(notes) == 2 and "--context" in notes[0] and "--ensemble" in notes[1]
    assert plans[-1].checkpoints == ("b.pt",)
    plans, notes = plan_rows(options, baseline="b.pt", context="c.pt", ensemble=["e1.pt", "e2.pt"])
    assert notes == [] and [p.checkpoints for p in plans] == [
        ("b.pt",),
        ("b.pt",),
        ("c.pt",),
        ("c.pt",),
        ("c.pt", "e1.pt", "e2.pt"),
    ]
    plans, _ = plan_rows(options, baseline="b.pt", context="c.pt", rows="multiscale")
    assert [(p.name, p.checkpoints) for p in plans] == [("multiscale", ("c.pt",))]
    with pytest.raises(ValueError, match="--ensemble"):
        plan_rows(options, baseline="b.pt", rows="baseline,ensemble")


def test_demo_ablation_writes_its_three_rows(tmp_path, write_tiny_det_config, tiny_det_checkpoint):
    import json
    import shutil
    import warnings

    from detres.engine.demo import ABLATION_ROWS, demo_ablation

    (tmp_path / "det").mkdir()
    shutil.copy(tiny_det_checkpoint, tmp_path / "det" / "model_final.pt")
    cfg = load_config(
        write_tiny_det_config(
            tmp_path / "c.yaml", tmp_path / "det", test={"multiscale": {"scales": [48, 64], "reference_size": 32}}
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model: classes without detections
        rows = demo_ablation(cfg, tmp_path)
    assert [r["row"] for r in rows] == list(ABLATION_ROWS) == ["baseline", "refinement", "multiscale"]
    written = json.loads((tmp_path / "ablation.json").read_text())
    assert [(r["row"], r["mAP"], r["checkpoints"]) for r in written] == [
        (r["row"], r["mAP"], r["checkpoints"]) for r in rows
    ]


def test_rows_follow_test_coco_backend(tmp_path, write_tiny_det_config, tiny_det_checkpoint):
    """tools/ablate_det's COCO numbers come from the configured backend; faster-coco-eval equals pycocotools."""
    import warnings

    from detres.engine.ablation import run_ablation

    rows = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        cfg = load_config(
            write_tiny_det_config(tmp_path / f"{backend}.yaml", tmp_path / backend, test={"coco_backend": backend})
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained model: classes without detections
            rows[backend] = run_ablation(cfg, baseline=tiny_det_checkpoint, rows="baseline")[0]
    assert rows["faster_coco_eval"]["mAP"] == pytest.approx(rows["pycocotools"]["mAP"], abs=1e-6)
    assert rows["faster_coco_eval"]["mAP50"] == pytest.approx(rows["pycocotools"]["mAP50"], abs=1e-6)
    bad = load_config(write_tiny_det_config(tmp_path / "bad.yaml", tmp_path / "bad", test={"coco_backend": "nope"}))
    with pytest.raises(ValueError, match="faster_coco_eval"):  # the key reaches the evaluator
        run_ablation(bad, baseline=tiny_det_checkpoint, rows="baseline")
