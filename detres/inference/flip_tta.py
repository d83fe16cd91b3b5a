"""Horizontal-flip test-time augmentation: score the same RoIs on the mirrored image, mirror the boxes back."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from detres.inference.region_scorer import RegionScorer, Scored

__all__ = ["flip_boxes", "flip_images", "FlippedScorer"]


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror xyxy boxes ([..., 4], any leading shape) in an image of ``width`` pixels: x -> width - x."""
    flipped = boxes.clone()
    flipped[..., 0] = width - boxes[..., 2]
    flipped[..., 2] = width - boxes[..., 0]
    return flipped


def flip_images(images: Sequence[Tensor] | Tensor, image_sizes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Each image's valid region [3,h,w], mirrored left-right (padding is not part of any image)."""
    if isinstance(images, Tensor) and images.dim() == 3:
        images = [images]
    return [torch.flip(img[:, : int(h), : int(w)], dims=[2]) for img, (h, w) in zip(images, image_sizes)]


class FlippedScorer:
    """A scorer on the mirrored images that answers in the original images' coordinates.

    Args:
        make_scorer: builds the inner scorer from (images, image_sizes), e.g. a single- or multi-scale one.
        images, image_sizes: the unflipped network input (padded batch + valid sizes, or a list).

    ``score`` mirrors the RoIs, scores them on the mirrored images and mirrors the boxes back, so it can be
    averaged with the unflipped scorer (:class:`detres.inference.region_scorer.AveragedScorer`).
    """

    def __init__(
        self,
        make_scorer: Callable[..., RegionScorer],
        images: Sequence[Tensor] | Tensor,
        image_sizes: Sequence[Sequence[int]],
    ) -> None:
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        self.inner = make_scorer(flip_images(images, sizes), None)
        self.image_sizes = list(self.inner.image_sizes)
        if self.image_sizes != sizes:
            raise ValueError(f"FlippedScorer: the inner scorer sees sizes {self.image_sizes}, expected {sizes}")

    def propose(self) -> tuple[list[Tensor], list[Tensor]]:
        boxes, scores = self.inner.propose()
        return [flip_boxes(b, w) for b, (_, w) in zip(boxes, self.image_sizes)], scores

    def score(self, rois: Sequence[Tensor]) -> Scored:
        widths = [w for _, w in self.image_sizes]
        probs, boxes = self.inner.score([flip_boxes(r, w) for r, w in zip(rois, widths)])
        return probs, [flip_boxes(b, w) for b, w in zip(boxes, widths)]
