"""Tests for detres.inference.test_time (the test-time augmentation wrapper), test_config and ensemble: the composed
Appendix-B pipeline against known answers and against the numbers of the functions it replaced."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from detres.config.load import load_config
from detres.inference.ensemble import ensemble_proposals, load_ensemble
from detres.inference.proposal_merge import merge_proposal_sets
from detres.inference.region_scorer import AveragedScorer, SingleScaleScorer
from detres.inference.test_config import TestConfig
from detres.inference.test_time import TestTimeAugmentation
from detres.models.build import build_detector, detector_state
from tests.inference.conftest import tiny_detector
from tests.tiny_configs import det_input_config, det_model_config


def _padded(images):
    batch = torch.zeros(len(images), 3, max(i.shape[1] for i in images), max(i.shape[2] for i in images))
    for slot, img in zip(batch, images):
        slot[:, : img.shape[1], : img.shape[2]] = img
    return batch, [tuple(i.shape[1:]) for i in images]


def _assert_same(got, want, atol=0.0):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=atol)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=atol)


def detect_test_time(models, images, image_sizes=None, *, options: TestConfig | None = None):
    return TestTimeAugmentation(models, options)(images, image_sizes)


def test_all_options_off_is_exactly_the_model_forward(detector, images):
    batch, sizes = _padded(images)
    with torch.no_grad():
        want = detector(batch, image_sizes=sizes)
    assert sum(len(d["scores"]) for d in want) > 0
    _assert_same(detect_test_time(detector, batch, sizes), want)
    # The composed pipeline itself (forced by restating the model's own voting setting) computes the same.
    assert not TestConfig(voting=False).plain
    _assert_same(detect_test_time(detector, batch, sizes, options=TestConfig(voting=False)), want)
    with torch.no_grad():
        want = detector(images)
    _assert_same(detect_test_time(detector, images, options=TestConfig(voting=False)), want)


MS = dict(multiscale=True, scales=(64.0, 96.0, 128.0), max_size_ratio=1.5, reference_size=32.0)
# Each option alone and together, with the numbers the replaced functions (detect_test_time over
# TestTimeOptions, configure_postprocess on the model) gave on these detectors and images.
REFERENCE_CASES = {
    "refinement": (1, TestConfig(box_refinement=True)),
    "voting": (1, TestConfig(voting=True, voting_iou=0.6)),
    "refinement_voting": (1, TestConfig(box_refinement=True, voting=True)),
    "flip": (1, TestConfig(flip=True)),
    "multiscale": (1, TestConfig(**MS)),
    "multiscale_context": ("context", TestConfig(**MS)),
    "pyramid_proposals": (1, TestConfig(**MS, pyramid_proposals=True, max_proposals=40)),
    "ensemble": (2, TestConfig(proposal_nms_thresh=0.6, max_proposals=40)),
    "everything": (2, TestConfig(**MS, box_refinement=True, flip=True, voting=True)),
    "soft_gaussian": (1, TestConfig(nms_method="soft_gaussian", soft_nms_sigma=0.4)),
    "soft_linear_refinement": (1, TestConfig(box_refinement=True, nms_method="soft_linear")),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_each_option_gives_the_numbers_of_the_replaced_code_path(case, detector, context_detector, images):
    reference = torch.load(Path(__file__).parent / "data" / "tta_reference.pt")[case]
    members, config = REFERENCE_CASES[case]
    models = {1: [detector], 2: [detector, context_detector], "context": [context_detector]}[members]
    # The references were computed on these images as the network input: the pipeline inside the transform.
    got = TestTimeAugmentation(models, config).detect_at_test_scale(images)
    assert sum(len(d["scores"]) for d in reference) > 0
    _assert_same(got, reference)
    assert detector.roi_heads.postprocess.voting is False  # the configuration never touches the model


def test_ensemble_of_one_model_equals_that_model(detector, images):
    with torch.no_grad():
        want = detector(images)
    _assert_same(detect_test_time([detector], images, options=TestConfig(max_proposals=30)), want)


def test_ensemble_of_two_identical_models_equals_one(detector, images):
    twin = tiny_detector(0)
    for options in (TestConfig(), TestConfig(box_refinement=True, flip=True)):
        _assert_same(
            detect_test_time([detector, twin], images, options=options),
            detect_test_time(detector, images, options=options),
            atol=1e-4,
        )


def test_ensemble_scores_are_the_mean_of_the_members_on_the_union_of_proposals(detector, context_detector, images):
    other = tiny_detector(2, class_agnostic_bbox=True)  # mixed: class-agnostic boxes are repeated per class
    members = [SingleScaleScorer(m, images) for m in (detector, context_detector, other)]
    proposals, _ = ensemble_proposals(members, nms_thresh=0.7, max_proposals=50)
    want, _ = merge_proposal_sets([m.propose() for m in members], nms_thresh=0.7, max_proposals=50)
    assert all(torch.equal(p, q) for p, q in zip(proposals, want))
    assert any(p.shape[0] > m.shape[0] for p, m in zip(proposals, members[0].propose()[0]))  # the union adds
    probs, boxes = AveragedScorer(members).score(proposals)
    each = [m.score(proposals) for m in members]
    for i in range(len(images)):
        torch.testing.assert_close(probs[i], sum(e[0][i] for e in each) / 3)
        k = probs[i].shape[1]
        agnostic = each[2][1][i][:, None, :].expand(-1, k, 4)
        torch.testing.assert_close(boxes[i], (each[0][1][i] + each[1][1][i] + agnostic) / 3)


@pytest.mark.parametrize("depth", [18, 50])
def test_every_extra_together_runs_on_a_mixed_ensemble(detector, context_detector, images, depth):
    """Basic-block and bottleneck members, with and without context, every option on."""
    options = TestConfig(
        box_refinement=True,
        voting=True,
        multiscale=True,
        scales=(48, 96, 160),
        max_size_ratio=1000 / 600,
        reference_size=32,
        pyramid_proposals=True,
        flip=True,
    )
    members = [detector, context_detector] if depth == 18 else [tiny_detector(3, depth=50), context_detector]
    out = detect_test_time(members, images, options=options)
    for det, (h, w) in zip(out, [img.shape[1:] for img in images]):
        assert det["boxes"].shape[0] == det["scores"].shape[0] > 0
        assert bool((det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all())
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())


def test_refused_inputs(detector, images):
    with pytest.raises(ValueError, match="different numbers of classes"):
        detect_test_time([detector, tiny_detector(0, num_classes=5)], images)
    detector.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            detect_test_time(detector, images)
    finally:
        detector.eval()
    with pytest.raises(ValueError, match="pyramid_proposals needs multiscale"):
        TestConfig(pyramid_proposals=True)
    with pytest.raises(ValueError, match="scales"):
        TestConfig(multiscale=True, scales=(0,), max_size_ratio=1.5, reference_size=224)
    with pytest.raises(ValueError, match="max_size_ratio"):
        TestConfig(max_size_ratio=0.5)  # refused even while multi-scale testing is off
    with pytest.raises(ValueError, match="test config: voting_iou"):
        TestConfig(voting_iou=-0.5)


def test_options_from_config_reads_the_test_section():
    cfg = load_config(
        "configs/det/shapes_r18.yaml",
        [
            "test.box_refinement=true",
            "test.flip=true",
            "test.multiscale.enabled=true",
            "test.ensemble.max_proposals=50",
        ],
    )
    options = TestConfig.from_config(cfg)
    assert options.box_refinement and options.flip and options.multiscale and options.max_proposals == 50
    assert options.max_size_ratio is None  # the pyramid keeps the ratio of the model's test scale
    assert options.scales == tuple(float(s) for s in cfg.test.multiscale.scales)
    assert options.nms_method is None and options.voting is None  # the model's own post-processing
    assert not dataclasses.replace(options, box_refinement=False, flip=False, multiscale=False).box_refinement
    off = options.without_extras()
    assert not (off.box_refinement or off.flip or off.multiscale) and off.plain and off.scales == options.scales


def _save(path, seed, class_names):
    torch.manual_seed(seed)
    model_cfg = det_model_config(
        depth=18,
        base_width=8,
        anchor_sizes=[16, 32, 64],
        pixel_std=[1.0, 1.0, 1.0],
        rpn={"pre_nms_top_n_test": 200, "post_nms_top_n_test": 30},
        roi_heads={"pooler_type": "roi_align", "pooler_resolution": 4, "sampling_ratio": 2, "score_thresh": 0.01},
    )
    inp = det_input_config(min_size_test=96, max_size_test=160)
    model = build_detector(model_cfg, input_cfg=inp, num_classes=len(class_names))
    meta = {"class_names": class_names}
    config = {"task": "det", "model": model_cfg, "input": inp}
    torch.save(detector_state(model, config=config, meta=meta), path)


def test_load_ensemble_checks_the_class_lists(tmp_path):
    _save(tmp_path / "a.pt", 0, ["cat", "dog", "cow"])
    _save(tmp_path / "b.pt", 1, ["cat", "dog", "cow"])
    _save(tmp_path / "c.pt", 2, ["cat", "cow", "dog"])
    models, meta = load_ensemble([tmp_path / "a.pt", tmp_path / "b.pt"])
    assert len(models) == 2 and not models[1].training
    assert (models[0].transform.min_size, models[0].transform.max_size) == (96, 160)  # from the config tree
    assert meta["ensemble_checkpoints"] == [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]
    with pytest.raises(ValueError, match="c.pt was trained on classes"):
        load_ensemble([tmp_path / "a.pt", tmp_path / "c.pt"])


def test_voting_given_in_the_options_is_applied_on_the_plain_path(detector, images):
    """Voting set in the options (not in the model) must reach the post-processing even with every extra off."""
    assert not detector.roi_heads.postprocess.voting
    plain = detect_test_time(detector, images)
    voted = detect_test_time(detector, images, options=TestConfig(voting=True))
    assert not TestConfig(voting=True).plain
    assert any(not torch.equal(a["boxes"], b["boxes"]) for a, b in zip(plain, voted))
