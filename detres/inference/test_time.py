"""Test-time augmentation (Appendix B) as a wrapper module: a detector or an ensemble run with a :class:`TestConfig`.

:class:`TestTimeAugmentation` composes the region scorers (``detres.inference.region_scorer``). With one
model and a plain configuration its forward is the model's own eval forward; otherwise, as in the paper:
proposals from each model's RPN at the input scale (optionally also on the pyramid) -> union over
ensemble members (NMS, capped) -> each member scores the RoIs (maxout of two pyramid levels, averaged with
the mirrored image) -> averaged over members -> optional box refinement (the regressed boxes scored again
the same way, union with the first pass) -> the first model's post-processing with the configuration's
overrides (per-class NMS or soft-NMS, box voting, top-k).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detres.inference.box_refinement import refine
from detres.inference.ensemble import ensemble_proposals
from detres.inference.flip_tta import FlippedScorer
from detres.inference.multiscale import MultiScaleScorer
from detres.inference.region_scorer import AveragedScorer, RegionScorer, SingleScaleScorer, check_eval_mode
from detres.inference.test_config import TestConfig
from detres.models.detection.postprocess import DetectionPostprocess

__all__ = ["TestTimeAugmentation", "build_scorer"]


def build_scorer(
    model: nn.Module, images: Sequence[Tensor] | Tensor, image_sizes: Sequence[Sequence[int]] | None, config: TestConfig
) -> RegionScorer:
    """One model's scorer for a batch: single- or multi-scale, averaged with its mirror when ``config.flip``."""

    def make(imgs: Sequence[Tensor] | Tensor, sizes: Sequence[Sequence[int]] | None) -> RegionScorer:
        if not config.multiscale:
            return SingleScaleScorer(model, imgs, sizes)
        return MultiScaleScorer(
            model,
            imgs,
            sizes,
            scales=config.scales,
            max_size_ratio=config.max_size_ratio,
            reference_size=config.reference_size,
            pyramid_proposals=config.pyramid_proposals,
            proposal_nms_thresh=config.proposal_nms_thresh,
            max_proposals=config.max_proposals,
        )

    scorer = make(images, image_sizes)
    if not config.flip:
        return scorer
    return AveragedScorer([scorer, FlippedScorer(make, images, scorer.image_sizes)])


class TestTimeAugmentation(nn.Module):
    """One detector or the members of an ensemble, run as ``config`` says; called like a detector in eval mode.

    ``forward(images, image_sizes=None)``: ``images`` as for the detector's eval forward (0..255 images of any
    sizes, a list of [3,H,W] or a padded batch with ``image_sizes``); returns per image ``{"boxes" [D,4],
    "scores" [D], "labels" [D]}`` in the given images' pixels. The first model's transform resizes the images to
    its test scale and maps the boxes back; each member normalises with its own statistics. Score threshold,
    NMS and detections per image are the first model's; every member must predict the same number of classes.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, models: nn.Module | Sequence[nn.Module], config: TestConfig | None = None) -> None:
        super().__init__()
        config = TestConfig() if config is None else config
        members = [models] if isinstance(models, nn.Module) else list(models)
        if len(members) == 0:
            raise ValueError("TestTimeAugmentation: no models given")
        self.members = nn.ModuleList(members)
        self.config = config
        self.postprocess: DetectionPostprocess | None = None  # the plain forward post-processes by itself
        if len(members) > 1:
            widths = [m.roi_heads.predictor.cls_score.out_features for m in members]
            if len(set(widths)) > 1:
                raise ValueError(
                    f"TestTimeAugmentation: ensemble members predict different numbers of classes {widths}"
                )
        if len(members) > 1 or not config.plain:
            self.postprocess = config.postprocess_of(members[0].roi_heads.postprocess)  # validated here, once

    @torch.no_grad()
    def forward(
        self, images: Sequence[Tensor] | Tensor, image_sizes: Sequence[Sequence[int]] | None = None
    ) -> list[dict[str, Tensor]]:
        for k, model in enumerate(self.members):  # proposal counts, no sampling, dropout off
            check_eval_mode(model, f"TestTimeAugmentation (model {k})")
        if len(self.members) == 1 and self.config.plain:
            return self.members[0](images, image_sizes=image_sizes)
        transform = self.members[0].transform
        originals, resized = transform.to_test_scale(images, image_sizes)
        return transform.postprocess(self.detect_at_test_scale(resized), originals, resized)

    @torch.no_grad()
    def detect_at_test_scale(
        self, images: Sequence[Tensor] | Tensor, image_sizes: Sequence[Sequence[int]] | None = None
    ) -> list[dict[str, Tensor]]:
        """The composed pipeline on images already at the network input's scale (a list, or a padded batch with
        ``image_sizes``); detections in those images' pixels. :meth:`forward` wraps it in the first model's
        transform."""
        scorers = [build_scorer(m, images, image_sizes, self.config) for m in self.members]
        if len(scorers) == 1:
            proposals, _ = scorers[0].propose()
            scorer = scorers[0]
        else:
            rpn, config = self.members[0].rpn, self.config
            nms_thresh = rpn.nms_thresh if config.proposal_nms_thresh is None else config.proposal_nms_thresh
            cap = rpn.post_nms_top_n("test") if config.max_proposals is None else config.max_proposals
            proposals, _ = ensemble_proposals(scorers, nms_thresh=nms_thresh, max_proposals=cap)
            scorer = AveragedScorer(scorers)
        probs, boxes = scorer.score(proposals)
        if self.config.box_refinement:
            probs, boxes = refine(scorer, probs, boxes)
        heads = self.members[0].roi_heads
        return heads.postprocess_decoded(probs, boxes, scorer.image_sizes, postprocess=self.postprocess)
