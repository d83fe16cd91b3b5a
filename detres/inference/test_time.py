"""The test-time pipeline of Appendix B: proposals, scoring (multi-scale / flip / ensemble), refinement, NMS, voting.

One function, :func:`detect_test_time`, composes every extra from region scorers
(``detres.inference.region_scorer``). With one model and every option off it computes exactly what
the model's eval forward computes.

Order, as in the paper: proposals from each model's RPN at the input scale (optionally also on the
pyramid) -> union over ensemble members (NMS 0.7, capped) -> each member scores the RoIs (maxout of
two pyramid levels, averaged with the mirrored image) -> averaged over members -> optional box
refinement (the regressed boxes scored again the same way, union with the first pass) -> the first
model's post-processing (per-class NMS or soft-NMS, box voting, top-k).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from detres.inference.box_refinement import refine
from detres.inference.ensemble import ensemble_proposals
from detres.inference.flip_tta import FlippedScorer
from detres.inference.multiscale import MultiScaleScorer
from detres.inference.region_scorer import AveragedScorer, RegionScorer, SingleScaleScorer, check_eval_mode
from detres.models.detection.postprocess import check_postprocess_options

__all__ = ["TestTimeOptions", "options_from_config", "build_scorer", "detect_test_time"]


@dataclass(frozen=True)
class TestTimeOptions:
    """Switches of the Appendix-B test-time extras (all off = the model's own forward).

    box_refinement: second pass on each region's regressed box, NMS on the union of both passes.
    box_voting, box_voting_iou: None = the first model's ``roi_heads`` settings.
    multiscale: score RoIs on the image pyramid ``scales`` (shorter sides; longer side capped at
        ``scale * max_size_ratio``), maxout of the two levels bracketing ``reference_size``².
    pyramid_proposals: with ``multiscale``, also run the RPN on every level and merge the sets.
    flip: average the scores and boxes with those of the mirrored image.
    proposal_nms_thresh, max_proposals: how proposal sets are merged (ensembles, pyramid proposals);
        None = the first model's RPN test NMS threshold (0.7) and post-NMS top-n (300).
    """

    __test__ = False  # not a pytest test class despite its name

    box_refinement: bool = False
    box_voting: bool | None = None
    box_voting_iou: float | None = None
    multiscale: bool = False
    scales: tuple[float, ...] = (200, 400, 600, 800, 1000)
    max_size_ratio: float = 1000 / 600
    reference_size: float = 224
    pyramid_proposals: bool = False
    flip: bool = False
    proposal_nms_thresh: float | None = None
    max_proposals: int | None = None

    def __post_init__(self) -> None:
        if len(self.scales) == 0 or any(float(s) <= 0 for s in self.scales):
            raise ValueError(f"test-time options: scales must be positive shorter sides, got {list(self.scales)}")
        if self.max_size_ratio < 1:
            raise ValueError(f"test-time options: max_size_ratio must be >= 1, got {self.max_size_ratio}")
        if self.reference_size <= 0:
            raise ValueError(f"test-time options: reference_size must be positive, got {self.reference_size}")
        if self.pyramid_proposals and not self.multiscale:
            raise ValueError("test-time options: pyramid_proposals needs multiscale")
        if self.proposal_nms_thresh is not None and not 0 < self.proposal_nms_thresh <= 1:
            raise ValueError(
                f"test-time options: proposal_nms_thresh must be in (0, 1], got {self.proposal_nms_thresh}"
            )
        if self.max_proposals is not None and self.max_proposals < 1:
            raise ValueError(f"test-time options: max_proposals must be >= 1, got {self.max_proposals}")

    @property
    def plain(self) -> bool:
        """True when no extra is on and the voting settings are the model's own (the model's forward then
        computes exactly what the pipeline does)."""
        return (
            not (self.box_refinement or self.multiscale or self.flip)
            and self.box_voting is None
            and self.box_voting_iou is None
        )


def options_from_config(test_cfg: Mapping[str, Any], input_cfg: Mapping[str, Any]) -> TestTimeOptions:
    """``TestTimeOptions`` from a det config's ``test`` and ``input`` sections (the pyramid's longer-side cap
    keeps the test scale's ratio ``max_size_test / min_size_test``)."""
    ms = test_cfg["multiscale"]
    ensemble = test_cfg["ensemble"]
    return TestTimeOptions(
        box_refinement=bool(test_cfg["box_refinement"]),
        multiscale=bool(ms["enabled"]),
        scales=tuple(float(s) for s in ms["scales"]),
        max_size_ratio=float(input_cfg["max_size_test"]) / float(input_cfg["min_size_test"]),
        reference_size=float(ms["reference_size"]),
        pyramid_proposals=bool(ms["pyramid_proposals"]),
        flip=bool(test_cfg["flip"]),
        proposal_nms_thresh=None if ensemble["proposal_nms_thresh"] is None else float(ensemble["proposal_nms_thresh"]),
        max_proposals=None if ensemble["max_proposals"] is None else int(ensemble["max_proposals"]),
    )


