"""RoI pooling (Fast R-CNN): a fixed-size feature for every box from one feature map, roi_pool or roi_align."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.ops import roi_align, roi_pool

from detres.models.detection.fast_roi_pool import fast_roi_pool

__all__ = ["RoIPooler"]

_POOLER_TYPES = ("roi_pool", "roi_align")


class RoIPooler(nn.Module):
    """Pool a fixed-size feature for every box from a single feature map (RoI pooling, Fast R-CNN).

    Args:
        output_size: side of the pooled grid (14: conv5_1 then halves it to 7).
        spatial_scale: feature-map stride inverse (1/16 for C4).
        pooler_type: "roi_pool" (max pooling over quantised bins, the paper) or "roi_align".
        sampling_ratio: roi_align samples per bin (<= 0: adaptive); ignored by roi_pool.
        aligned: roi_align half-pixel offset; ignored by roi_pool.
        fast_max_pool: roi_pool only: use :func:`fast_roi_pool` (same values, several times faster
            on CPU, rows in channels-last memory format); it hands autograd and GPU inputs to
            torchvision's kernel itself.
    """

    def __init__(
        self,
        *,
        output_size: int,
        spatial_scale: float,
        pooler_type: str,
        sampling_ratio: int,
        aligned: bool = False,
        fast_max_pool: bool = True,
    ) -> None:
        super().__init__()
        if pooler_type not in _POOLER_TYPES:
            raise ValueError(f"RoIPooler: pooler_type must be one of {_POOLER_TYPES}, got {pooler_type!r}")
        if output_size < 1:
            raise ValueError(f"RoIPooler: output_size must be >= 1, got {output_size}")
        if spatial_scale <= 0:
            raise ValueError(f"RoIPooler: spatial_scale must be positive, got {spatial_scale}")
        self.output_size = int(output_size)
        self.spatial_scale = float(spatial_scale)
        self.pooler_type = pooler_type
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.fast_max_pool = bool(fast_max_pool)

    @classmethod
    def from_config(cls, roi_cfg: Mapping[str, Any], *, spatial_scale: float) -> RoIPooler:
        """The pooler of a ``model.roi_heads`` config tree on a feature map of ``spatial_scale`` (1 / stride)."""
        return cls(
            output_size=int(roi_cfg["pooler_resolution"]),
            spatial_scale=float(spatial_scale),
            pooler_type=str(roi_cfg["pooler_type"]),
            sampling_ratio=int(roi_cfg["sampling_ratio"]),
        )

    def forward(self, features: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """features [B,C,H,W], boxes: B tensors [Ni,4] (input-image xyxy) -> [sum Ni, C, S, S]."""
        if features.dim() != 4:
            raise ValueError(f"RoIPooler: features must be [B,C,H,W], got {tuple(features.shape)}")
        if len(boxes) != features.shape[0]:
            raise ValueError(f"RoIPooler: got {len(boxes)} box tensors for a batch of {features.shape[0]} feature maps")
        for i, b in enumerate(boxes):
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"RoIPooler: boxes[{i}] must be [N,4], got {tuple(b.shape)}")
        boxes = [b.to(features.dtype) for b in boxes]
        size = (self.output_size, self.output_size)
        if self.pooler_type == "roi_pool":
            # The fast pool's per-RoI Python loop cannot be traced: an exported model takes torchvision's roi_pool.
            if self.fast_max_pool and not torch.jit.is_tracing():
                # Channels-last rows: ResNet-50's conv5 head ran ~10% faster on them (CPU, 1 thread), same values.
                return fast_roi_pool(features, boxes, size, self.spatial_scale, channels_last=True)
            return roi_pool(features, boxes, size, self.spatial_scale)
        return roi_align(features, boxes, size, self.spatial_scale, self.sampling_ratio, self.aligned)
