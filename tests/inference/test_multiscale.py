"""Tests for detres.inference.multiscale: pyramid sizes, the NoC/SPP level choice, maxout of two levels."""

from __future__ import annotations

import pytest
import torch

from detres.inference.multiscale import MultiScaleScorer, _resize, select_levels
from detres.inference.region_scorer import SingleScaleScorer

PAPER_SCALES = (200, 400, 600, 800, 1000)


def test_pyramid_levels_are_the_model_transform_sizes(detector, images):
    scorer = MultiScaleScorer(detector, images, scales=(48, 200))
    for level, scale in enumerate((48, 200)):
        assert scorer.level_sizes[level] == [detector.transform.scaled_size(hw, scale) for hw in scorer.image_sizes]
    capped = MultiScaleScorer(detector, images, scales=(200,), max_size_ratio=1.2)
    assert capped.level_sizes[0] == [detector.transform.scaled_size(hw, 200, 240) for hw in scorer.image_sizes]


def _areas_at_600(sides):
    """[R, L]: square RoIs of the given sides on a 600-px input, scaled to every paper level."""
    factors = torch.tensor(PAPER_SCALES, dtype=torch.float32) / 600
    sides = torch.tensor(sides, dtype=torch.float32)
    return (sides[:, None] * factors[None]) ** 2


@pytest.mark.parametrize(
    "side, expected",
    [
        (112, (3, 4)),  # 149 / 187 px at 800 / 1000: smaller than 224 even at the top -> the top two levels
        (224, (1, 2)),  # exactly 224 at 600; 149 at 400 -> 400 and 600
        (300, (1, 2)),  # 200 px at 400 (closest to 224), 300 px at 600 (the other side)
        (500, (0, 1)),  # 167 px at 200, 333 at 400
        (1000, (0, 1)),  # 333 px already at 200: the bottom two levels
        (200, (2, 3)),  # 200 at 600, 267 at 800
    ],
)
def test_level_pair_brackets_224_squared(side, expected):
    lower, upper = select_levels(_areas_at_600([side]), 224.0**2)
    assert (int(lower), int(upper)) == expected


def test_level_pair_contains_the_level_closest_to_224_squared():
    areas = _areas_at_600(torch.linspace(20, 1200, 200).tolist())
    lower, upper = select_levels(areas, 224.0**2)
    closest = (areas - 224.0**2).abs().argmin(dim=1)
    assert bool(((closest == lower) | (closest == upper)).all())
    assert bool((upper == lower + 1).all())


def test_one_level_gives_level_zero_twice():
    lower, upper = select_levels(torch.tensor([[10.0], [1e9]]), 224.0**2)
    assert lower.tolist() == upper.tolist() == [0, 0]