def build_scorer(
    model: torch.nn.Module,
    images: Sequence[Tensor] | Tensor,
    image_sizes: Sequence[Sequence[int]] | None,
    options: TestTimeOptions,
) -> RegionScorer:
    """One model's scorer for a batch: single- or multi-scale, averaged with its mirror when ``options.flip``."""

    def make(imgs: Sequence[Tensor] | Tensor, sizes: Sequence[Sequence[int]] | None) -> RegionScorer:
        if not options.multiscale:
            return SingleScaleScorer(model, imgs, sizes)
        return MultiScaleScorer(
            model,
            imgs,
            sizes,
            scales=options.scales,
            max_size_ratio=options.max_size_ratio,
            reference_size=options.reference_size,
            pyramid_proposals=options.pyramid_proposals,
            proposal_nms_thresh=options.proposal_nms_thresh,
            max_proposals=options.max_proposals,
        )

    scorer = make(images, image_sizes)
    if not options.flip:
        return scorer
    return AveragedScorer([scorer, FlippedScorer(make, images, scorer.image_sizes)])


@torch.no_grad()
def detect_test_time(
    models: Sequence[torch.nn.Module] | torch.nn.Module,
    images: Sequence[Tensor] | Tensor,
    image_sizes: Sequence[Sequence[int]] | None = None,
    *,
    options: TestTimeOptions = TestTimeOptions(),
) -> list[dict[str, Tensor]]:
    """Detections of one model or an ensemble with the Appendix-B extras of ``options``.

    ``images``: 0..255 network input, a padded batch [B,3,H,W] with ``image_sizes``, or a list of
    [3,H,W]. Returns per image ``{"boxes" [D,4], "scores" [D], "labels" [D]}`` in the network input's
    pixels, like a model's eval forward. Score threshold, NMS and detections per image are the first
    model's; every member must predict the same number of classes.
    """
    if isinstance(models, torch.nn.Module):
        models = [models]
    if len(models) == 0:
        raise ValueError("detect_test_time: no models given")
    for k, model in enumerate(models):
        check_eval_mode(model, f"detect_test_time (model {k})")
    widths = [m.roi_heads.predictor.cls_score.out_features for m in models]
    if len(set(widths)) > 1:
        raise ValueError(f"detect_test_time: ensemble members predict different numbers of classes {widths}")
    heads = models[0].roi_heads
    voting = bool(heads.box_voting if options.box_voting is None else options.box_voting)
    voting_iou = float(heads.box_voting_iou if options.box_voting_iou is None else options.box_voting_iou)
    check_postprocess_options(
        nms_method=heads.nms_method,
        soft_nms_sigma=heads.soft_nms_sigma,
        soft_nms_score_thresh=heads.soft_nms_score_thresh,
        box_voting_iou=voting_iou,
    )

    scorers = [build_scorer(m, images, image_sizes, options) for m in models]
    if len(scorers) == 1:
        proposals, _ = scorers[0].propose()
        scorer = scorers[0]
    else:
        rpn = models[0].rpn
        nms_thresh = rpn.nms_thresh if options.proposal_nms_thresh is None else options.proposal_nms_thresh
        cap = rpn.post_nms_top_n("test") if options.max_proposals is None else options.max_proposals
        proposals, _ = ensemble_proposals(scorers, nms_thresh=nms_thresh, max_proposals=cap)
        scorer = AveragedScorer(scorers)
    probs, boxes = scorer.score(proposals)
    if options.box_refinement:
        probs, boxes = refine(scorer, probs, boxes)
    return heads.postprocess_decoded(probs, boxes, scorer.image_sizes, box_voting=voting, box_voting_iou=voting_iou)
