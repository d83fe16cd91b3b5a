"""Global context (ResNet paper, Appendix B): a whole-image RoI feature concatenated to every region's feature.

"We pool a feature by global Spatial Pyramid Pooling (with a 'single-level' pyramid) which can be
implemented as 'RoI' pooling using the entire image's bounding box as the RoI. This pooled feature is
fed into the post-RoI layers to obtain a global context feature. This global feature is concatenated
with the original per-region feature, followed by the sibling classification and box regression
layers. This new structure is trained end-to-end."
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from detres.models.detection.roi_heads import RoIHeads

__all__ = ["ContextRoIHeads", "with_context"]


class ContextRoIHeads(RoIHeads):
    """RoI heads whose region vectors are ``[region feature | whole-image context feature]`` ([R, 2D]).

    The context feature of an image is the same ``pooler`` applied to the box ``[0, 0, W, H]`` of the
    image's valid (unpadded) area, run through the same ``box_head`` (conv5_x + pooling, shared
    weights), once per image. The box is pooled on the image's own feature cells (the first
    ``ceil(H * scale)`` x ``ceil(W * scale)`` cells of its padded map), so padding added by batching
    with a larger image is never read: an image gets the same context alone or in any batch.

    The context branch lives inside the RoI heads (no new parameters: it reuses ``pooler`` and
    ``box_head``), so whatever trains, saves or runs the RoI heads trains, saves or runs it too.
    The predictor must take ``2 * box_head.out_features`` inputs. Other arguments: :class:`RoIHeads`.
    """

    def __init__(self, pooler, box_head, predictor, **kwargs) -> None:
        super().__init__(pooler, box_head, predictor, **kwargs)
        expected = 2 * box_head.out_features
        got = predictor.cls_score.in_features
        if got != expected:
            raise ValueError(
                f"ContextRoIHeads: the predictor takes {got} inputs, but [region | context] vectors have "
                f"2 x {box_head.out_features} = {expected}"
            )

    def context_features(self, features: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """One whole-image context vector per image: [B, D]."""
        if len(image_sizes) != features.shape[0]:
            raise ValueError(
                f"ContextRoIHeads: {len(image_sizes)} image sizes for a batch of {features.shape[0]} feature maps"
            )
        scale = self.pooler.spatial_scale
        pooled = []
        for i, (h, w) in enumerate(image_sizes):
            # The feature cells this image's pixels fall in (1e-6: no extra cell from float rounding of h * scale).
            rows = min(max(math.ceil(h * scale - 1e-6), 1), features.shape[2])
            cols = min(max(math.ceil(w * scale - 1e-6), 1), features.shape[3])
            box = features.new_tensor([[0.0, 0.0, float(w), float(h)]])
            pooled.append(self.pooler(features[i : i + 1, :, :rows, :cols], [box]))
        return self.box_head(torch.cat(pooled))

    def region_features(
        self, features: torch.Tensor, proposals: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """[sum Ni, 2D]: each proposal's region vector followed by its image's context vector."""
        regions = super().region_features(features, proposals, image_sizes)
        context = self.context_features(features, image_sizes)
        counts = torch.tensor([p.shape[0] for p in proposals], device=context.device)
        image_of = torch.repeat_interleave(torch.arange(len(proposals), device=context.device), counts)
        return with_context(regions, context, image_of)


def with_context(regions: torch.Tensor, context: torch.Tensor, image_of: torch.Tensor) -> torch.Tensor:
    """[R, 2D] ``[region | context of its image]`` vectors: ``regions`` [R, D], ``context`` [B, D] (one per image),
    ``image_of`` [R] each region's image index. The one place the two are joined (eager, multi-scale, export)."""
    return torch.cat([regions, context[image_of]], dim=1)
