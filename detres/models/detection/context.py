"""Global context (ResNet paper, Appendix B): a whole-image RoI feature concatenated to every region's feature.

"We pool a feature by global Spatial Pyramid Pooling (with a 'single-level' pyramid) which can be
implemented as 'RoI' pooling using the entire image's bounding box as the RoI. This pooled feature is
fed into the post-RoI layers to obtain a global context feature. This global feature is concatenated
with the original per-region feature, followed by the sibling classification and box regression
layers. This new structure is trained end-to-end."
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from detres.models.detection.roi_heads import RoIHeads

__all__ = ["ContextRoIHeads", "image_cells", "with_context"]


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
        pooled = []
        for i, (h, w) in enumerate(image_sizes):
            # as_tensor keeps a traced image's sizes traced (the exported model follows the image size).
            image_hw = torch.stack([torch.as_tensor(h), torch.as_tensor(w)])
            cells, box = image_cells(features[i : i + 1], image_hw, self.pooler.spatial_scale)
            pooled.append(self.pooler(cells, [box]))
        return self.box_head(torch.cat(pooled))

    def region_features(
        self, features: torch.Tensor, proposals: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """[sum Ni, 2D]: each proposal's region vector followed by its image's context vector."""
        regions = super().region_features(features, proposals, image_sizes)
        context = self.context_features(features, image_sizes)
        image_of = torch.cat([torch.full_like(p[:, 0], i, dtype=torch.int64) for i, p in enumerate(proposals)])
        return with_context(regions, context, image_of)


# Compiled when traced (export): the crop and the box follow the image size instead of freezing the example's.
@torch.jit._script_if_tracing
def image_cells(
    features: torch.Tensor, image_hw: torch.Tensor, spatial_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's context RoI: the feature cells its pixels fall in, ``features[:, :, :rows, :cols]`` with
    rows = ceil(H * scale) (1e-6: no extra cell from float rounding), and its whole-image box [[0, 0, W, H]].
    ``features`` [1, C, h, w]; ``image_hw`` int64 [2] = (H, W). Tensor arithmetic in float64 (Python's float)
    gives an integer slice bound, which ONNX needs."""
    cells = torch.ceil(image_hw.to(torch.float64) * spatial_scale - 1e-6).to(torch.int64).clamp(min=1)
    rows = min(int(cells[0]), features.shape[2])
    cols = min(int(cells[1]), features.shape[3])
    size = image_hw.flip(0).to(device=features.device, dtype=features.dtype)
    return features[:, :, :rows, :cols], torch.cat([torch.zeros_like(size), size])[None]


def with_context(regions: torch.Tensor, context: torch.Tensor, image_of: torch.Tensor) -> torch.Tensor:
    """[R, 2D] ``[region | context of its image]`` vectors: ``regions`` [R, D], ``context`` [B, D] (one per image),
    ``image_of`` [R] each region's image index. The one place the two are joined (single scale, multi-scale)."""
    return torch.cat([regions, context[image_of]], dim=1)