def test_one_level_pyramid_at_the_input_scale_equals_the_single_scale_scorer(detector, images):
    rois = [torch.tensor([[4.0, 4.0, 60.0, 50.0], [10.0, 20.0, 120.0, 90.0]])]
    single = SingleScaleScorer(detector, images[:1])  # a 96x128 image: the level "96" is the input itself
    multi = MultiScaleScorer(detector, images[:1], scales=[96], max_size_ratio=2.0)
    (p1, b1), (p2, b2) = single.score(rois), multi.score(rois)
    torch.testing.assert_close(p2[0], p1[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(b2[0], b1[0], rtol=0, atol=1e-4)


def test_maxout_of_two_identical_levels_equals_one_level(detector, context_detector, images):
    rois = [torch.tensor([[4.0, 4.0, 60.0, 50.0], [10.0, 20.0, 120.0, 90.0]])]
    for model in (detector, context_detector):
        single = SingleScaleScorer(model, images[:1])
        twice = MultiScaleScorer(model, images[:1], scales=[96, 96], max_size_ratio=2.0)
        lower, upper = twice.choose_levels(rois)
        assert lower.tolist() == [0, 0] and upper.tolist() == [1, 1]  # two levels, both the input
        (p1, b1), (p2, b2) = single.score(rois), twice.score(rois)
        torch.testing.assert_close(p2[0], p1[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(b2[0], b1[0], rtol=0, atol=1e-4)


def _reference_maxout(model, images, rois, scales, ratio, reference):
    """Independent reference: per RoI, region_features on each of its two levels (the heads' own path), max.

    Each level is one padded batch of all resized images, as in the scorer (padding changes border features).
    """
    heads = model.roi_heads
    sizes = [[model.transform.scaled_size(img.shape[1:], s, s * ratio) for img in images] for s in sorted(scales)]
    levels = [model.preprocess([_resize(img, hw) for img, hw in zip(images, level)]) for level in sizes]
    levels = [(model.trunk(batch), valid) for batch, valid in levels]
    out_probs, out_boxes = [], []
    for i, (img, r) in enumerate(zip(images, rois)):
        h, w = img.shape[1:]
        vectors, areas = [], []
        for (features, valid), level in zip(levels, sizes):
            fx, fy = level[i][1] / w, level[i][0] / h
            vectors.append(
                heads.region_features(features[i : i + 1], [r * torch.tensor([fx, fy, fx, fy])], valid[i : i + 1])
            )
            areas.append((r[:, 2] - r[:, 0]) * fx * (r[:, 3] - r[:, 1]) * fy)
        lower, upper = select_levels(torch.stack(areas, 1), reference**2)
        stacked = torch.stack(vectors)  # [L, N, D]
        idx = torch.arange(r.shape[0])
        merged = torch.maximum(stacked[lower, idx], stacked[upper, idx])
        probs, boxes = heads.decode_predictions(*heads.predict(merged), [r])
        out_probs += probs
        out_boxes += boxes
    return out_probs, out_boxes


@pytest.mark.parametrize("with_context", [False, True])
def test_batched_maxout_equals_a_per_level_reference(detector, context_detector, images, with_context):
    model = context_detector if with_context else detector
    rois = [
        torch.tensor([[4.0, 4.0, 60.0, 50.0], [10.0, 20.0, 120.0, 90.0], [30.0, 30.0, 40.0, 44.0]]),
        torch.tensor([[0.0, 0.0, 80.0, 112.0], [5.0, 50.0, 30.0, 70.0]]),
    ]
    scales, ratio, reference = (48, 96, 192), 1.5, 32.0
    scorer = MultiScaleScorer(model, images, scales=scales, max_size_ratio=ratio, reference_size=reference)
    lower, upper = scorer.choose_levels(rois)
    assert len(set(lower.tolist() + upper.tolist())) == 3  # the RoIs use every level
    probs, boxes = scorer.score(rois)
    ref_probs, ref_boxes = _reference_maxout(model, images, rois, scales, ratio, reference)
    for got, want in zip(probs + boxes, ref_probs + ref_boxes):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_levels_are_computed_only_when_a_roi_needs_them(detector, images):
    scorer = MultiScaleScorer(detector, images[:1], scales=(48, 96, 192, 384), max_size_ratio=2.0, reference_size=32)
    scorer.score([torch.tensor([[0.0, 0.0, 64.0, 64.0]])])  # 64 px at 96: levels 48 (32 px) and 96 (64 px)
    assert sorted(scorer._features) == [0, 1]


def test_pyramid_proposals_merge_the_levels_and_keep_the_input_scale_ones(detector, images):
    base = MultiScaleScorer(detector, images, scales=(48, 96, 160), max_size_ratio=2.0)
    merged = MultiScaleScorer(
        detector, images, scales=(48, 96, 160), max_size_ratio=2.0, pyramid_proposals=True, max_proposals=500
    )
    (base_boxes, _), (boxes, scores) = base.propose(), merged.propose()
    for b, m, s, (h, w) in zip(base_boxes, boxes, scores, merged.image_sizes):
        assert m.shape[0] > b.shape[0]  # other levels add proposals
        assert bool((s[:-1] >= s[1:]).all())  # best first
        assert bool((m[:, 2] <= w + 1e-3).all() and (m[:, 3] <= h + 1e-3).all())  # input-scale pixels


def test_bad_arguments_are_refused(detector, images):
    with pytest.raises(ValueError, match="scales"):
        MultiScaleScorer(detector, images, scales=[])
    with pytest.raises(ValueError, match="max_size_ratio"):
        MultiScaleScorer(detector, images, max_size_ratio=0.5)
    with pytest.raises(ValueError, match="areas"):
        select_levels(torch.zeros(3), 1.0)
