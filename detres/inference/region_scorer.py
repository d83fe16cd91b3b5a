"""Region scorers: "given RoIs, give class probabilities and class-specific boxes" over one model's cached features.

Every Appendix-B test-time extra is a way of scoring the same RoIs: one model at one scale
(:class:`SingleScaleScorer`), one model on an image pyramid with maxout of two levels
(``detres.inference.multiscale``), a mirrored image (``detres.inference.flip_tta``), several models
(an ensemble, :class:`AveragedScorer`). Box refinement then scores the regressed boxes with the same
scorer. A scorer computes its features once, at construction, and can score any number of RoI sets.

Boxes and RoIs are in the network input's pixels (the test-scale image), per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["RegionScorer", "SingleScaleScorer", "AveragedScorer", "per_class_boxes", "check_eval_mode"]

Scored = tuple[list[Tensor], list[Tensor]]


class RegionScorer(Protocol):
    """What the test-time pipeline needs from a scorer."""

    image_sizes: list[tuple[int, int]]

    def propose(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per image (proposal boxes [Ni,4], objectness [Ni]), best first."""

    def score(self, rois: Sequence[Tensor]) -> Scored:
        """Per image (class probabilities [Ni,K+1], per-class boxes [Ni,K+1,4] or class-agnostic [Ni,4])."""


def check_eval_mode(model: torch.nn.Module, who: str) -> None:
    """Test-time paths need the eval-mode behaviour of every part (proposal counts, no sampling, dropout off)."""
    if model.training or any(m.training for m in model.modules()):
        raise ValueError(f"{who}: the model must be in eval mode (model.eval())")


class SingleScaleScorer:
    """One model at the network input's scale: exactly the computation of the model's own eval forward.

    Args:
        model: a ``FasterRCNN`` in eval mode.
        images: a padded 0..255 batch [B,3,H,W] (with ``image_sizes``) or a list of [3,H,W] images.
        image_sizes: valid (h, w) of each image of a padded batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        images: Sequence[Tensor] | Tensor,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        check_eval_mode(model, "SingleScaleScorer")
        self.model = model
        batch, self.image_sizes = model.preprocess(images, image_sizes)
        self.features = model.trunk(batch)

    def propose(self) -> tuple[list[Tensor], list[Tensor]]:
        return self.model.rpn.propose_scored(self.features, self.image_sizes, mode="test")

    def score(self, rois: Sequence[Tensor]) -> Scored:
        heads = self.model.roi_heads
        rois = [r.to(device=self.features.device, dtype=torch.float32) for r in rois]
        logits, deltas = heads.predict(heads.region_features(self.features, rois, self.image_sizes))
        return heads.decode_predictions(logits, deltas, rois)


def per_class_boxes(boxes: Tensor, num_classes: int) -> Tensor:
    """[N,4] class-agnostic boxes as [N,K+1,4] (the same box for every class); [N,K+1,4] unchanged."""
    if boxes.dim() == 3:
        return boxes
    return boxes.unsqueeze(1).expand(boxes.shape[0], num_classes, 4)


class AveragedScorer:
    """The mean of several scorers' class probabilities and class-specific boxes on the same RoIs.

    An ensemble (one scorer per model) or a test-time augmentation (the image and its mirror).
    Proposals are those of the first scorer; an ensemble merges all members' proposals itself
    (``detres.inference.ensemble``). Class-agnostic boxes are repeated per class before averaging
    when the members mix both kinds.
    """

    def __init__(self, scorers: Sequence[RegionScorer]) -> None:
        if len(scorers) == 0:
            raise ValueError("AveragedScorer: needs at least one scorer")
        sizes = [list(s.image_sizes) for s in scorers]
        if any(s != sizes[0] for s in sizes):
            raise ValueError(f"AveragedScorer: the scorers see different image sizes {sizes}")
        self.scorers = list(scorers)
        self.image_sizes = sizes[0]

    def propose(self) -> tuple[list[Tensor], list[Tensor]]:
        return self.scorers[0].propose()

    def score(self, rois: Sequence[Tensor]) -> Scored:
        results = [s.score(rois) for s in self.scorers]
        if len(results) == 1:
            return results[0]
        widths = {p.shape[1] for probs, _ in results for p in probs}
        if len(widths) > 1:
            raise ValueError(f"AveragedScorer: the members predict different numbers of classes {sorted(widths)}")
        mixed = len({b.dim() for _, boxes in results for b in boxes}) > 1
        probs, boxes = [], []
        for i in range(len(rois)):
            probs.append(torch.stack([r[0][i] for r in results]).mean(dim=0))
            members = [r[1][i] for r in results]
            if mixed:
                members = [per_class_boxes(b, results[0][0][i].shape[1]) for b in members]
            boxes.append(torch.stack(members).mean(dim=0))
        return probs, boxes
